"""``veil serve``: package models, run workers / the gateway, bring up a local cluster."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from veil.atomic import atomic_write_bytes
from veil.cli.common import run_cli

app = typer.Typer(
    name="serve",
    help="Confidential inference serving: packages, workers, gateway, cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _read_token(path: Path | None) -> str | None:
    from veil.errors import ConfigError

    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


@app.command("package")
@run_cli
def package(
    model: Path = typer.Argument(
        ..., help="ONNX file, XGBoost JSON model, or Hugging Face causal LM directory."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Package to write (e.g. model.veil)."),
    name: str = typer.Option("", help="Model name (default: file/dir stem)."),
    version: str = typer.Option("1", help="Model version string."),
    adapter: Path | None = typer.Option(None, help="LoRA adapter directory (HF models only)."),
    signing_key: Path = typer.Option(Path("signer.key"), help="Ed25519 signing key (created if missing)."),
    kms: str = typer.Option("", help="KMS URL: create the data key there (a new key version)."),
    admin_token: str = typer.Option("", envvar="VEIL_KMS_ADMIN_TOKEN", help="KMS admin token."),
    kms_ca: Path | None = typer.Option(None, help="CA certificate of an HTTPS KMS."),
    key_out: Path | None = typer.Option(None, help="Without --kms: where to write the data key file."),
) -> None:
    """Encrypt and sign a model into a package; register its key with the KMS or write a key file."""
    from veil.crypto.random import random_bytes
    from veil.errors import ConfigError
    from veil.serve import signing
    from veil.serve.kms.client import KMSClient
    from veil.serve.package import KeyFile, build_package

    name = name or model.stem.replace("_", "-")
    sk = signing.load_or_create(signing_key)
    if kms:
        with KMSClient(kms, admin_token=admin_token, ca=kms_ca) as client:
            info, key = client.new_key(name, sk.public_bytes.hex())
        key_id = info.key_id
        where = f"registered with the KMS as {name} v{info.version} (key id {key_id})"
    else:
        if key_out is None:
            key_out = out.parent / "keys" / (out.stem + ".key.json")
        if key_out.resolve().parent == out.resolve().parent:
            raise ConfigError(
                "the key file must not be written beside the package; choose --key-out elsewhere"
            )
        key = random_bytes(32)
        key_id = random_bytes(16).hex()
        KeyFile(model=name, key_id=key_id, key=key.hex(), signer=sk.public_bytes.hex()).write(key_out)
        where = f"key written to {key_out} (register it with `veil kms register-key`)"
    data = build_package(
        model, name=name, version=version, signing_key=sk, data_key=key, key_id=key_id, adapter=adapter
    )
    atomic_write_bytes(out, data)  # a crash never leaves a torn package (veil.atomic)
    typer.echo(f"wrote {out} ({len(data)} bytes, signer {sk.public_bytes.hex()[:16]}…); {where}")


@app.command("inspect")
@run_cli
def inspect(package_path: Path = typer.Argument(..., help="Package to verify and describe.")) -> None:
    """Verify a package's structure and signature and print its manifest (nothing is decrypted)."""
    from veil.serve.package import read_package

    pkg = read_package(package_path)
    typer.echo(pkg.manifest.model_dump_json(indent=2))


@app.command("measurement")
@run_cli
def measurement() -> None:
    """Print the (simulated-backend) measurement of this worker build, for KMS policies."""
    from veil.serve.worker.app import worker_measurement

    typer.echo(worker_measurement())


@app.command("gramine-manifest")
@run_cli
def gramine_manifest(
    package: Path = typer.Option(..., help="Encrypted model package the worker will serve (a trusted file)."),
    out: Path = typer.Option(Path("veil-worker.manifest.template"), help="Manifest template to write."),
    kms: str = typer.Option(..., "--kms", help="KMS URL the enclave worker attests to."),
    listen: str = typer.Option("0.0.0.0:8081", help="HOST:PORT inside the enclave."),
    enclave_size: str = typer.Option("4G", help="SGX enclave size."),
    kms_ca: Path | None = typer.Option(None, help="CA of an HTTPS KMS (becomes a trusted file)."),
) -> None:
    """Write a Gramine-SGX manifest template running `veil serve worker --tee gramine`.

    Then: gramine-manifest … && gramine-sgx-sign … && gramine-sgx python; put the MRENCLAVE that
    gramine-sgx-sign prints into the KMS policy (--allow-measurement).
    """
    from veil.tee.gramine import write_manifest

    args = [
        "worker",
        "--package",
        str(package.resolve()),
        "--kms",
        kms,
        "--listen",
        listen,
        "--tee",
        "gramine",
    ]
    trusted = [package.resolve()]
    if kms_ca is not None:
        args += ["--kms-ca", str(kms_ca.resolve())]
        trusted.append(kms_ca.resolve())
    path = write_manifest("veil.serve", out, trusted_files=trusted, enclave_size=enclave_size, args=args)
    typer.echo(f"wrote {path}; sign it with gramine-sgx-sign and allow its MRENCLAVE in the KMS policy")


