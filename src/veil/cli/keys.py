"""``veil keys``: party identities (TLS key + self-signed certificate) for GrpcChannel."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    name="keys",
    help="Party identities: TLS keys and certificates for channels.",
    no_args_is_help=True,
)


def _run(fn: Callable[[], Any]) -> Any:
    # imported at call time: veil.cli.main imports this module while it is being built
    from veil.cli.common import run_cli

    return run_cli(fn)()


@app.command("init")
def init(
    name: str = typer.Option(..., "--name", help="Party name (letters, digits, '.', '_', '-')."),
    out: Path = typer.Option(..., "--out", help="Directory to write key.pem (0600) and cert.pem into."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing identity in OUT."),
) -> None:
    """Create a party identity: an ECDSA P-256 key and a self-signed certificate.

    Give cert.pem (never key.pem) to your peer; they trust it with `veil keys trust`, and you
    both pin each other by the printed SHA-256 fingerprint.

    Example:
      veil keys init --name alice --out ./alice
    """

    def body() -> None:
        from veil.comm.identity import PartyIdentity

        ident = PartyIdentity.create(name, out, overwrite=force)
        typer.echo(f"identity:    {ident.name}")
        typer.echo(f"key:         {out / 'key.pem'} (mode 0600, keep secret)")
        typer.echo(f"certificate: {out / 'cert.pem'} (give this to your peer)")
        typer.echo(f"fingerprint: {ident.fingerprint}")

    _run(body)


@app.command("show")
def show(
    directory: Path = typer.Argument(..., help="An identity directory made by `veil keys init`."),
) -> None:
    """Show an identity's name, fingerprint, validity and trusted peers.

    Example:
      veil keys show ./alice
    """

    def body() -> None:
        from cryptography import x509

        from veil.comm.identity import PEERS_DIR, PartyIdentity, cert_fingerprint

        ident = PartyIdentity.load(directory)
        cert = x509.load_pem_x509_certificate(ident.cert_pem)
        typer.echo(f"identity:    {ident.name} ({ident.dns_name})")
        typer.echo(f"fingerprint: {ident.fingerprint}")
        after = cert.not_valid_after_utc
        expired = " (EXPIRED)" if after < _dt.datetime.now(_dt.UTC) else ""
        typer.echo(f"valid:       {cert.not_valid_before_utc:%Y-%m-%d} .. {after:%Y-%m-%d}{expired}")
        peers = sorted((directory / PEERS_DIR).glob("*.pem"))
        typer.echo(f"trusted peers: {len(peers)}")
        for p in peers:
            pem = p.read_bytes()
            peer = x509.load_pem_x509_certificate(pem)
            cn = peer.subject.rfc4514_string()
            typer.echo(f"  {cert_fingerprint(pem)}  {cn}")

    _run(body)


@app.command("trust")
def trust(
    directory: Path = typer.Argument(..., help="Your identity directory."),
    peer_cert: Path = typer.Argument(..., help="The peer's cert.pem (or its identity directory)."),
    expect: str | None = typer.Option(
        None, "--expect", help="Fingerprint the peer told you out of band; refuse if it differs."
    ),
) -> None:
    """Trust a peer's certificate, so channels can pin it by fingerprint.

    Example:
      veil keys trust ./alice ./bob.cert.pem --expect 3f2a...
    """

    def body() -> None:
        from veil.comm.identity import PartyIdentity, cert_fingerprint, fingerprints_equal, read_cert
        from veil.errors import InputError

        ident = PartyIdentity.load(directory)
        if expect is not None:
            got = cert_fingerprint(read_cert(peer_cert))
            if not fingerprints_equal(got, expect):
                raise InputError(f"{peer_cert} has fingerprint {got}, not the expected {expect}; not trusted")
        fp = ident.trust(peer_cert)
        typer.echo(f"trusted peer fingerprint: {fp}")

    _run(body)
