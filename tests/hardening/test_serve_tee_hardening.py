"""Attested key exchange under faults; the serving stack with a killed / hanging worker; a worker
presenting another worker's evidence to the KMS; a gateway rerouting E2E requests."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from veil.comm import MemoryChannel, Message, codec
from veil.comm.faulty import FaultPlan, FaultyChannel
from veil.errors import VeilError
from veil.tee import (
    EnclaveKeyExchange,
    Policy,
    SimulatedEnclave,
    Verifier,
    client_open_session,
    enclave_accept_session,
)

from .campaign import ADVERSARIAL, record_fault_run
from .servestack import Stack, serve_in_thread, start_stack

BOUND_S = 30.0


class _Ping(Message, frozen=True, tag="hardening.ping"):
    data: bytes

# ------------------------------------------------------------------------- tee key exchange


def _kex_run(plan: FaultPlan, seed: int) -> tuple[dict[str, Any], dict[str, int]]:
    enclave = SimulatedEnclave(code=[b"hardening kex"], config={"c": 1})
    verifier = Verifier(Policy(allowed_measurements={enclave.measurement}, allow_simulated=True,
                               trust_any_simulated_platform=True))
    rng = random.Random(seed)
    a, b = MemoryChannel.pair(timeout=1.0)
    fa = FaultyChannel(a, random.Random(rng.getrandbits(64)), plan)
    fb = FaultyChannel(b, random.Random(rng.getrandbits(64)), plan)
    res: dict[str, Any] = {}

    def enclave_side() -> None:
        try:
            s = enclave_accept_session(fa, enclave, timeout=1.0)
            res["enclave"] = s
            fa.send(_Ping(data=s.encrypt(b"hello from the enclave")))
        except BaseException as exc:
            res["enclave"] = exc

    def client_side() -> None:
        try:
            s, claims = client_open_session(fb, verifier, timeout=1.0)
            assert claims.simulated
            msg = fb.recv(_Ping, timeout=1.0)
            res["client"] = s.decrypt(msg.data)
        except BaseException as exc:
            res["client"] = exc

    ts = [threading.Thread(target=f, daemon=True) for f in (enclave_side, client_side)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=BOUND_S)
    assert not any(t.is_alive() for t in ts), "key exchange hung"
    res["seconds"] = time.monotonic() - t0
    injected: dict[str, int] = {}
    for ch in (fa, fb):
        for k, n in ch.counts().items():
            injected[k] = injected.get(k, 0) + n
    return res, injected




KEX_PLANS = {
    "drop": FaultPlan(drop=0.3), "duplicate": FaultPlan(duplicate=0.3), "reorder": FaultPlan(reorder=0.5),
    "truncate": FaultPlan(truncate=0.3), "corrupt": FaultPlan(corrupt=0.3),
    "delay": FaultPlan(delay=0.5, max_delay_s=0.02), "close": FaultPlan(close=0.2),
    "kill": FaultPlan(kill=0.2),
}


@pytest.mark.parametrize("kind", list(KEX_PLANS))
def test_tee_key_exchange_under_faults(kind: str) -> None:
    runs = 6
    for seed in range(runs):
        res, injected = _kex_run(KEX_PLANS[kind], seed)
        c, e = res["client"], res["enclave"]
        if c == b"hello from the enclave":
            assert not isinstance(e, BaseException)
            record_fault_run("tee.kex", injected, "completed")
        else:
            assert isinstance(c, VeilError), f"client: {type(c).__name__}: {c}"
            assert isinstance(e, VeilError) or not isinstance(e, BaseException), type(e).__name__
            record_fault_run("tee.kex", injected, "failed_cleanly")
        assert res["seconds"] < 10


# ------------------------------------------------------------------------- serving stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("serve-hardening"))
    try:
        yield s
    finally:
        s.close()


X = [[0.5, -1.0, 2.0, 0.25]]


def _infer_body() -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[0]}]}


def _expected(stack: Stack) -> np.ndarray:
    out = stack.worker.runner.infer({"x": np.asarray(X, dtype=np.float32)}, [])
    return np.asarray(out["probs"]).reshape(-1)


def _second_worker(stack: Stack, wid: str) -> tuple[Any, Any]:
    from veil.serve.worker.app import Worker, WorkerConfig
    from veil.serve.worker.app import create_app as worker_app

    cfg = WorkerConfig(package=stack.tmp / "m.veilpkg", kms_url=stack.kms.url, reattest_s=0, worker_id=wid)
    w = Worker(cfg)
    w.start()
    srv = serve_in_thread(worker_app(w))
    return w, srv


@pytest.mark.slow
def test_gateway_survives_a_killed_worker(stack: Stack) -> None:
    """Two replicas; one is killed while requests flow: every request gets the right answer or
    a clean 503 within the bound, and afterwards all requests go to the survivor."""
    w2, srv2 = _second_worker(stack, "w-kill")
    gw = stack.gateway
    gw.router.add(srv2.url)
    deadline = time.monotonic() + 20
    while sum(r.healthy for r in gw.router.replicas.values()) < 2:
        assert time.monotonic() < deadline, "second worker never became healthy"
        time.sleep(0.05)
    want = _expected(stack)
    statuses: list[int] = []
    t_max = 0.0
    with httpx.Client(timeout=20) as http:
        for i in range(40):
            if i == 10:
                srv2.stop()  # the worker process dies (its socket closes)
                w2.stop()
            t0 = time.monotonic()
            r = http.post(f"{stack.gateway_srv.url}/v2/models/{stack.model_name}/infer", json=_infer_body())
            t_max = max(t_max, time.monotonic() - t0)
            statuses.append(r.status_code)
            if r.status_code == 200:
                got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)
                np.testing.assert_allclose(got, want, rtol=1e-6)
            else:
                assert r.status_code == 503, r.text
    gw.router.remove(srv2.url.split("//", 1)[-1])
    record_fault_run("serve.gateway", {"kill_worker": 1}, "completed" if all(s == 200 for s in statuses)
                     else "failed_cleanly")
    assert t_max < BOUND_S
    assert statuses[-10:] == [200] * 10, statuses
    assert statuses.count(200) >= 38, statuses  # retried on the survivor, at most a couple of 503s


@pytest.mark.slow
def test_gateway_times_out_a_hanging_worker(stack: Stack) -> None:
    """A replica that stops answering (hangs inside inference): a gateway with a 1 s per-replica
    timeout (4 s per request) marks it unhealthy and re-sends the request to the healthy replica."""
    from veil.serve.gateway.app import Gateway, GatewayConfig
    from veil.serve.gateway.app import create_app as gateway_app

    w2, srv2 = _second_worker(stack, "w-hang")
    gw = Gateway(GatewayConfig(workers=[srv2.url, stack.worker_srv.url], replica_timeout_s=1.0,
                               request_timeout_s=4.0, poll_s=0.2, max_attempts=3))
    gsrv = serve_in_thread(gateway_app(gw))
    try:
        deadline = time.monotonic() + 20
        while sum(r.healthy for r in gw.router.replicas.values()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        real = w2.runner.infer

        def hang(*a: Any, **k: Any) -> Any:
            time.sleep(3.0)
            return real(*a, **k)

        w2.runner.infer = hang  # type: ignore[method-assign]
        want = _expected(stack)
        times = []
        with httpx.Client(timeout=20) as http:
            for _ in range(6):
                t0 = time.monotonic()
                r = http.post(f"{gsrv.url}/v2/models/{stack.model_name}/infer", json=_infer_body())
                times.append(time.monotonic() - t0)
                assert r.status_code == 200, r.text
                got = np.asarray(r.json()["outputs"][0]["data"], np.float32)
                np.testing.assert_allclose(got, want, rtol=1e-6)
        assert max(times) < 5.0, times
        record_fault_run("serve.gateway", {"hang_worker": 1}, "completed")
    finally:
        gsrv.stop()
        srv2.stop()
        w2.stop()


def _slow_worker(stack: Stack, wid: str, seconds: float) -> tuple[Any, Any]:
    """A second worker whose model takes ``seconds`` per request."""
    w2, srv2 = _second_worker(stack, wid)
    real = w2.runner.infer

    def slow(*a: Any, **k: Any) -> Any:
        time.sleep(seconds)
        return real(*a, **k)

    w2.runner.infer = slow  # type: ignore[method-assign]
    return w2, srv2


def _wait_healthy(gw: Any) -> None:
    """Until the gateway has seen a healthy replica (20 s at most)."""
    deadline = time.monotonic() + 20
    while not any(r.healthy for r in gw.router.replicas.values()):
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_gateway_slow_worker_yields_a_clean_504_within_the_bound(stack: Stack) -> None:
    """The only replica is slow (2 s per request): a gateway with request_timeout_s=0.8 answers a
    clean 504 (declared error schema) within the bound; with 5 s the same request succeeds."""
    from veil.serve.gateway.app import Gateway, GatewayConfig
    from veil.serve.gateway.app import create_app as gateway_app

    w2, srv2 = _slow_worker(stack, "w-slow", 2.0)
    gws = [Gateway(GatewayConfig(workers=[srv2.url], request_timeout_s=t, poll_s=0.2, max_attempts=3))
           for t in (0.8, 5.0)]
    srvs = [serve_in_thread(gateway_app(gw)) for gw in gws]
    try:
        for gw in gws:
            _wait_healthy(gw)
        with httpx.Client(timeout=20) as http:
            t0 = time.monotonic()
            r = http.post(f"{srvs[0].url}/v2/models/{stack.model_name}/infer", json=_infer_body())
            took = time.monotonic() - t0
            assert r.status_code == 504, r.text
            assert r.json()["kind"] == "GatewayTimeout" and "0.8 s" in r.json()["error"]
            assert 0.7 < took < 1.8, took  # the bound, plus HTTP overhead on a loaded machine
            r = http.post(f"{srvs[1].url}/v2/models/{stack.model_name}/infer", json=_infer_body())
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["outputs"][0]["data"], np.float32)
            np.testing.assert_allclose(got, _expected(stack), rtol=1e-6)
        record_fault_run("serve.gateway", {"slow_worker": 1}, "failed_cleanly")
    finally:
        for srv in srvs:
            srv.stop()
        srv2.stop()
        w2.stop()


@pytest.mark.slow
def test_gateway_timeout_fired_early_by_the_loop_is_still_a_504(stack: Stack, monkeypatch: Any) -> None:
    """Regression (CI, 7 Dec): asyncio may fire a timeout up to its clock resolution before the
    deadline; the gateway then read ``loop.time() < deadline``, marked the only replica unhealthy
    and answered 503 "service unavailable" instead of the 504 of a spent budget. Here every
    attempt's timeout fires 20 ms early: the answer must still be the clean 504."""
    import asyncio

    from veil.serve.gateway import app as gateway_mod
    from veil.serve.gateway.app import Gateway, GatewayConfig

    w2, srv2 = _slow_worker(stack, "w-slow-early", 1.5)
    real_timeout_at = asyncio.timeout_at
    monkeypatch.setattr(gateway_mod.asyncio, "timeout_at", lambda when: real_timeout_at(when - 0.02))
    gw = Gateway(GatewayConfig(workers=[srv2.url], request_timeout_s=0.5, poll_s=0.2, max_attempts=3))
    srv = serve_in_thread(gateway_mod.create_app(gw))
    try:
        _wait_healthy(gw)
        with httpx.Client(timeout=20) as http:
            r = http.post(f"{srv.url}/v2/models/{stack.model_name}/infer", json=_infer_body())
        assert r.status_code == 504, r.text
        assert r.json()["kind"] == "GatewayTimeout"
    finally:
        monkeypatch.undo()
        srv.stop()
        srv2.stop()
        w2.stop()