@app.command("worker")
@run_cli
def worker(
    package: Path = typer.Option(..., help="Encrypted model package."),
    kms: str = typer.Option(..., "--kms", help="KMS URL."),
    listen: str = typer.Option("127.0.0.1:8081", help="HOST:PORT."),
    tee: str = typer.Option("simulated", help="TEE backend: simulated (default, INSECURE), gramine, tsm."),
    kms_ca: Path | None = typer.Option(None, help="CA certificate of an HTTPS KMS."),
    worker_id: str = typer.Option("", help="Worker id (default worker-PORT-PID)."),
    reattest_s: float = typer.Option(60.0, help="Re-attest to the KMS every N seconds (0 = never)."),
    attest_timeout_s: float = typer.Option(60.0, help="Keep retrying an unreachable KMS this long."),
    debug_enclave: bool = typer.Option(
        False, help="Run a debug enclave (KMS policies refuse it by default)."
    ),
    tls: bool = typer.Option(
        False, "--tls", help="Serve HTTPS with the shared service identity from the KMS."
    ),
    enclave_threads: int = typer.Option(1, help="Requests computed at once inside the enclave (TCS count)."),
    max_body_bytes: int | None = typer.Option(
        None, help="Largest request body (413 beyond; default VEIL_LIMIT_MAX_REQUEST_BODY_BYTES)."
    ),
    e2e_replay_window_s: float = typer.Option(
        120.0, help="An E2E request is accepted once, within this many seconds of its sealing."
    ),
    verbose: bool = typer.Option(False, "-v"),
) -> None:
    """Run one enclave worker: attest, fetch keys, decrypt the model in memory, serve KServe v2."""
    from veil.serve.runtime import parse_listen, run_worker
    from veil.serve.worker.app import WorkerConfig

    _logging(verbose)
    host, port = parse_listen(listen)
    run_worker(
        WorkerConfig(
            package=package,
            kms_url=kms,
            kms_ca=kms_ca,
            host=host,
            port=port,
            tee_backend=tee,
            worker_id=worker_id,
            reattest_s=reattest_s,
            attest_timeout_s=attest_timeout_s,
            debug_enclave=debug_enclave,
            tls=tls,
            enclave_threads=enclave_threads,
            max_body_bytes=max_body_bytes,
            e2e_replay_window_s=e2e_replay_window_s,
        )
    )


@app.command("gateway")
@run_cli
def gateway(
    worker_urls: list[str] = typer.Option([], "--worker", help="Worker URL (repeat)."),
    listen: str = typer.Option("127.0.0.1:8080", help="HOST:PORT."),
    policy: str = typer.Option("round-robin", help="Routing policy (veil.serve.routing)."),
    poll_s: float = typer.Option(0.5, help="Replica status poll interval."),
    capture_file: Path | None = typer.Option(None, help="DEBUG: record every request body the gateway sees."),
    worker_ca: Path | None = typer.Option(None, help="HTTPS to workers, pinning this service certificate."),
    admin_token_file: Path | None = typer.Option(
        None, help="Token enabling POST/DELETE /veil/v1/replicas (add / drain replicas at run time)."
    ),
    request_timeout_s: float | None = typer.Option(
        None,
        help="Budget of one request, retries included (504 after; default VEIL_LIMIT_REQUEST_TIMEOUT_S).",
    ),
    replica_timeout_s: float | None = typer.Option(
        None, help="One replica's share of the budget before failing over (default: all of it)."
    ),
    max_body_bytes: int | None = typer.Option(
        None, help="Largest request body (413 beyond; default VEIL_LIMIT_MAX_REQUEST_BODY_BYTES)."
    ),
    max_inflight_per_client: int | None = typer.Option(
        None,
        help="Requests in flight per client address "
        "(429 beyond; default VEIL_LIMIT_MAX_INFLIGHT_REQUESTS_PER_CLIENT).",
    ),
    verbose: bool = typer.Option(False, "-v"),
) -> None:
    """Run the KServe v2 gateway in front of the workers."""
    from veil.serve.gateway.app import GatewayConfig
    from veil.serve.runtime import parse_listen, run_gateway

    _logging(verbose)
    host, port = parse_listen(listen)
    timeout: dict[str, Any] = {} if request_timeout_s is None else {"request_timeout_s": request_timeout_s}
    run_gateway(
        GatewayConfig(
            workers=list(worker_urls),
            host=host,
            port=port,
            policy=policy,
            poll_s=poll_s,
            capture_file=capture_file,
            worker_ca=worker_ca,
            admin_token=_read_token(admin_token_file),
            replica_timeout_s=replica_timeout_s,
            max_body_bytes=max_body_bytes,
            max_inflight_per_client=max_inflight_per_client,
            **timeout,
        )
    )


