"""End to end on the serving core's local cluster (real KMS, gateway and worker processes):
the local backend adds a worker on a simulated EPC host through the controller, the load
generator drives the real gateway, the Prometheus source reads its metrics, and a drain
removes the worker again."""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from veil.crypto.random import random_bytes
from veil.serve import signing
from veil.serve.autoscaling import Sample, SloAutoscaler, SloConfig
from veil.serve.autoscaling.controller import Controller
from veil.serve.autoscaling.local import LocalClusterBackend, gateway_source
from veil.serve.cluster.local import LocalCluster
from veil.serve.load import LoadPattern, load_gateway
from veil.serve.package import KeyFile, build_package

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, onnx_model: Path) -> Iterator[LocalCluster]:
    d = tmp_path_factory.mktemp("scale-cluster")
    sk = signing.SigningKey.generate()
    key, kid = random_bytes(32), random_bytes(16).hex()
    pkg = d / "tiny.veil"
    pkg.write_bytes(build_package(onnx_model, name="tiny", signing_key=sk, data_key=key, key_id=kid))
    kf = d / "tiny.key.json"
    KeyFile(model="tiny", key_id=kid, key=key.hex(), signer=sk.public_bytes.hex()).write(kf)
    c = LocalCluster(
        packages=[pkg], workers=1, state_dir=d / "state", key_files=[kf], policy="epc-aware", reattest_s=0
    )
    c.start(timeout=180)
    try:
        yield c
    finally:
        c.stop()


def replicas(c: LocalCluster) -> list[dict[str, object]]:
    doc: list[dict[str, object]] = httpx.get(c.gateway_url + "/veil/v1/replicas", timeout=5).json()
    return doc


def test_scale_up_load_and_drain_on_local_cluster(cluster: LocalCluster) -> None:
    initial = {str(r["id"]): str(r.get("host") or "local") for r in replicas(cluster)}
    assert len(initial) == 1
    (host0,) = set(initial.values())
    epc_root = Path(os.environ["VEIL_SIM_EPC_DIR"])
    backend = LocalClusterBackend(
        cluster, hosts={host0: 93.0, "sim-host-b": 93.0}, epc_root=epc_root, initial=initial, enclave_mb=1.0
    )

    class Busy:  # 60 req/s at 20 ms: two replicas needed
        def sample(self, now: float) -> Sample:
            return Sample(
                now,
                request_rate=60.0,
                p99_latency_s=0.1,
                concurrency=1.5,
                service_time_s=0.02,
                ready_replicas=1,
            )

    t = [0.0]
    ctl = Controller(
        SloAutoscaler(SloConfig(enclave_mb=1.0, max_replicas=2)), backend, Busy(), clock=lambda: t[0]
    )
    t[0] = 1.0
    step = ctl.step()
    assert step.applied and step.decision.replicas == 2
    backend.wait(180)
    assert not backend.errors
    reps = replicas(cluster)
    assert len(reps) == 2 and all(r["healthy"] for r in reps)
    added = [r for r in reps if str(r["id"]) not in initial]
    assert len(added) == 1 and added[0]["host"] == "sim-host-b"
    # the new worker registered its enclave on its simulated host
    assert {h.name: h.replicas for h in backend.hosts()}["sim-host-b"] == 1
    assert {h.name: h.used_mb for h in backend.hosts()}["sim-host-b"] > 0

    # real load through the real gateway; the Prometheus source sees it
    src = gateway_source(cluster.gateway_url)
    src.sample(0.0)
    res = asyncio.run(
        load_gateway(cluster.gateway_url, "tiny", LoadPattern("steady", rate=20, duration_s=2), seed=1)
    )
    assert res.records and all(r.ok for r in res.records), [r for r in res.records if not r.ok][:3]
    s = src.sample(3.0)
    assert s.request_rate == pytest.approx(len(res.records) / 3.0, rel=0.05)
    assert math.isfinite(s.p99_latency_s) and s.ready_replicas == 2

    # drain the added worker again
    backend.apply(1, {host0: 1})
    backend.wait(120)
    assert [r["id"] for r in replicas(cluster)] == list(initial)
    backend.close()