# ------------------------------------------------------------------------- stolen evidence


def _challenge(http: httpx.Client, stack: Stack) -> bytes:
    return bytes.fromhex(http.post(f"{stack.kms.url}/v1/attest/challenge").json()["nonce"])


def _release(http: httpx.Client, stack: Stack, nonce: bytes, offer: Any, who: str) -> httpx.Response:
    from veil.serve.kms.wire import b64e

    body = {"nonce": nonce.hex(), "offer": b64e(codec.encode(offer)), "key_ids": [], "worker_id": who}
    return http.post(f"{stack.kms.url}/v1/attest/release", json=body)


@pytest.mark.slow
def test_worker_presenting_another_workers_evidence_is_refused(stack: Stack) -> None:
    from veil.crypto.aead import X25519KeyPair
    from veil.errors import DecryptionError
    from veil.serve.kms.app import RELEASE_AAD
    from veil.tee import AttestedOffer

    genuine = stack.worker.enclave  # worker A's (allowed) enclave
    with httpx.Client(timeout=15) as http:
        # 1) B gets its own nonce and submits A's offer (made for A's nonce): binding refused
        n_a = _challenge(http, stack)
        offer_a = EnclaveKeyExchange(genuine).offer(n_a)
        n_b = _challenge(http, stack)
        r = _release(http, stack, n_b, offer_a, "worker-B")
        assert r.status_code == 403 and "report_data" in r.text, r.text
        # 2) A uses its offer; B replays A's whole request afterwards: the nonce is spent
        kx_a = EnclaveKeyExchange(genuine)
        n_a = _challenge(http, stack)
        offer_a = kx_a.offer(n_a)
        assert _release(http, stack, n_a, offer_a, "worker-A").status_code == 200
        r = _release(http, stack, n_a, offer_a, "worker-B")
        assert r.status_code == 403 and "nonce" in r.text, r.text
        # 3) B swaps its own key into A's evidence: the report data no longer binds the key
        n = _challenge(http, stack)
        offer = EnclaveKeyExchange(genuine).offer(n)
        b_key = X25519KeyPair.generate()
        forged = AttestedOffer(evidence=offer.evidence, public_key=b_key.public_bytes)
        r = _release(http, stack, n, forged, "worker-B")
        assert r.status_code == 403 and "report_data" in r.text, r.text
        # 4) B races A with A's genuine request: the KMS answers, but to A's attested key only —
        #    B (without A's enclave private key) cannot open the bundle
        kx_a = EnclaveKeyExchange(genuine)
        n = _challenge(http, stack)
        offer_a = kx_a.offer(n)
        r = _release(http, stack, n, offer_a, "worker-B")
        assert r.status_code == 200
        from veil.crypto.session import SecureSession
        from veil.serve.kms.wire import b64d

        resp = r.json()
        secret = b_key.exchange(bytes.fromhex(resp["kms_public"]))
        b_session = SecureSession.from_shared_secret(secret, initiator=False, transcript=b"")
        with pytest.raises(DecryptionError):
            b_session.decrypt(b64d(resp["bundle"]), aad=RELEASE_AAD)
        # 5) evidence of another (debug) build of the worker: measurement/debug refused
        debug = SimulatedEnclave(
            code=[b"patched worker"], config={"component": "veil-serve-worker"}, debug=True
        )
        n = _challenge(http, stack)
        r = _release(http, stack, n, EnclaveKeyExchange(debug).offer(n), "worker-B")
        assert r.status_code == 403, r.text
        audit = http.get(f"{stack.kms.url}/v1/audit", params={"outcome": "refused", "limit": 50},
                         headers={"Authorization": "Bearer " + "h" * 32}).json()
        assert sum(e["worker_id"] == "worker-B" for e in audit) >= 4
    ADVERSARIAL["serve: worker presents another worker's evidence"] = "refused"


