"""Every serving limit is configurable, enforced by its server, and answered with a clear error.

* request bodies (asgi.FastPost / BodyLimit, gateway, worker, KMS): 413 before the body is read,
  for a declared Content-Length and for a streamed (chunked) body;
* requests in flight per client address at the gateway: 429;
* key-release sessions (pending challenges) per client at the KMS: 429 (KMSBusy);
* the E2E replay cache (H-9) stays bounded.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from veil.errors import ResourceLimitError
from veil.limits import SessionLimiter, check_request_body_bytes, get_limits, reset_limits
from veil.serve.asgi import BodyLimit, FastPost


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    reset_limits()
    yield
    reset_limits()


async def _echo(m: re.Match[str], headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    return 200, {"content-type": "application/json"}, msgspec.json.encode({"n": len(body)})


async def _slow_echo(request: Request) -> JSONResponse:
    return JSONResponse({"n": len(await request.body())})


def _app(**kw: Any) -> FastPost:
    inner = Starlette(routes=[Route("/other", _slow_echo, methods=["POST"])])
    return FastPost(inner, [(r"/fast", _echo)], **kw)


def _chunks(total: int, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, total, size):
        yield b"x" * min(size, total - i)


@pytest.mark.parametrize("path", ["/fast", "/other"])
def test_body_cap_declared_length_and_streamed(path: str) -> None:
    with TestClient(_app(max_body=4096)) as http:
        ok = http.post(path, content=b"x" * 4096)
        assert ok.status_code == 200 and ok.json()["n"] == 4096  # at the limit: accepted
        r = http.post(path, content=b"x" * 4097)  # Content-Length above the cap: refused at once
        assert r.status_code == 413
        assert r.json()["kind"] == "ResourceLimitError"
        assert "VEIL_LIMIT_MAX_REQUEST_BODY_BYTES" in r.json()["error"]
        r = http.post(path, content=_chunks(10_000))  # chunked, no Content-Length: cut off in flight
        assert r.status_code == 413 and "exceeds the limit of 4096" in r.json()["error"]
        r = http.post(path, content=_chunks(3000))  # chunked, under the cap
        assert r.status_code == 200 and r.json()["n"] == 3000
        r = http.post(path, content=b"x", headers={"content-length": "nan"})
        assert r.status_code == 400


def test_body_cap_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_LIMIT_MAX_REQUEST_BODY_BYTES", "2048")
    reset_limits()
    assert get_limits().max_request_body_bytes == 2048
    with TestClient(_app()) as http:
        assert http.post("/fast", content=b"x" * 2048).status_code == 200
        assert http.post("/fast", content=b"x" * 2049).status_code == 413
    with pytest.raises(ResourceLimitError, match="MAX_REQUEST_BODY_BYTES"):
        check_request_body_bytes(2049)


def test_body_limit_middleware_on_any_app() -> None:
    inner = Starlette(routes=[Route("/other", _slow_echo, methods=["POST"])])
    with TestClient(BodyLimit(inner, max_body=1024)) as http:
        assert http.post("/other", content=b"y" * 1024).json() == {"n": 1024}
        assert http.post("/other", content=_chunks(5000, 700)).status_code == 413


def test_inflight_requests_per_client_at_the_fast_path() -> None:
    """Two requests of one client address in flight with a budget of 2: the third gets 429;
    once one finishes the next is accepted. (Driven through the ASGI interface directly.)"""
    gate = asyncio.Event()

    async def held(m: re.Match[str], headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], Any]:
        await gate.wait()
        return 200, {"content-type": "application/json"}, b"{}"

    limiter = SessionLimiter(2, field="max_inflight_requests_per_client", what="requests in flight")
    app = FastPost(Starlette(), [(r"/fast", held)], per_client=limiter)

    async def call(client: str) -> int:
        sent: list[dict[str, Any]] = []
        body = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return body.pop() if body else {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        scope = {"type": "http", "method": "POST", "path": "/fast", "headers": [], "client": (client, 1)}
        await app(scope, receive, send)
        return int(sent[0]["status"])

    async def main() -> list[int]:
        a = asyncio.create_task(call("10.0.0.1"))
        b = asyncio.create_task(call("10.0.0.1"))
        await asyncio.sleep(0.05)
        third = await call("10.0.0.1")  # over the budget: answered at once
        other = asyncio.create_task(call("10.0.0.2"))  # another client is not affected
        await asyncio.sleep(0.05)
        assert limiter.open_sessions("10.0.0.1") == 2 and limiter.open_sessions("10.0.0.2") == 1
        gate.set()
        return [third, await a, await b, await other, await call("10.0.0.1")]

    assert asyncio.run(main()) == [429, 200, 200, 200, 200]
    assert limiter.open_sessions("10.0.0.1") == 0


def test_gateway_inflight_limit_message_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_LIMIT_MAX_INFLIGHT_REQUESTS_PER_CLIENT", "1")
    reset_limits()
    lim = SessionLimiter(field="max_inflight_requests_per_client", what="requests in flight")
    assert lim.max_per_client == 1
    lim.acquire("c")
    with pytest.raises(ResourceLimitError, match="VEIL_LIMIT_MAX_INFLIGHT_REQUESTS_PER_CLIENT"):
        lim.acquire("c")


# ------------------------------------------------------------------------- KMS


def _kms(tmp_path: Path, clock: Any, **cfg: Any) -> tuple[Any, TestClient]:
    from veil.serve.kms.app import KMSConfig, KMSService, create_app
    from veil.tee import Policy

    policy = Policy(allowed_measurements={"0" * 64}, allow_simulated=True, trust_any_simulated_platform=True)
    svc = KMSService(KMSConfig(state_dir=tmp_path / "kms", admin_token="k" * 32, policy=policy, **cfg),
                     clock=clock)
    return svc, TestClient(create_app(svc))


def test_kms_key_release_sessions_per_client(tmp_path: Path) -> None:
    now = [1000.0]
    svc, http = _kms(tmp_path, lambda: now[0], max_sessions_per_client=2, nonce_ttl_s=30)
    n1 = http.post("/v1/attest/challenge").json()["nonce"]
    http.post("/v1/attest/challenge").raise_for_status()  # two open sessions: at the budget
    r = http.post("/v1/attest/challenge")
    assert r.status_code == 429, r.text
    assert r.json()["kind"] == "KMSBusy"
    assert "VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT" in r.json()["error"]
    # a release request ends its session (refused here: the offer is garbage), freeing a slot
    r = http.post("/v1/attest/release", json={"nonce": n1, "offer": "AAAA", "key_ids": [], "worker_id": "w"})
    assert r.status_code == 403
    assert http.post("/v1/attest/challenge").status_code == 200
    assert http.post("/v1/attest/challenge").status_code == 429
    now[0] += 31  # pending challenges expire: their slots come back
    assert http.post("/v1/attest/challenge").status_code == 200
    assert svc.sessions.open_sessions("testclient") == 1


def test_kms_sessions_default_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT", "1")
    reset_limits()
    _, http = _kms(tmp_path, lambda: 0.0)
    assert http.post("/v1/attest/challenge").status_code == 200
    assert http.post("/v1/attest/challenge").status_code == 429


def test_kms_body_cap(tmp_path: Path) -> None:
    _, http = _kms(tmp_path, lambda: 0.0, max_body_bytes=4096)
    big = {"nonce": "00" * 32, "offer": "A" * 8000, "key_ids": [], "worker_id": "w"}
    r = http.post("/v1/attest/release", json=big)
    assert r.status_code == 413 and "MAX_REQUEST_BODY_BYTES" in r.json()["error"]
    small = {"nonce": "00" * 32, "offer": "AAAA", "key_ids": [], "worker_id": "w"}
    assert http.post("/v1/attest/release", json=small).status_code == 403  # read, and refused on merit


# ------------------------------------------------------------------------- E2E replay cache (H-9)


def test_regression_h9_replay_cache_window_and_bound() -> None:
    from veil.serve.e2e import ReplayCache, ReplayError

    now = [10_000.0]
    cache = ReplayCache(window_s=60, max_entries=3, clock=lambda: now[0])
    t = int(now[0] * 1000)
    pub = b"p" * 32
    cache.remember(pub, b"a" * 16, t)
    with pytest.raises(ReplayError, match="replayed"):
        cache.remember(pub, b"a" * 16, t)
    cache.remember(b"q" * 32, b"a" * 16, t)  # same salt, another client key: a different request
    with pytest.raises(ReplayError, match="outside the 60 s window"):
        cache.check_fresh(t - 61_000)
    with pytest.raises(ReplayError, match="outside"):
        cache.check_fresh(t + 61_000)
    # bounded: a 4th fresh entry evicts the oldest and raises the floor to its sealing time
    cache.remember(pub, b"b" * 16, t + 1)
    cache.remember(pub, b"c" * 16, t + 2)
    assert len(cache) == 3
    with pytest.raises(ReplayError, match="floor"):
        cache.remember(pub, b"a" * 16, t)  # the evicted salt cannot come back
    cache.remember(pub, b"d" * 16, t + 3)  # newer requests still pass
    # entries past the window are dropped on the next insert
    now[0] += 120
    cache.remember(pub, b"e" * 16, int(now[0] * 1000))
    assert len(cache) == 1
