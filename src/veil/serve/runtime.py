"""Run KMS, worker and gateway as uvicorn servers (one per process)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from veil.errors import ConfigError

__all__ = ["parse_listen", "run_gateway", "run_kms", "run_worker", "serve_app"]

log = logging.getLogger("veil.serve")


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def _uvicorn_kwargs() -> dict[str, Any]:
    kw: dict[str, Any] = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 5}
    try:
        import uvloop  # noqa: F401

        kw["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        kw["http"] = "httptools"
    except ImportError:
        pass
    return kw


def serve_app(
    app: Any, host: str, port: int, *, certfile: Path | None = None, keyfile: Path | None = None
) -> None:
    import uvicorn

    if (certfile is None) != (keyfile is None):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    cfg = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        **_uvicorn_kwargs(),
    )
    uvicorn.Server(cfg).run()


def run_kms(config: Any, *, certfile: Path | None = None, keyfile: Path | None = None) -> None:
    from veil.serve.kms.app import KMSService, create_app

    svc = KMSService(config)
    host, port = config_listen(config)
    log.warning(
        "veil KMS listening on %s://%s:%d (state %s)",
        "https" if certfile else "http",
        host,
        port,
        config.state_dir,
    )
    serve_app(create_app(svc), host, port, certfile=certfile, keyfile=keyfile)


def config_listen(config: Any) -> tuple[str, int]:
    return getattr(config, "host", "127.0.0.1"), int(getattr(config, "port", 0))


def run_worker(config: Any) -> None:
    from veil.serve.worker.app import Worker, create_app

    worker = Worker(config)
    # SIGTERM during attestation must still exit cleanly
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    worker.start()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fds: list[int] = []
    try:
        cert = key = None
        if config.tls:
            # the shared service identity stays in memory: uvicorn reads it from memfd paths
            cert, key = (
                _memfile(name, data, fds)
                for name, data in (
                    ("veil-tls-cert", worker.tls_cert_pem),
                    ("veil-tls-key", worker.tls_key_pem),
                )
            )
        serve_app(create_app(worker), config.host, config.port, certfile=cert, keyfile=key)
    finally:
        worker.stop()
        for fd in fds:
            os.close(fd)


def _memfile(name: str, data: bytes, fds: list[int]) -> Path:
    if not hasattr(os, "memfd_create"):
        raise ConfigError("worker TLS needs memfd_create (Linux) to keep the key off disk")
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    fds.append(fd)
    os.write(fd, data)
    return Path(f"/proc/self/fd/{fd}")


def run_gateway(config: Any) -> None:
    from veil.serve.gateway.app import Gateway, create_app

    gw = Gateway(config)
    log.warning(
        "veil gateway on http://%s:%d, %d replica(s), policy %s",
        config.host,
        config.port,
        len(config.workers),
        config.policy,
    )
    serve_app(create_app(gw), config.host, config.port)