# ------------------------------------------------------------------------- rerouting gateway


@pytest.mark.slow
def test_gateway_rerouting_e2e_requests_is_refused(stack: Stack) -> None:
    """A malicious gateway talks to the worker directly with a client's E2E envelope."""
    from veil.serve.e2e import E2E_CONTENT_TYPE, E2ERequest, client_open, client_seal

    inner = json.dumps(_infer_body()).encode()
    url = f"{stack.worker_srv.url}/v2/models/{stack.model_name}/infer"
    hdr = {"content-type": E2E_CONTENT_TYPE}
    with httpx.Client(timeout=15) as http:
        # the genuine request works (sanity)
        env, rk = client_seal(stack.worker.identity_pub, stack.model_name, "infer", inner, None)
        r = http.post(url, content=env, headers=hdr)
        assert r.status_code == 200
        status, body, _ = client_open(rk, r.content)
        assert status == 200 and json.loads(body)["outputs"]
        # 1) a request the client sealed for another model/tenant, delivered to this model
        env, _ = client_seal(stack.worker.identity_pub, "tenant-b-model", "infer", inner, None)
        r = http.post(url, content=env, headers=hdr)
        assert 400 <= r.status_code < 500 and b"another model" in r.content, r.content[:200]
        # 2) ... with the envelope's model field rewritten to match: keys are bound to the model
        req = codec.decode(env, E2ERequest)
        forged = codec.encode(msgspec.structs.replace(req, model=stack.model_name))
        r = http.post(url, content=forged, headers=hdr)
        assert 400 <= r.status_code < 500, r.content[:200]
        # 3) rerouted to another endpoint of the same model (infer -> completions)
        env, _ = client_seal(stack.worker.identity_pub, stack.model_name, "infer", inner, None)
        r = http.post(f"{stack.worker_srv.url}/v1/completions", content=env, headers=hdr)
        assert 400 <= r.status_code < 500, r.content[:200]
    ADVERSARIAL["serve: gateway reroutes E2E request to another model/endpoint"] = "refused"


