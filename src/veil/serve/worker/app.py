"""The enclave worker: attests to the KMS, decrypts its model in enclave memory, serves KServe v2.

Start-up: parse and verify the package (signature, hash) -> load the TEE backend (``simulated``
by default, loudly labelled) -> challenge / attested key exchange with the KMS -> check that the
released key belongs to the package signer -> decrypt the payload in memory -> build the runner
-> ready. A background thread re-attests every ``reattest_s`` seconds (a restarted KMS is
re-attested to; the model stays loaded).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from veil.comm import codec
from veil.crypto.aead import X25519KeyPair
from veil.errors import AttestationError, KMSError, ProtocolError, ResourceLimitError, VeilError
from veil.limits import SessionLimiter
from veil.serve import v2
from veil.serve.asgi import FastPost
from veil.serve.e2e import (
    E2E_CONTENT_TYPE,
    REPLAY_CACHE_ENTRIES,
    REPLAY_WINDOW_S,
    ReplayCache,
    ServerE2E,
    ServiceEvidence,
    identity_report_data,
)
from veil.serve.errors import (
    InferenceInputError,
    ModelNotFound,
    PackageError,
    ServeError,
    openapi_error_responses,
)
from veil.serve.kms.client import KMSClient
from veil.serve.kms.wire import KeyRelease
from veil.serve.package import Package, decrypt_payload, read_package
from veil.serve.worker.runners import HFRunner, ModelRunner, load_runner
from veil.tee import Enclave, load_enclave

__all__ = ["Worker", "WorkerConfig", "create_app", "worker_code", "worker_measurement"]

log = logging.getLogger("veil.serve.worker")
_SERVE_DIR = Path(__file__).resolve().parent.parent


def worker_code() -> list[Path]:
    """What the worker enclave measures: the worker code, the package/v2/e2e modules."""
    return [_SERVE_DIR / "worker", _SERVE_DIR / "package.py", _SERVE_DIR / "v2.py", _SERVE_DIR / "e2e.py"]


WORKER_ENCLAVE_CONFIG: dict[str, Any] = {"component": "veil-serve-worker", "version": 1}


def worker_measurement() -> str:
    """The simulated-backend measurement of this worker build (what a KMS policy allows)."""
    from veil.tee import measure

    return measure(worker_code(), WORKER_ENCLAVE_CONFIG)


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    package: Path
    kms_url: str
    kms_ca: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8081, ge=0, le=65535)
    tee_backend: str = "simulated"
    debug_enclave: bool = False
    worker_id: str = Field(default="", max_length=64)
    reattest_s: float = Field(default=60.0, ge=0)
    attest_timeout_s: float = Field(default=60.0, gt=0)
    trusted_signers: set[str] | None = None
    tls: bool = False
    """Serve HTTPS with the shared service TLS identity released by the KMS (kept in memory)."""
    enclave_threads: int = Field(default=1, ge=1, le=256)
    """Requests computed at once (SGX TCS count); others queue."""
    max_body_bytes: int | None = Field(default=None, ge=1024)
    """Request body cap (413 beyond it); default VEIL_LIMIT_MAX_REQUEST_BODY_BYTES."""
    e2e_replay_window_s: float = Field(default=REPLAY_WINDOW_S, gt=0, le=3600)
    """A sealed E2E request is accepted once, and only within this many seconds of its sealing."""
    e2e_replay_entries: int = Field(default=REPLAY_CACHE_ENTRIES, ge=1)
    """Bound on the E2E replay cache (salts remembered)."""
    max_sessions_per_client: int | None = Field(default=None, ge=1)
    """E2E requests one client key may have in flight (429 beyond it);
    default VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT."""


class Worker:
    """All state of one worker process (HTTP-independent)."""

    def __init__(self, cfg: WorkerConfig, *, enclave: Enclave | None = None) -> None:
        self.cfg = cfg
        self.worker_id = cfg.worker_id or f"worker-{cfg.port}-{os.getpid()}"
        self.package: Package = read_package(Path(cfg.package), trusted_signers=cfg.trusted_signers)
        self.manifest = self.package.manifest
        opts: dict[str, Any] = {"debug": cfg.debug_enclave} if cfg.tee_backend == "simulated" else {}
        self.enclave = enclave or load_enclave(
            cfg.tee_backend, code=worker_code(), config=WORKER_ENCLAVE_CONFIG, **opts
        )
        self.tee_label = "simulated" if self.enclave.simulated else self.enclave.backend
        self.runner: ModelRunner | None = None
        self.e2e: ServerE2E | None = None
        self.e2e_sessions = SessionLimiter(cfg.max_sessions_per_client, what="end-to-end requests in flight")
        self.identity_pub = b""
        self.tls_cert_pem = b""
        self.tls_key_pem = b""
        self.ready = False
        self.outstanding = 0
        self.epc: Any = None
        self._stop = threading.Event()
        self._ewma = 0.0
        reg = self.registry = CollectorRegistry()
        self.m_enclave = Gauge(
            "veil_worker_enclave_bytes", "Model bytes held in enclave memory", registry=reg
        )
        self.m_pressure = Gauge(
            "veil_worker_epc_paging_pressure", "EPC paging pressure of this host", registry=reg
        )
        self.m_outstanding = Gauge("veil_worker_outstanding_requests", "Requests in progress", registry=reg)
        self.m_service = Gauge(
            "veil_worker_service_time_seconds", "EWMA per-request service time", registry=reg
        )
        self.m_requests = Counter("veil_worker_requests", "Requests served", ["outcome"], registry=reg)
        self.m_latency = Histogram(
            "veil_worker_request_seconds",
            "Request latency inside the worker",
            registry=reg,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        self.m_attest = Counter(
            "veil_worker_attestations", "Attestations to the KMS", ["outcome"], registry=reg
        )
        self.m_info = Gauge(
            "veil_worker_info",
            "Worker identity",
            ["tee", "model", "version", "format", "worker"],
            registry=reg,
        )
        self.m_info.labels(
            self.tee_label, self.manifest.name, self.manifest.version, self.manifest.format, self.worker_id
        ).set(1)

    # ------------------------------------------------------------------ attestation
    def attest_once(self) -> KeyRelease:
        with KMSClient(self.cfg.kms_url, ca=self.cfg.kms_ca, timeout=10.0) as kms:
            try:
                rel = kms.attest_and_release(self.enclave, [self.manifest.key_id], worker_id=self.worker_id)
            except VeilError:
                self.m_attest.labels("failed").inc()
                raise
        self.m_attest.labels("ok").inc()
        return rel

    def start(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Attest (retrying until ``attest_timeout_s``), decrypt and load the model."""
        deadline = clock() + self.cfg.attest_timeout_s
        delay = 0.2
        while True:
            try:
                rel = self.attest_once()
                break
            except KMSError as exc:
                # refusals are final; an unreachable or busy (429) KMS is retried until the deadline
                busy = "unreachable" in str(exc) or "-> 429" in str(exc)
                if not busy or clock() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        key = rel.keys[0]
        if not hmac.compare_digest(key.signer, self.manifest.signer):
            raise PackageError(
                "the KMS key for this package belongs to another signer (package substituted?)"
            )
        plain = decrypt_payload(self.package, key.key)
        self.runner = load_runner(self.manifest, plain)
        del plain
        ident = X25519KeyPair.from_private_bytes(rel.identity.x25519_private)
        if ident.public_bytes != rel.identity.x25519_public:
            raise KMSError("released service identity is inconsistent")
        self.e2e = ServerE2E(
            ident, replay=ReplayCache(self.cfg.e2e_replay_window_s, self.cfg.e2e_replay_entries)
        )
        self.identity_pub = ident.public_bytes
        self.tls_cert_pem = rel.identity.tls_cert_pem
        self.tls_key_pem = rel.identity.tls_key_pem
        self.m_enclave.set(self.runner.footprint_bytes)
        self._open_epc()
        self.ready = True
        log.warning(
            "worker %s ready: model %s v%s on a %s TEE",
            self.worker_id,
            self.manifest.name,
            self.manifest.version,
            self.tee_label.upper() if self.enclave.simulated else self.tee_label,
        )
        if self.cfg.reattest_s > 0:
            threading.Thread(target=self._reattest_loop, name="veil-reattest", daemon=True).start()

    def _open_epc(self) -> None:
        try:
            from veil.serve import epc
        except ImportError:  # the EPC model is optional
            return
        try:
            self.epc = epc.open_epc(
                simulated=self.enclave.simulated,
                worker_id=self.worker_id,
                enclave_mb=self.runner.footprint_bytes / 2**20 if self.runner else 0.0,
            )
        except VeilError as exc:
            log.warning("EPC monitor unavailable: %s", exc)

    def _reattest_loop(self) -> None:
        while not self._stop.wait(self.cfg.reattest_s):
            try:
                self.attest_once()
            except VeilError as exc:
                log.warning("re-attestation to the KMS failed (model stays loaded): %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self.epc is not None:
            self.epc.close()

    # ------------------------------------------------------------------ inference
    def paging_delay(self) -> float:
        if self.epc is None:
            return 0.0
        self.m_pressure.set(self.epc.paging_pressure())
        return float(self.epc.paging_delay_s())

    def observe(self, seconds: float, ok: bool) -> None:
        self.m_requests.labels("ok" if ok else "error").inc()
        self.m_latency.observe(seconds)
        self._ewma = seconds if self._ewma == 0 else 0.8 * self._ewma + 0.2 * seconds
        self.m_service.set(self._ewma)

    def infer(self, body: bytes, header_length: int | None) -> tuple[bytes, int | None]:
        if self.runner is None:
            raise ServeError("model not loaded")
        req = v2.decode_request(body, header_length)
        out = self.runner.infer(req.inputs, req.outputs)
        params = {"tee": self.tee_label}
        return v2.encode_response(
            self.manifest.name,
            self.manifest.version,
            req.id,
            out,
            binary=req.binary_outputs,
            all_binary=req.all_binary,
            parameters=params,
        )

    def complete(self, body: bytes) -> bytes:
        if not isinstance(self.runner, HFRunner):
            raise InferenceInputError(f"model {self.manifest.name!r} is not a language model")
        try:
            doc = CompletionRequest.model_validate_json(body)
        except ValueError as exc:
            raise InferenceInputError(f"bad completion request: {exc}") from None
        if doc.model and doc.model != self.manifest.name:
            raise ModelNotFound(f"no model {doc.model!r} here")
        text, ids, new = self.runner.complete(doc.prompt, doc.max_tokens)
        return msgspec.json.encode(
            {
                "id": doc.id or "",
                "object": "text_completion",
                "model": self.manifest.name,
                "tee": self.tee_label,
                "choices": [{"index": 0, "text": text, "token_ids": new, "finish_reason": "length"}],
                "usage": {
                    "prompt_tokens": len(ids),
                    "completion_tokens": len(new),
                    "total_tokens": len(ids) + len(new),
                },
            }
        )

    def metadata(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name,
            "versions": [m.version],
            "platform": m.format,
            "inputs": [t.model_dump() for t in m.inputs],
            "outputs": [t.model_dump() for t in m.outputs],
            "parameters": {"tee": self.tee_label, "signer": m.signer},
        }

    def service_evidence(self, nonce: bytes) -> bytes:
        if not self.ready:
            raise ServeError("worker not ready")
        if not 16 <= len(nonce) <= 64:
            raise InferenceInputError("nonce must be 16..64 bytes")
        ev = self.enclave.attest(identity_report_data(self.identity_pub, self.tls_cert_pem, nonce))
        return codec.encode(
            ServiceEvidence(evidence=ev, x25519_public=self.identity_pub, tls_cert_pem=self.tls_cert_pem)
        )


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    prompt: str | list[int]
    max_tokens: int = Field(default=16, ge=1, le=512)
    id: str = Field(default="", max_length=256)


def _err(exc: Exception, status: int | None = None) -> JSONResponse:
    if status is None:
        status = (
            404
            if isinstance(exc, ModelNotFound)
            else 400
            if isinstance(exc, InferenceInputError | ProtocolError | VeilError)
            else 500
        )
        if isinstance(exc, ServeError):
            status = 503
    return JSONResponse({"error": str(exc)}, status_code=status)


def create_app(worker: Worker) -> FastPost:
    app = FastAPI(title="veil worker", version="1", responses=openapi_error_responses())
    name = worker.manifest.name

    def _model(model: str) -> None:
        if model != name:
            raise ModelNotFound(f"model {model!r} is not served here (this worker serves {name!r})")

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse(
            {"ready": worker.ready, "tee": worker.tee_label}, status_code=200 if worker.ready else 503
        )

    @app.get("/v2")
    async def server_meta() -> dict[str, Any]:
        return {
            "name": "veil-worker",
            "version": "1",
            "extensions": ["binary_tensor_data", "veil_e2e"],
            "tee": worker.tee_label,
        }

    @app.get("/v2/models/{model}")
    async def model_meta(model: str) -> Response:
        try:
            _model(model)
        except ModelNotFound as exc:
            return _err(exc)
        return JSONResponse(worker.metadata())

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> Response:
        ok = model == name and worker.ready
        return JSONResponse(
            {"name": model, "ready": ok}, status_code=200 if ok else 404 if model != name else 503
        )

    enclave_threads = asyncio.Semaphore(worker.cfg.enclave_threads)
    offload = worker.manifest.format == "hf-causal-lm"  # long compute: keep the event loop free

    async def _run(fn: Callable[[], tuple[bytes, int | None]], model: str) -> tuple[int, bytes, int | None]:
        t0 = time.perf_counter()
        worker.outstanding += 1
        worker.m_outstanding.set(worker.outstanding)
        ok = False
        try:
            _model(model)
            if not worker.ready or worker.e2e is None:
                raise ServeError("worker not ready")
            # the enclave's threads (TCS) are the unit of concurrency: a request holds one while it
            # pages (simulated EPC delay) and computes, so paging is not free concurrency
            async with enclave_threads:
                delay = worker.paging_delay()
                if delay > 0:
                    await asyncio.sleep(delay)
                body, hl = await asyncio.to_thread(fn) if offload else fn()
            ok = True
            status = 200
        except (VeilError, ValueError) as exc:
            resp = _err(exc)
            status, body, hl = resp.status_code, bytes(resp.body), None
        finally:
            worker.outstanding -= 1
            worker.m_outstanding.set(worker.outstanding)
            worker.observe(time.perf_counter() - t0, ok)
        return status, body, hl

    async def dispatch(
        headers: dict[str, str], raw: bytes, model: str, path: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Answer one inference / completion POST: (status, headers, body)."""
        if headers.get("content-type", "").startswith(E2E_CONTENT_TYPE):
            e2e = worker.e2e
            if e2e is None:
                resp = _err(ServeError("worker not ready"))
                return resp.status_code, {"content-type": "application/json"}, bytes(resp.body)
            try:
                inner, ihl, rk = e2e.open(raw, model, path)
            except (VeilError, msgspec.DecodeError) as exc:
                resp = _err(ProtocolError(f"end-to-end request rejected: {exc}"))
                return resp.status_code, {"content-type": "application/json"}, bytes(resp.body)
            client = rk.client_public.hex()
            try:  # hardening (issue 9): concurrent E2E requests per (authenticated) client key
                worker.e2e_sessions.acquire(client)
            except ResourceLimitError as exc:
                resp = _err(exc, 429)
                return resp.status_code, {"content-type": "application/json"}, bytes(resp.body)
            try:
                status, body, rhl = await _run(lambda: _inner(path, inner, ihl), model)
            finally:
                worker.e2e_sessions.release(client)
            return 200, {"content-type": E2E_CONTENT_TYPE}, e2e.seal(rk, status, body, rhl)
        hl_s = headers.get("inference-header-content-length")
        try:
            hl = int(hl_s) if hl_s is not None else None
        except ValueError:
            resp = _err(InferenceInputError("bad Inference-Header-Content-Length"))
            return resp.status_code, {"content-type": "application/json"}, bytes(resp.body)
        status, body, rhl = await _run(lambda: _inner(path, raw, hl), model)
        out = {"content-type": "application/json"}
        if rhl is not None:
            out["inference-header-content-length"] = str(rhl)
        return status, out, body

    def _inner(path: str, body: bytes, hl: int | None) -> tuple[bytes, int | None]:
        if path == "infer":
            return worker.infer(body, hl)
        return worker.complete(body), None

    async def _dispatch(request: Request, model: str, path: str) -> Response:
        status, headers, body = await dispatch(dict(request.headers), await request.body(), model, path)
        media = headers.pop("content-type", "application/json")
        return Response(body, status_code=status, headers=headers, media_type=media)

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request) -> Response:
        return await _dispatch(request, model, "infer")

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_v(model: str, version: str, request: Request) -> Response:
        if version != worker.manifest.version:
            return _err(ModelNotFound(f"version {version!r} of {model!r} is not served here"))
        return await _dispatch(request, model, "infer")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _dispatch(request, request.headers.get("x-veil-model", name), "completions")

    @app.post("/v2/veil/attestation")
    async def attestation(request: Request) -> Response:
        try:
            doc = msgspec.json.decode(await request.body())
            nonce = bytes.fromhex(doc["nonce"])
            return Response(worker.service_evidence(nonce), media_type="application/msgpack")
        except (KeyError, TypeError, ValueError, msgspec.DecodeError):
            return _err(InferenceInputError('body must be {"nonce": hex}'))
        except VeilError as exc:
            return _err(exc)

    @app.get("/veil/v1/status")
    async def status() -> dict[str, Any]:
        return {
            "worker_id": worker.worker_id,
            "ready": worker.ready,
            "tee": worker.tee_label,
            "measurement": worker.enclave.measurement,
            "model": worker.manifest.name,
            "enclave_bytes": worker.runner.footprint_bytes if worker.runner else 0,
            "pid": os.getpid(),
            "service_time_s": worker._ewma,
            "outstanding": worker.outstanding,
            "epc_pressure": worker.epc.paging_pressure() if worker.epc is not None else 0.0,
            "host": str(getattr(worker.epc, "host", "") or os.environ.get("VEIL_SIM_HOST", "local")),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        if worker.epc is not None:
            worker.m_pressure.set(worker.epc.paging_pressure())
        return Response(generate_latest(worker.registry), media_type="text/plain; version=0.0.4")

    async def fast_infer(
        m: re.Match[str], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        return await dispatch(headers, body, m.group(1), "infer")

    async def fast_completions(
        m: re.Match[str], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        return await dispatch(headers, body, headers.get("x-veil-model", name), "completions")

    _ = (np, AttestationError)
    return FastPost(
        app,
        [(r"/v2/models/([^/]+)/infer", fast_infer), (r"/v1/completions", fast_completions)],
        max_body=worker.cfg.max_body_bytes,
    )
