"""``veil kms``: run the key management service and administer it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from veil.cli.common import run_cli

app = typer.Typer(
    name="kms",
    help="Key management service that releases keys only to attested workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _token(token: str, token_file: Path | None) -> str:
    from veil.errors import ConfigError

    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read admin token file: {exc}") from None
    if not token:
        raise ConfigError(
            "an admin token is required (--admin-token, VEIL_KMS_ADMIN_TOKEN or --admin-token-file)"
        )
    return token


@app.command("serve")
@run_cli
def serve(
    listen: str = typer.Option("127.0.0.1:8700", help="HOST:PORT."),
    state: Path = typer.Option(..., "--state", help="State directory (sealed SQLite)."),
    admin_token: str = typer.Option("", envvar="VEIL_KMS_ADMIN_TOKEN", help="Admin token (>= 16 chars)."),
    admin_token_file: Path | None = typer.Option(None, help="Read the admin token from this file."),
    allow_measurement: list[str] = typer.Option([], help="Allowed worker measurement (hex, repeat)."),
    policy_file: Path | None = typer.Option(
        None, help="veil.tee.Policy as JSON (overrides the flags below)."
    ),
    allow_simulated: bool = typer.Option(False, help="Accept SIMULATED worker evidence (development only)."),
    simulated_platform_key: list[str] = typer.Option(
        [], help="Trusted simulated platform key (hex, repeat)."
    ),
    allow_debug: bool = typer.Option(False, help="Accept debug enclaves."),
    nonce_ttl_s: float = typer.Option(30.0, help="Challenge nonce lifetime."),
    tee: str = typer.Option("simulated", help="TEE backend the KMS seals its state with."),
    tls_cert: Path | None = typer.Option(None, help="Serve HTTPS with this certificate (PEM)."),
    tls_key: Path | None = typer.Option(None, help="Private key of --tls-cert (PEM)."),
    max_sessions_per_client: int | None = typer.Option(
        None,
        help="Open key-release sessions per client address "
        "(default VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT).",
    ),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body accepted (413 beyond)."),
    verbose: bool = typer.Option(False, "-v"),
) -> None:
    """Run the KMS."""
    from veil.errors import ConfigError
    from veil.serve.kms.app import KMSConfig
    from veil.serve.runtime import parse_listen, run_kms
    from veil.tee import Policy

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    host, port = parse_listen(listen)
    if policy_file is not None:
        try:
            policy = Policy.model_validate_json(policy_file.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"bad policy file: {exc}") from None
    else:
        try:
            policy = Policy(
                allowed_measurements=set(allow_measurement),
                allow_simulated=allow_simulated,
                simulated_platform_keys=set(simulated_platform_key),
                allow_debug=allow_debug,
            )
        except ValueError as exc:
            raise ConfigError(f"bad policy: {exc}") from None
    if not policy.allowed_measurements and not policy.allow_any_measurement:
        raise ConfigError("the KMS policy allows no worker measurement (--allow-measurement)")
    cfg = KMSConfig(
        state_dir=state,
        admin_token=_token(admin_token, admin_token_file),
        policy=policy,
        nonce_ttl_s=nonce_ttl_s,
        tee_backend=tee,
        host=host,
        port=port,
        max_sessions_per_client=max_sessions_per_client,
        max_body_bytes=max_body_bytes,
    )
    run_kms(cfg, certfile=tls_cert, keyfile=tls_key)


@app.command("register-key")
@run_cli
def register_key(
    key_file: Path = typer.Argument(..., help="Key file written by `veil serve package`."),
    kms: str = typer.Option(..., "--kms"),
    admin_token: str = typer.Option("", envvar="VEIL_KMS_ADMIN_TOKEN"),
    admin_token_file: Path | None = typer.Option(None),
    kms_ca: Path | None = typer.Option(None),
) -> None:
    """Register a package data key with the KMS."""
    from veil.serve.kms.client import KMSClient
    from veil.serve.package import KeyFile

    kf = KeyFile.read(key_file)
    with KMSClient(kms, admin_token=_token(admin_token, admin_token_file), ca=kms_ca) as c:
        info = c.import_key(kf.model, kf.key_id, bytes.fromhex(kf.key), kf.signer)
    typer.echo(f"registered {info.model} v{info.version} (key id {info.key_id})")


@app.command("retire")
@run_cli
def retire(
    key_id: str = typer.Argument(...),
    kms: str = typer.Option(..., "--kms"),
    admin_token: str = typer.Option("", envvar="VEIL_KMS_ADMIN_TOKEN"),
    admin_token_file: Path | None = typer.Option(None),
) -> None:
    """Retire a key version: it is never released again."""
    from veil.serve.kms.client import KMSClient

    with KMSClient(kms, admin_token=_token(admin_token, admin_token_file)) as c:
        info = c.retire(key_id)
    typer.echo(f"retired {info.model} v{info.version}")


@app.command("audit")
@run_cli
def audit(
    kms: str = typer.Option(..., "--kms"),
    admin_token: str = typer.Option("", envvar="VEIL_KMS_ADMIN_TOKEN"),
    admin_token_file: Path | None = typer.Option(None),
    limit: int = typer.Option(50),
    outcome: str = typer.Option("", help="released | refused | ok"),
) -> None:
    """Print the audit log (newest first) as JSON lines."""
    from veil.serve.kms.client import KMSClient

    with KMSClient(kms, admin_token=_token(admin_token, admin_token_file)) as c:
        for e in c.audit(limit=limit, outcome=outcome or None):
            typer.echo(json.dumps(e.model_dump()))