# ------------------------------------------------------------------------- replaying gateway (H-9)


def _e2e_url(stack: Stack) -> str:
    return f"{stack.worker_srv.url}/v2/models/{stack.model_name}/infer"


@pytest.mark.slow
def test_regression_h9_gateway_replaying_an_e2e_request_is_refused(stack: Stack) -> None:
    """Finding H-9: a gateway (or anyone on the path) re-sends a client's sealed request. The
    worker runs it once; the replay is refused (directly and through the gateway) without
    running the model again, and a fresh seal of the same body (a client retry) still works."""
    from veil.serve.e2e import E2E_CONTENT_TYPE, ClientE2E

    client = ClientE2E(stack.worker.identity_pub)
    inner = json.dumps(_infer_body()).encode()
    env, rk = client.seal(stack.model_name, "infer", inner, None)
    hdr = {"content-type": E2E_CONTENT_TYPE}
    want = _expected(stack)
    runs_before = stack.worker.m_requests.labels("ok")._value.get()
    with httpx.Client(timeout=15) as http:
        first = http.post(_e2e_url(stack), content=env, headers=hdr)
        assert first.status_code == 200
        status, body, _ = ClientE2E.open(rk, first.content)
        assert status == 200
        np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], want, rtol=1e-6)
        again = http.post(_e2e_url(stack), content=env, headers=hdr)
        assert again.status_code == 400 and b"replayed" in again.content, again.content[:200]
        via_gw = http.post(f"{stack.gateway_srv.url}/v2/models/{stack.model_name}/infer", content=env,
                           headers=hdr)
        assert via_gw.status_code == 400 and b"replayed" in via_gw.content, via_gw.content[:200]
        # the model ran once for the three deliveries
        assert stack.worker.m_requests.labels("ok")._value.get() == runs_before + 1
        # a client retry re-seals (fresh salt + time): accepted, same answer
        env2, rk2 = client.seal(stack.model_name, "infer", inner, None)
        r = http.post(_e2e_url(stack), content=env2, headers=hdr)
        assert r.status_code == 200
        status, body, _ = ClientE2E.open(rk2, r.content)
        np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], want, rtol=1e-6)
    ADVERSARIAL["serve: gateway replays an E2E request (H-9)"] = "refused"