@app.command("up")
@run_cli
def up(
    model: list[Path] = typer.Option(..., "--model", help="Package(s) to serve (repeat)."),
    workers: int = typer.Option(3, help="Worker replicas per model."),
    key_file: list[Path] = typer.Option([], "--key-file", help="Data key file(s) to register with the KMS."),
    state: Path = typer.Option(Path(".veil-serve"), help="State directory (KMS state, logs, admin token)."),
    port: int = typer.Option(8080, help="Gateway port (0 = any free port)."),
    policy: str = typer.Option("round-robin", help="Routing policy."),
    tee: str = typer.Option("simulated", help="TEE backend for workers and KMS."),
    worker_tls: bool = typer.Option(
        False, help="Gateway -> workers over HTTPS with the shared service identity."
    ),
) -> None:
    """Start KMS, workers and gateway on 127.0.0.1; Ctrl-C / SIGTERM stops everything."""
    from veil.serve.cluster.local import LocalCluster

    _logging(False)
    cluster = LocalCluster(
        packages=list(model),
        workers=workers,
        state_dir=state,
        key_files=list(key_file),
        gateway_port=port,
        policy=policy,
        tee=tee,
        allow_simulated=tee == "simulated",
        worker_tls=worker_tls,
    )
    stop = threading.Event()

    def _signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    try:
        url = cluster.start()
        label = " [SIMULATED TEE: no hardware protection]" if tee == "simulated" else ""
        typer.echo(f"veil serving at {url}  (KServe v2: {url}/v2/models/<name>/infer){label}")
        typer.echo(
            f"KMS at {cluster.kms_url}; admin token in {state / 'admin-token'}; logs in {state / 'logs'}"
        )
        sys.stdout.flush()
        while not stop.wait(0.5):
            dead = [p.name for p in cluster.procs if p.popen is not None and p.popen.poll() is not None]
            if "kms" in dead or "gateway" in dead:
                typer.echo(f"error: {', '.join(dead)} exited; shutting down", err=True)
                break
            for name in cluster.respawn_dead_workers():
                typer.echo(f"worker {name} exited; restarted it (it re-attests to the KMS)", err=True)
    finally:
        cluster.stop()
        typer.echo("stopped")


# ----------------------------------------------------------------------------- load (issue 7)
# `veil serve load` belongs to the scaling work (veil.serve.load); kept in its own function.


@app.command("load")
@run_cli
def load(
    url: str = typer.Option("http://127.0.0.1:8080", help="Gateway URL (loopback only)."),
    model: str = typer.Option(..., help="Model name to call (/v2/models/NAME/infer)."),
    rate: float = typer.Option(10.0, help="Base arrival rate, requests/s (Poisson)."),
    pattern: str = typer.Option("steady", help="steady | spike | diurnal."),
    duration: float = typer.Option(60.0, help="Seconds of arrivals; the run stops by itself."),
    spike_factor: float = typer.Option(3.0, help="spike: rate multiplier during the spike."),
    spike_start: float | None = typer.Option(None, help="spike: start, s (default: duration/3)."),
    spike_len: float | None = typer.Option(None, help="spike: length, s (default: duration/3)."),
    body: Path | None = typer.Option(None, help="JSON v2 request body (default: zeros from model metadata)."),
    slo_ms: float = typer.Option(500.0, help="Latency SLO for the attainment figure."),
    out: Path = typer.Option(Path("load.jsonl"), help="Per-request latency JSONL."),
    plot: Path | None = typer.Option(None, help="PNG of latency and replicas over time (default: OUT.png)."),
    seed: int = typer.Option(0, help="Seed of the arrival process."),
    max_inflight: int = typer.Option(2000, help="In-flight cap; arrivals over it are recorded as dropped."),
) -> None:
    """Open-loop load (Poisson arrivals) against a local gateway; JSONL + PNG + summary."""
    import asyncio
    import json as _json

    from veil.errors import InputError
    from veil.serve import load as L

    pat = L.LoadPattern(
        kind=pattern,
        rate=rate,
        duration_s=duration,
        spike_factor=spike_factor,
        spike_start_s=spike_start,
        spike_len_s=spike_len,
    )
    L.check_loopback(url)
    raw = None
    if body is not None:
        try:
            raw = body.read_bytes()
            _json.loads(raw)
        except (OSError, ValueError) as exc:
            raise InputError(f"--body {body}: {exc}") from None
    typer.echo(f"load: {pattern} {rate:g} req/s for {duration:g}s against {url} (model {model})")
    res = asyncio.run(L.load_gateway(url, model, pat, body=raw, seed=seed, max_inflight=max_inflight))
    L.write_jsonl(res.records, out)
    png = plot or out.with_suffix(".png")
    L.plot_latency(
        {model: (res.records, res.replicas)},
        png,
        slo_s=slo_ms / 1e3,
        title=f"veil serve load: {pattern}, base {rate:g} req/s",
        rate=pat.rate_at,
    )
    s = L.summarize(res.records, slo_ms / 1e3)
    typer.echo(
        f"{s['requests']} requests, {s['errors']} errors, p50 {s['p50_s'] * 1e3:.1f} ms, "
        f"p99 {s['p99_s'] * 1e3:.1f} ms, SLO {slo_ms:g} ms attained by {s['slo_attainment_pct']:.2f}%"
    )
    typer.echo(f"wrote {out} and {png}")
