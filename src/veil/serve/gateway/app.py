"""The gateway: Open Inference Protocol (KServe v2) over HTTP in front of the enclave workers.

It never decrypts anything: plaintext v2 bodies and end-to-end encrypted envelopes are forwarded
as opaque bytes to a replica chosen by the routing policy. A replica that fails at the
connection level (died, refused, reset, not ready) is marked unhealthy and the request goes to
another replica with the same request id; answers are cached briefly by request id so that a
client retry of an id already answered gets the same answer instead of a second execution, and
concurrent duplicates wait for the first.

Replica health, EPC pressure and service time come from polling each worker's status endpoint.

Limits (issue 9): a request gets ``request_timeout_s`` in all (default
``VEIL_LIMIT_REQUEST_TIMEOUT_S``), retries included, and each replica ``replica_timeout_s`` of it
(default: all of it); a replica that times out with budget left is marked unhealthy and the request
goes to another one, and when the budget is spent the client gets a clean 504. Request bodies
above ``max_body_bytes`` (default ``VEIL_LIMIT_MAX_REQUEST_BODY_BYTES``) get a 413 before they are
read, and one client address may have ``max_inflight_per_client`` inference requests in flight
(default ``VEIL_LIMIT_MAX_INFLIGHT_REQUESTS_PER_CLIENT``; 429 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from veil.crypto.random import random_bytes
from veil.errors import ConfigError
from veil.limits import SessionLimiter, get_limits
from veil.serve.asgi import FastPost
from veil.serve.e2e import E2E_CONTENT_TYPE
from veil.serve.errors import ServeError, openapi_error_responses
from veil.serve.gateway.router import NoReplicaAvailable, ReplicaState, Router

__all__ = ["Gateway", "GatewayConfig", "create_app"]

log = logging.getLogger("veil.serve.gateway")

_FORWARD_HEADERS = ("content-type", "inference-header-content-length", "x-veil-model")
_RETRYABLE_STATUS = {502, 503}


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: list[str] = Field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    policy: str = "round-robin"
    poll_s: float = Field(default=0.5, gt=0)
    request_timeout_s: float = Field(default_factory=lambda: get_limits().request_timeout_s, gt=0)
    """Deadline of one request at the gateway, retries on other replicas included (504 after it);
    default VEIL_LIMIT_REQUEST_TIMEOUT_S."""
    replica_timeout_s: float | None = Field(default=None, gt=0)
    """Deadline of one attempt on one replica (default: request_timeout_s); a replica that misses
    it is marked unhealthy and the request is re-sent to another within the remaining time."""
    max_body_bytes: int | None = Field(default=None, ge=1024)
    """Request body cap (413); default VEIL_LIMIT_MAX_REQUEST_BODY_BYTES."""
    max_inflight_per_client: int | None = Field(default=None, ge=1)
    """Inference requests one client address may have in flight (429 beyond);
    default VEIL_LIMIT_MAX_INFLIGHT_REQUESTS_PER_CLIENT."""
    max_attempts: int = Field(default=4, ge=1, le=32)
    dedup_entries: int = Field(default=4096, ge=0)
    admin_token: str | None = Field(default=None, min_length=16)
    """Enables POST/DELETE /veil/v1/replicas (add / drain replicas at run time) for this bearer token."""
    worker_ca: Path | None = None
    """Talk HTTPS to workers and pin this certificate (the shared service identity's)."""
    capture_file: Path | None = None
    """Debug/test only: append every request and response body the gateway handled (what it can see)."""


def pinned_context(cert: Path) -> ssl.SSLContext:
    """TLS client context that trusts exactly ``cert`` (the service identity every replica presents).

    Host names are not checked: the certificate is pinned, and replicas on any host present it.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(cert))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the worker certificate {cert}: {exc}") from None
    return ctx


class ReplicaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+$", max_length=256)
    host: str = Field(default="local", pattern=r"^[A-Za-z0-9._-]{1,64}$")


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.router = Router(cfg.policy)
        for url in cfg.workers:
            self.router.add(url)
        self.session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Future[tuple[int, dict[str, str], bytes]]] = {}
        self._done: OrderedDict[str, tuple[int, dict[str, str], bytes]] = OrderedDict()
        self._capture = cfg.capture_file.open("ab") if cfg.capture_file else None
        reg = self.registry = CollectorRegistry()
        self.m_requests = Counter(
            "veil_gateway_requests", "Requests answered", ["path", "status"], registry=reg
        )
        self.m_latency = Histogram(
            "veil_gateway_request_seconds",
            "End-to-end latency at the gateway",
            registry=reg,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
        )
        self.m_retries = Counter("veil_gateway_retries", "Requests re-sent to another replica", registry=reg)
        self.m_dedup = Counter(
            "veil_gateway_deduplicated", "Duplicate request ids answered from cache", registry=reg
        )
        self.m_healthy = Gauge("veil_gateway_replicas_healthy", "Healthy replicas", registry=reg)
        self.m_known = Gauge("veil_gateway_replicas", "Known replicas", registry=reg)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        ssl_ctx: ssl.SSLContext | bool = True
        if self.cfg.worker_ca is not None:
            ssl_ctx = pinned_context(self.cfg.worker_ca)
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ssl=ssl_ctx)
        self.session = aiohttp.ClientSession(
            # per-request deadlines are set in forward(); connecting gets 2 s of them
            connector=conn, timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0)
        )
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        self._poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._poller
        if self.session is not None:
            await self.session.close()
        if self._capture is not None:
            self._capture.close()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_s)
            await self.poll_once()

    async def _poll(self, r: ReplicaState) -> None:
        if self.session is None:
            return
        try:
            async with self.session.get(
                r.url + "/veil/v1/status", timeout=aiohttp.ClientTimeout(total=2.0)
            ) as resp:
                doc = await resp.json() if resp.status == 200 else {"ready": False}
        except TimeoutError:
            # a slow answer on a busy host is not a dead replica: two in a row are
            r.failures += 1
            if r.failures < 2:
                return
            doc = {}
        except (aiohttp.ClientError, ValueError):
            doc = {}
        if doc.get("ready"):
            if not r.healthy:
                log.info("replica %s is ready (%s)", r.id, doc.get("tee", "?"))
            r.healthy = True
            r.failures = 0
            r.models = frozenset([str(doc.get("model", ""))])
            r.tee = str(doc.get("tee", ""))
            r.epc_pressure = float(doc.get("epc_pressure", 0.0) or 0.0)
            r.service_time_s = float(doc.get("service_time_s", 0.0) or 0.0)
            r.host = str(doc.get("host") or r.host)
        else:
            if r.healthy:
                log.warning("replica %s is not ready / unreachable", r.id)
            r.healthy = False

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(r) for r in list(self.router.replicas.values())))
        self.m_known.set(len(self.router.replicas))
        self.m_healthy.set(sum(1 for r in self.router.replicas.values() if r.healthy))

    # ------------------------------------------------------------------ forwarding
    def _record(self, body: bytes) -> None:
        if self._capture is not None:
            self._capture.write(len(body).to_bytes(8, "big") + body)
            self._capture.flush()

    async def forward(
        self, method: str, path: str, model: str, body: bytes, headers: dict[str, str], request_id: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Send to a replica; on a connection-level failure, re-send to another one."""
        if self.session is None:
            raise ServeError("gateway not started")
        tried: list[str] = []
        last = "no replica"
        loop = asyncio.get_running_loop()
        budget = self.cfg.request_timeout_s
        deadline = loop.time() + budget
        per_try = min(self.cfg.replica_timeout_s or budget, budget)
        timed_out = False
        for attempt in range(self.cfg.max_attempts):
            if loop.time() >= deadline:
                timed_out = True
                break
            try:
                r = self.router.choose(model, request_id, exclude=tried)
            except NoReplicaAvailable as exc:
                if attempt == 0 or not tried:
                    last = str(exc)
                break
            tried.append(r.id)
            if attempt:
                self.m_retries.inc()
            r.outstanding += 1
            t0 = time.perf_counter()
            until = min(deadline, loop.time() + per_try)
            try:
                async with asyncio.timeout_at(until):
                    async with self.session.request(
                        method, r.url + path, data=body, headers=headers
                    ) as resp:
                        data = await resp.read()
                        status = resp.status
                        out_h = {
                            k: v
                            for k, v in resp.headers.items()
                            if k.lower() in ("content-type", "inference-header-content-length")
                        }
            except TimeoutError:
                r.failures += 1
                last = f"replica {r.id} did not answer in time"
                # the request's budget is spent: a clean 504, no more tries. The loop may fire the
                # timeout up to its clock resolution early, so the bound that applied decides, not
                # loop.time() alone (it could read just under the deadline: a 503 instead of a 504)
                if until >= deadline or loop.time() >= deadline:
                    timed_out = True
                    break
                r.healthy = False  # a replica past its own deadline: try another in the time left
                log.warning("request %s: %s; retrying on another replica", request_id, last)
                continue
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                r.healthy = False
                r.failures += 1
                last = f"replica {r.id} failed: {type(exc).__name__}"
                log.warning("request %s: %s; retrying on another replica", request_id, last)
                continue
            finally:
                r.outstanding -= 1
            if status in _RETRYABLE_STATUS and b"not ready" in data:
                r.healthy = False
                last = f"replica {r.id} not ready"
                continue
            r.observe_latency(time.perf_counter() - t0)
            out_h["x-veil-replica"] = r.id
            out_h["x-request-id"] = request_id
            return status, out_h, data
        if timed_out:
            log.warning("request %s: gateway timeout after %g s (%s)", request_id, budget, last)
            return (
                504,
                {"content-type": "application/json", "x-request-id": request_id},
                msgspec.json.encode(
                    {
                        "error": f"gateway timeout: no answer within {budget:g} s "
                        f"(request_timeout_s; {last})",
                        "kind": "GatewayTimeout",
                    }
                ),
            )
        # hardening (issue 9): a model that no replica serves is "not found" (404), not "unavailable"
        reps = list(self.router.replicas.values())
        if model and not tried and reps and all(r.models for r in reps):
            if not any(model in r.models for r in reps):
                return (
                    404,
                    {"content-type": "application/json"},
                    msgspec.json.encode({"error": f"model {model[:128]!r} not found"}),
                )
        return (
            503,
            {"content-type": "application/json"},
            msgspec.json.encode({"error": f"service unavailable: {last}"}),
        )

    async def handle(self, method: str, path: str, model: str, request: Request) -> Response:
        status, out_h, data = await self.handle_raw(
            method, path, model, dict(request.headers), await request.body()
        )
        media = out_h.pop("content-type", "application/json")
        return Response(data, status_code=status, headers=out_h, media_type=media)

    async def handle_raw(
        self, method: str, path: str, model: str, req_headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """Forward one request (headers lower-cased); returns (status, headers, body)."""
        t0 = time.perf_counter()
        self._record(body)
        client_rid = req_headers.get("x-request-id")
        rid = client_rid or random_bytes(12).hex()
        dedup = bool(client_rid) and self.cfg.dedup_entries > 0
        if len(rid) > 128:
            return 400, {"content-type": "application/json"}, b'{"error":"x-request-id too long"}'
        headers = {k: v for k in _FORWARD_HEADERS if (v := req_headers.get(k)) is not None}
        headers["x-request-id"] = rid
        # same id AND same request (endpoint + body): another client reusing an id never gets this answer
        key = f"{rid}:{hashlib.sha256(path.encode() + b'|' + body).hexdigest()}" if dedup else rid
        cached = self._done.get(key) if dedup else None
        if cached is not None:
            self.m_dedup.inc()
            status, out_h, data = cached
            out_h = {**out_h, "x-veil-deduplicated": "1"}
        elif not dedup:
            status, out_h, data = await self.forward(method, path, model, body, headers, rid)
        elif key in self._inflight:
            self.m_dedup.inc()
            status, out_h, data = await asyncio.shield(self._inflight[key])
            out_h = {**out_h, "x-veil-deduplicated": "1"}
        else:
            fut: asyncio.Future[tuple[int, dict[str, str], bytes]] = (
                asyncio.get_running_loop().create_future()
            )
            self._inflight[key] = fut
            try:
                status, out_h, data = await self.forward(method, path, model, body, headers, rid)
                fut.set_result((status, out_h, data))
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved
                raise
            finally:
                del self._inflight[key]
            if status < 500:
                self._done[key] = (status, out_h, data)
                if len(self._done) > self.cfg.dedup_entries:
                    self._done.popitem(last=False)
        self._record(data)
        endpoint = path.rsplit("/", 1)[-1]
        if endpoint not in ("infer", "completions", "attestation"):  # hardening (issue 9): the model
            endpoint = "other"  # name is client-chosen: as a label it would grow metrics without bound
        self.m_requests.labels(endpoint, str(status)).inc()
        self.m_latency.observe(time.perf_counter() - t0)
        return status, dict(out_h), data


def create_app(gw: Gateway) -> FastPost:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.stop()

    app = FastAPI(
        title="veil gateway",
        version="1",
        lifespan=lifespan,
        description="Open Inference Protocol (KServe v2) gateway in front of attested enclave workers.",
        responses=openapi_error_responses(),
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # hardening (issue 9): framework errors (e.g. an unparsable JSON body -> 400) use the
        # declared error schema {"error", "kind"} instead of FastAPI's {"detail"}
        return JSONResponse(
            {"error": str(exc.detail), "kind": "HTTPException"}, status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def healthy() -> list[ReplicaState]:
        return [r for r in gw.router.replicas.values() if r.healthy]

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        ok = bool(healthy())
        body: dict[str, Any] = {"ready": ok} if ok else {"ready": ok, "error": "no healthy replica"}
        return JSONResponse(body, status_code=200 if ok else 503)  # hardening: declared error schema

    @app.get("/v2")
    async def server_meta() -> dict[str, Any]:
        return {"name": "veil-gateway", "version": "1", "extensions": ["binary_tensor_data", "veil_e2e"]}

    @app.get("/v2/models/{model}")
    async def model_meta(model: str, request: Request) -> Response:
        return await gw.handle("GET", f"/v2/models/{model}", model, request)

    @app.get("/v2/models/{model}/ready")
    async def model_ready(model: str) -> Response:
        ok = any(model in r.models for r in healthy())
        doc: dict[str, Any] = {"name": model, "ready": ok}
        if not ok:  # hardening (issue 9): the 404 body follows the declared error schema
            doc["error"] = f"model {model[:128]!r} is not ready on any replica"
        return JSONResponse(doc, status_code=200 if ok else 404)

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request) -> Response:
        return await gw.handle("POST", f"/v2/models/{model}/infer", model, request)

    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer_version(model: str, version: str, request: Request) -> Response:
        return await gw.handle("POST", f"/v2/models/{model}/versions/{version}/infer", model, request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        model = request.headers.get("x-veil-model", "")
        if not model and not request.headers.get("content-type", "").startswith(E2E_CONTENT_TYPE):
            try:
                model = str(msgspec.json.decode(await request.body()).get("model", ""))
            except (msgspec.DecodeError, AttributeError):
                return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        return await gw.handle("POST", "/v1/completions", model, request)

    @app.post("/v2/veil/attestation")
    async def attestation(request: Request) -> Response:
        return await gw.handle("POST", "/v2/veil/attestation", "", request)

    def _admin(request: Request) -> None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        tok = gw.cfg.admin_token
        if tok is None or not hmac.compare_digest(
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(tok.encode()).digest()
        ):
            raise ServeError("gateway admin token missing or wrong (or replica admin disabled)")

    @app.post("/veil/v1/replicas")
    async def add_replica(body: ReplicaIn, request: Request) -> Response:
        try:
            _admin(request)
        except ServeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=403)
        r = gw.router.add(body.url, host=body.host)
        await gw._poll(r)
        log.warning("replica %s added at run time (healthy=%s)", r.id, r.healthy)
        return JSONResponse({"id": r.id, "healthy": r.healthy})

    @app.delete("/veil/v1/replicas/{rid}")
    async def drain_replica(rid: str, request: Request) -> Response:
        """Drain: no new requests; removed once its in-flight requests are done (``removed: true``)."""
        try:
            _admin(request)
        except ServeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=403)
        r = gw.router.replicas.get(rid)
        if r is None:
            return JSONResponse({"error": f"no replica {rid}"}, status_code=404)
        r.draining = True
        removed = r.outstanding == 0
        if removed:
            gw.router.remove(rid)
        return JSONResponse({"id": rid, "draining": True, "outstanding": r.outstanding, "removed": removed})

    @app.get("/veil/v1/replicas")
    async def replicas() -> list[dict[str, Any]]:
        return [
            {
                "id": r.id,
                "url": r.url,
                "healthy": r.healthy,
                "outstanding": r.outstanding,
                "tee": r.tee,
                "models": sorted(r.models),
                "ewma_latency_s": r.ewma_latency_s,
                "epc_pressure": r.epc_pressure,
                "host": r.host,
                "draining": r.draining,
            }
            for r in gw.router.replicas.values()
        ]

    @app.get("/metrics", response_class=PlainTextResponse)  # documents text/plain (hardening)
    async def metrics() -> Response:
        return Response(generate_latest(gw.registry), media_type="text/plain; version=0.0.4")

    async def fast_infer(
        m: re.Match[str], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        return await gw.handle_raw("POST", m.group(0), m.group(1), headers, body)

    async def fast_completions(
        m: re.Match[str], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        model = headers.get("x-veil-model", "")
        if not model and not headers.get("content-type", "").startswith(E2E_CONTENT_TYPE):
            try:
                model = str(msgspec.json.decode(body).get("model", ""))
            except (msgspec.DecodeError, AttributeError):
                return 400, {"content-type": "application/json"}, b'{"error":"body must be a JSON object"}'
        return await gw.handle_raw("POST", "/v1/completions", model, headers, body)

    return FastPost(
        app,
        [
            (r"/v2/models/([^/]+)/(?:versions/[^/]+/)?infer", fast_infer),
            (r"/v1/completions", fast_completions),
        ],
        max_body=gw.cfg.max_body_bytes,
        per_client=SessionLimiter(
            gw.cfg.max_inflight_per_client,
            field="max_inflight_requests_per_client",
            what="requests in flight",
        ),
    )