@pytest.mark.slow
def test_regression_h9_stale_e2e_request_is_refused(stack: Stack) -> None:
    """A sealed request held back longer than the worker's window (then delivered) is refused:
    the sealing time is authenticated, so it cannot be refreshed by the gateway either."""
    from veil.serve.e2e import E2E_CONTENT_TYPE, ClientE2E, E2ERequest

    window_s = stack.worker.e2e.replay.window_ms / 1000
    client = ClientE2E(stack.worker.identity_pub, clock=lambda: time.time() - window_s - 5)
    old, _ = client.seal(stack.model_name, "infer", json.dumps(_infer_body()).encode(), None)
    hdr = {"content-type": E2E_CONTENT_TYPE}
    with httpx.Client(timeout=15) as http:
        r = http.post(_e2e_url(stack), content=old, headers=hdr)
        assert r.status_code == 400 and b"outside the" in r.content, r.content[:200]
        req = codec.decode(old, E2ERequest)  # the gateway "refreshes" the time: the aad no longer matches
        fresh = codec.encode(msgspec.structs.replace(req, sealed_at_ms=int(time.time() * 1000)))
        r = http.post(_e2e_url(stack), content=fresh, headers=hdr)
        assert r.status_code == 400 and b"replayed" not in r.content, r.content[:200]


