"""End to end: packages served by a local cluster (separate processes), called with tritonclient.

One cluster (KMS + 2 ONNX workers + 2 XGBoost workers + gateway) is shared by the tests of this
module, in order: correctness with tritonclient, E2E encryption (the gateway's capture shows no
plaintext), dedup by request id, KMS restart (workers re-attest), killing a worker under load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from veil.crypto.random import random_bytes
from veil.errors import AttestationError
from veil.serve import signing
from veil.serve.client import ServeClient
from veil.serve.cluster.local import LocalCluster
from veil.serve.kms.client import KMSClient
from veil.serve.package import KeyFile, build_package
from veil.serve.worker.app import worker_measurement
from veil.tee import Policy, platform_public_key

pytestmark = pytest.mark.slow

# the machine running these tests may be heavily shared: generous timeouts everywhere
_http = httpx.Client(timeout=60.0)


def make_package(model: Path, name: str, out_dir: Path) -> tuple[Path, Path]:
    sk = signing.SigningKey.generate()
    key, kid = random_bytes(32), random_bytes(16).hex()
    pkg = out_dir / f"{name}.veil"
    pkg.write_bytes(build_package(model, name=name, signing_key=sk, data_key=key, key_id=kid))
    kf = out_dir / "keys" / f"{name}.key.json"
    KeyFile(model=name, key_id=kid, key=key.hex(), signer=sk.public_bytes.hex()).write(kf)
    return pkg, kf


def client_policy(**kw: object) -> Policy:
    base: dict[str, object] = dict(
        allowed_measurements={worker_measurement()},
        allow_simulated=True,
        simulated_platform_keys={platform_public_key().hex()},
    )
    base.update(kw)
    return Policy(**base)  # type: ignore[arg-type]


_VERIFY: object = True


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", timeout=30, verify=_VERIFY).text  # type: ignore[arg-type]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (not labels or labels in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, onnx_model: Path, xgb_model: Path
) -> Iterator[LocalCluster]:
    d = tmp_path_factory.mktemp("cluster")
    p1, k1 = make_package(onnx_model, "tiny", d)
    p2, k2 = make_package(xgb_model, "xgb", d)
    c = LocalCluster(
        packages=[p1, p2],
        workers=2,
        state_dir=d / "state",
        key_files=[k1, k2],
        reattest_s=1.0,
        capture_file=d / "gateway-capture.bin",
        worker_tls=True,
    )
    c.start(timeout=180)
    global _VERIFY
    _VERIFY = c.verify
    try:
        yield c
    finally:
        c.stop()
    for p in c.procs:
        assert p.popen is not None and p.popen.poll() is not None, f"{p.name} still running"


def test_every_replica_presents_the_shared_service_identity(cluster: LocalCluster) -> None:
    import ssl

    service_pem = KMSClient(cluster.kms_url).service()["tls_cert_pem"]
    want = ssl.PEM_cert_to_DER_cert(service_pem)
    workers = cluster.worker_procs()
    assert len(workers) == 4 and all(p.url.startswith("https://") for p in workers)
    for p in workers:
        host, port = p.url.removeprefix("https://").split(":")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        import socket

        with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
            assert tls.getpeercert(binary_form=True) == want
    with pytest.raises(httpx.HTTPError):  # plain HTTP to a TLS worker fails
        _http.get(workers[0].url.replace("https://", "http://") + "/v2/health/live", timeout=5)


def test_tritonclient_onnx_and_xgboost_equal_local_inference(
    cluster: LocalCluster, onnx_model: Path, xgb_model: Path
) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient
    import xgboost as xgb

    url = cluster.gateway_url.removeprefix("http://")
    tc = httpclient.InferenceServerClient(url=url)
    assert tc.is_server_live() and tc.is_server_ready() and tc.is_model_ready("tiny")
    meta = tc.get_model_metadata("tiny")
    assert meta["inputs"][0]["name"] == "x" and meta["parameters"]["tee"] == "simulated"

    x = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)
    want = ort.InferenceSession(str(onnx_model)).run(None, {"x": x})[0]
    for binary in (True, False):
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("probs", binary_data=binary)
        res = tc.infer("tiny", [inp], outputs=[out], request_id=f"onnx-{binary}")
        got = res.as_numpy("probs")
        np.testing.assert_array_equal(got, want) if binary else np.testing.assert_allclose(
            got, want, rtol=1e-6
        )
        assert res.get_response()["id"] == f"onnx-{binary}"

    xx = np.random.default_rng(8).normal(size=(9, 5)).astype(np.float32)
    b = xgb.Booster()
    b.load_model(str(xgb_model))
    inp = httpclient.InferInput("input__0", list(xx.shape), "FP32")
    inp.set_data_from_numpy(xx)
    res = tc.infer("xgb", [inp])
    np.testing.assert_allclose(res.as_numpy("output__0"), b.predict(xgb.DMatrix(xx)), rtol=1e-6)

    bad = httpclient.InferInput("x", [2, 5], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 5), np.float32))
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="shape"):
        tc.infer("tiny", [bad])
    tc.close()


def test_e2e_gateway_never_sees_plaintext(cluster: LocalCluster, onnx_model: Path) -> None:
    import onnxruntime as ort

    capture = cluster.capture_file
    assert capture is not None
    x = (np.arange(8, dtype=np.float32).reshape(2, 4) + 0.123456).astype(np.float32)
    want = ort.InferenceSession(str(onnx_model)).run(None, {"x": x})[0]
    start = capture.stat().st_size
    with ServeClient(cluster.gateway_url, policy=client_policy(), e2e=True) as c:
        claims = c.attest()
        assert claims.simulated and claims.measurement == worker_measurement()
        got = c.infer("tiny", {"x": x})["probs"]
    np.testing.assert_array_equal(got, want)
    seen = capture.read_bytes()[start:]
    assert len(seen) > 0
    for secret in (x.tobytes(), want.tobytes(), b"0.123456", b'"x"', b"probs"):
        assert secret not in seen, f"gateway saw plaintext {secret[:16]!r}"
    # positive control: the same request without E2E IS visible to the gateway
    start = capture.stat().st_size
    with ServeClient(cluster.gateway_url) as c:
        np.testing.assert_array_equal(c.infer("tiny", {"x": x})["probs"], want)
    plain = capture.read_bytes()[start:]
    assert x.tobytes() in plain and want.tobytes() in plain


def test_e2e_client_refuses_service_under_production_policy(cluster: LocalCluster) -> None:
    with (
        ServeClient(cluster.gateway_url, policy=client_policy(allow_simulated=False), e2e=True) as c,
        pytest.raises(AttestationError, match="simulated"),
    ):
        c.infer("tiny", {"x": np.zeros((1, 4), np.float32)})
    with (
        ServeClient(
            cluster.gateway_url, policy=client_policy(allowed_measurements={"00" * 32}), e2e=True
        ) as c,
        pytest.raises(AttestationError, match="measurement"),
    ):
        c.attest()


def test_duplicate_request_id_answered_once(cluster: LocalCluster) -> None:
    workers = [p.url for p in cluster.worker_procs()]
    before = sum(metric(u, "veil_worker_requests_total", 'outcome="ok"') for u in workers)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    h = {"x-request-id": "dup-" + random_bytes(6).hex()}
    r1 = _http.post(cluster.gateway_url + "/v2/models/tiny/infer", json=body, headers=h)
    r2 = _http.post(cluster.gateway_url + "/v2/models/tiny/infer", json=body, headers=h)
    assert r1.status_code == r2.status_code == 200 and r1.content == r2.content
    assert r2.headers.get("x-veil-deduplicated") == "1"
    after = sum(metric(u, "veil_worker_requests_total", 'outcome="ok"') for u in workers)
    assert after - before == 1
    # another request reusing the id (e.g. another client) is NOT answered from the cache
    other = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [4, 3, 2, 1]}]}
    r3 = _http.post(cluster.gateway_url + "/v2/models/tiny/infer", json=other, headers=h)
    assert r3.status_code == 200 and "x-veil-deduplicated" not in r3.headers
    assert r3.json()["outputs"][0]["data"] != r1.json()["outputs"][0]["data"]


def _worker_argv(cluster: LocalCluster, package: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "veil.serve",
        "worker",
        "--package",
        str(package),
        "--kms",
        cluster.kms_url,
        "--listen",
        "127.0.0.1:0",
        "--attest-timeout-s",
        "10",
        "--reattest-s",
        "0",
        *extra,
    ]


def test_debug_worker_process_gets_nothing_and_is_audited(cluster: LocalCluster) -> None:
    pkg = cluster.packages[0]
    r = subprocess.run(
        _worker_argv(cluster, pkg, "--debug-enclave", "--worker-id", "debug-w"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "release refused" in r.stderr and "debug" in r.stderr and "Traceback" not in r.stderr
    with KMSClient(cluster.kms_url, admin_token=cluster.admin_token) as k:
        refused = [e for e in k.audit(outcome="refused") if e.worker_id == "debug-w"]
    assert refused and "debug" in refused[0].reason and refused[0].tee == "simulated"


def test_tampered_package_worker_refuses_to_start(cluster: LocalCluster, tmp_path: Path) -> None:
    data = bytearray(cluster.packages[0].read_bytes())
    data[-5] ^= 0x40  # a payload byte
    bad = tmp_path / "bad.veil"
    bad.write_bytes(bytes(data))
    r = subprocess.run(_worker_argv(cluster, bad), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert "SHA-256" in r.stderr


def test_kms_restart_workers_reattest_keys_still_there(cluster: LocalCluster) -> None:
    kms = next(p for p in cluster.procs if p.name == "kms")
    token = cluster.admin_token
    with KMSClient(cluster.kms_url, admin_token=token) as k:
        keys_before = {m: [x.key_id for x in k.list_keys(m)] for m in ("tiny", "xgb")}
    ok_before = {
        p.url: metric(p.url, "veil_worker_attestations_total", 'outcome="ok"') for p in cluster.worker_procs()
    }
    cluster.restart_kms()
    assert kms.popen is not None and kms.popen.poll() is not None
    deadline = time.monotonic() + 60
    pending = set(ok_before)
    while pending and time.monotonic() < deadline:
        for u in list(pending):
            if metric(u, "veil_worker_attestations_total", 'outcome="ok"') > ok_before[u]:
                pending.discard(u)
        time.sleep(0.5)
    assert not pending, f"workers did not re-attest after the KMS restart: {pending}"
    with KMSClient(cluster.kms_url, admin_token=token) as k:
        assert {m: [x.key_id for x in k.list_keys(m)] for m in ("tiny", "xgb")} == keys_before
        released = k.audit(outcome="released", limit=50)
        assert released and all(e.tee == "simulated" for e in released)
    r = _http.post(
        cluster.gateway_url + "/v2/models/tiny/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
    )
    assert r.status_code == 200


def test_add_and_drain_a_replica_at_run_time(cluster: LocalCluster) -> None:
    assert (
        _http.post(cluster.gateway_url + "/veil/v1/replicas", json={"url": "http://127.0.0.1:1"}).status_code
        == 403
    )
    rid = cluster.add_worker(host="sim-host-1")
    deadline = time.monotonic() + 60  # healthy after the gateway's next successful status poll
    while True:
        reps = {r["id"]: r for r in _http.get(cluster.gateway_url + "/veil/v1/replicas").json()}
        if reps[rid]["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert reps[rid]["healthy"] and reps[rid]["host"] == "sim-host-1" and reps[rid]["models"] == ["tiny"]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    served_by = set()
    for _ in range(60):  # round-robin reaches the new replica within a few requests
        r = _http.post(cluster.gateway_url + "/v2/models/tiny/infer", json=body, timeout=30)
        assert r.status_code == 200
        served_by.add(r.headers["x-veil-replica"])
        if rid in served_by:
            break
    assert rid in served_by
    cluster.remove_worker(rid)
    assert rid not in {r["id"] for r in _http.get(cluster.gateway_url + "/veil/v1/replicas").json()}
    for _ in range(4):
        r = _http.post(cluster.gateway_url + "/v2/models/tiny/infer", json=body)
        assert r.status_code == 200 and r.headers["x-veil-replica"] != rid
    added = [p for p in cluster.worker_procs() if p.url.endswith(rid)]
    assert added and added[0].popen is not None and added[0].popen.poll() is not None


def test_kill_worker_under_load_every_request_answered_once(cluster: LocalCluster) -> None:
    n_threads, per_thread = 4, 20
    results: dict[str, tuple[int, str]] = {}
    lock = threading.Lock()
    started = threading.Event()
    x = [1.0, 2.0, 3.0, 4.0]
    want = _http.post(
        cluster.gateway_url + "/v2/models/tiny/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}]},
    ).json()

    def load(t: int) -> None:
        with httpx.Client(timeout=30) as c:
            for i in range(per_thread):
                rid = f"load-{t}-{i}"
                r = c.post(
                    cluster.gateway_url + "/v2/models/tiny/infer",
                    headers={"x-request-id": rid},
                    json={
                        "id": rid,
                        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x}],
                    },
                )
                with lock:
                    assert rid not in results
                    results[rid] = (r.status_code, r.text)
                started.set()
                time.sleep(0.02)

    victim = next(p for p in cluster.worker_procs() if "tiny" in p.name)
    retries_before = metric(cluster.gateway_url, "veil_gateway_retries_total")
    healthy_before = metric(cluster.gateway_url, "veil_gateway_replicas_healthy")
    threads = [threading.Thread(target=load, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    assert started.wait(30)
    assert victim.popen is not None
    victim.popen.kill()
    for th in threads:
        th.join(60)
    assert len(results) == n_threads * per_thread
    for rid, (status, text) in results.items():
        assert status == 200, (rid, text)
        doc = json.loads(text)
        assert doc["id"] == rid
        assert doc["outputs"][0]["data"] == want["outputs"][0]["data"]
    # the gateway noticed the dead replica: it re-sent a request to another replica, or (when its
    # status poll ran before any request reached the victim) it took the replica out of rotation
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        retried = metric(cluster.gateway_url, "veil_gateway_retries_total") > retries_before
        taken_out = metric(cluster.gateway_url, "veil_gateway_replicas_healthy") < healthy_before
        if retried or taken_out:
            break
        time.sleep(0.2)
    assert retried or taken_out, "the gateway neither retried nor marked the killed replica down"
    # supervision: the dead worker is restarted, re-attests, and the gateway uses it again
    assert cluster.respawn_dead_workers() == [victim.name]
    rid = victim.url.split("//", 1)[-1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        reps = {r["id"]: r for r in _http.get(cluster.gateway_url + "/veil/v1/replicas").json()}
        if reps[rid]["healthy"]:
            break
        time.sleep(0.5)
    assert reps[rid]["healthy"]
