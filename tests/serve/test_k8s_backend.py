"""The autoscaler's Kubernetes backend against the kmock API emulator (a real HTTP server)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import kmock
import pytest

from veil.serve.autoscaling import HostInfo, Sample, SloAutoscaler, SloConfig
from veil.serve.autoscaling.controller import Controller, ScalingError
from veil.serve.cluster.kubernetes import KubernetesBackend

DEPLOY = kmock.resource("apps", "v1", "deployments")
PODS = kmock.resource("", "v1", "pods")
NODES = kmock.resource("", "v1", "nodes")
NS = "veil"


def deployment(replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "veil-worker", "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/component": "worker"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/component": "worker"}},
                "spec": {"containers": [{"name": "worker", "image": "veil:test"}]},
            },
        },
    }


def pod(name: str, node: str, epc: str = "32Mi") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/component": "worker"}},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "worker",
                    "image": "veil:test",
                    "resources": {"requests": {"sgx.intel.com/epc": epc}},
                }
            ],
        },
    }


def node(name: str, epc: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {"allocatable": {"sgx.intel.com/epc": epc, "cpu": "8"}},
    }


class MockCluster:
    def __init__(self) -> None:
        self.url = ""
        self.emulator: Any = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        async with kmock.KubernetesEmulator() as k, kmock.Server(k) as srv:
            k.objects[DEPLOY, NS, "veil-worker"] = deployment(2)
            k.objects[PODS, NS, "w-0"] = pod("w-0", "n1")
            k.objects[PODS, NS, "w-1"] = pod("w-1", "n1")
            k.objects[NODES, None, "n1"] = node("n1", "128Mi")
            k.objects[NODES, None, "n2"] = node("n2", "128Mi")
            k.objects[NODES, None, "cpu-only"] = node("cpu-only", "0")
            self.emulator = k
            self.url = str(srv.url).rstrip("/")
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.02)

    def __enter__(self) -> MockCluster:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("kmock did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def requests(self) -> list[Any]:
        return list(self.emulator)

    def deployment(self) -> dict[str, Any]:
        return dict(self.emulator.objects[DEPLOY, NS, "veil-worker"])


@pytest.fixture()
def cluster() -> Iterator[MockCluster]:
    with MockCluster() as c:
        yield c


def backend(c: MockCluster, name: str = "veil-worker") -> KubernetesBackend:
    return KubernetesBackend.connect(deployment=name, namespace=NS, host=c.url, timeout_s=5)


def test_reads_replicas_per_node_and_hosts(cluster: MockCluster) -> None:
    b = backend(cluster)
    assert b.current() == {"n1": 2}
    hosts = {h.name: h for h in b.hosts()}
    assert set(hosts) == {"n1", "n2"}  # the node without EPC is not a candidate
    assert hosts["n1"] == HostInfo("n1", 128.0, 64.0, 2, True)
    assert hosts["n2"].free_mb == 128.0


def test_apply_patches_replicas_and_preferred_affinity(cluster: MockCluster) -> None:
    b = backend(cluster)
    b.apply(5, {"n1": 2, "n2": 3})
    dep = cluster.deployment()
    assert dep["spec"]["replicas"] == 5
    terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    got = {t["preference"]["matchExpressions"][0]["values"][0]: t["weight"] for t in terms}
    assert got == {"n1": 67, "n2": 100}
    # the selector and containers were not clobbered
    assert dep["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/component": "worker"}
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "veil:test"
    # same host set: only replicas change, the pod template (and so the rollout) is untouched
    n_before = len(cluster.requests())
    b.apply(4, {"n1": 1, "n2": 3})
    patches = [r for r in cluster.requests()[n_before:] if str(r.method).upper().endswith("PATCH")]
    assert len(patches) == 1 and patches[0].data == {"spec": {"replicas": 4}}
    assert cluster.deployment()["spec"]["replicas"] == 4


def test_controller_scales_deployment_on_mock_api(cluster: MockCluster) -> None:
    """SLO policy + Kubernetes backend: a load burst scales the Deployment onto the free node."""
    t = [0.0]

    class Burst:
        def sample(self, now: float) -> Sample:
            return Sample(
                now,
                request_rate=80.0,
                p99_latency_s=0.3,
                concurrency=4,
                service_time_s=0.05,
                ready_replicas=2,
            )

    pol = SloAutoscaler(SloConfig(enclave_mb=32, max_replicas=8))
    ctl = Controller(pol, backend(cluster), Burst(), clock=lambda: t[0])
    assert ctl.state.replicas == 2
    t[0] = 2.0
    step = ctl.step()
    assert step.applied and step.decision.replicas == 4  # max 2x per step
    dep = cluster.deployment()
    assert dep["spec"]["replicas"] == 4
    terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert {t["preference"]["matchExpressions"][0]["values"][0] for t in terms} == {"n1", "n2"}
    assert step.decision.placement == {"n1": 2, "n2": 2}


def test_missing_deployment_is_a_clear_error(cluster: MockCluster) -> None:
    with pytest.raises(ScalingError, match="reading deployment veil/nope"):
        backend(cluster, "nope").current()