@pytest.mark.slow
def test_e2e_client_retry_after_lost_response_reseals(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The legitimate retry path: the first delivery reaches the worker (it runs) but the
    connection drops before the answer; ServeClient retries once with a fresh seal, which the
    replay cache accepts, and the client gets the right answer."""
    import http.client as hc

    from veil.serve.client import ServeClient
    from veil.serve.e2e import E2E_CONTENT_TYPE
    from veil.serve.worker.app import worker_measurement
    from veil.tee import platform_public_key

    policy = Policy(allowed_measurements={worker_measurement()}, allow_simulated=True,
                    simulated_platform_keys={platform_public_key().hex()})
    sent: list[bytes] = []

    class LostAnswer:
        """The first request is delivered for real, then the connection 'drops'."""

        def request(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> None:
            sent.append(body)
            with httpx.Client(timeout=15) as h:
                assert h.post(stack.gateway_srv.url + url, content=body, headers=headers).status_code == 200

        def getresponse(self) -> Any:
            raise hc.RemoteDisconnected("connection dropped before the answer")

        def close(self) -> None:
            pass

    with ServeClient(stack.gateway_srv.url, policy=policy, e2e=True) as client:
        client.attest()
        real_connect = client._connect
        conns = iter([LostAnswer()])
        monkeypatch.setattr(client, "_connect", lambda: next(conns, None) or real_connect())
        out = client.infer(stack.model_name, {"x": np.asarray(X, dtype=np.float32)})
    np.testing.assert_allclose(np.asarray(out["probs"]).reshape(-1), _expected(stack), rtol=1e-6)
    # the lost first envelope is spent: delivering it again is refused as a replay
    with httpx.Client(timeout=15) as h:
        r = h.post(_e2e_url(stack), content=sent[0], headers={"content-type": E2E_CONTENT_TYPE})
    assert r.status_code == 400 and b"replayed" in r.content


@pytest.mark.slow
def test_worker_e2e_requests_per_client_key_are_bounded(stack: Stack) -> None:
    """Concurrent E2E requests per (authenticated) client key: over the budget -> 429, under -> 200."""
    from veil.limits import SessionLimiter
    from veil.serve.e2e import E2E_CONTENT_TYPE, ClientE2E

    client = ClientE2E(stack.worker.identity_pub)
    inner = json.dumps(_infer_body()).encode()
    saved = stack.worker.e2e_sessions
    stack.worker.e2e_sessions = limiter = SessionLimiter(2, what="end-to-end requests in flight")
    hdr = {"content-type": E2E_CONTENT_TYPE}
    try:
        limiter.acquire(client.client_public.hex())
        limiter.acquire(client.client_public.hex())  # this client has 2 requests in flight
        with httpx.Client(timeout=15) as http:
            env, _ = client.seal(stack.model_name, "infer", inner, None)
            r = http.post(_e2e_url(stack), content=env, headers=hdr)
            assert r.status_code == 429, r.content[:200]
            assert b"VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT" in r.content
            other = ClientE2E(stack.worker.identity_pub)  # another client is not affected
            env, rk = other.seal(stack.model_name, "infer", inner, None)
            assert http.post(_e2e_url(stack), content=env, headers=hdr).status_code == 200
            limiter.release(client.client_public.hex())  # one in flight: under the budget
            env, rk = client.seal(stack.model_name, "infer", inner, None)
            r = http.post(_e2e_url(stack), content=env, headers=hdr)
            assert r.status_code == 200 and ClientE2E.open(rk, r.content)[0] == 200
        assert limiter.open_sessions(client.client_public.hex()) == 1
    finally:
        stack.worker.e2e_sessions = saved
