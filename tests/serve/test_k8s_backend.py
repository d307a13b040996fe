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


# ----------------------------------------------------------------------------- metrics + entry point


def _prom_text(observations: list[float]) -> str:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    reg = CollectorRegistry()
    h = Histogram(
        "veil_gateway_request_seconds",
        "latency",
        registry=reg,
        buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
    )
    for x in observations:
        h.observe(x)
    return generate_latest(reg).decode()


def test_prometheus_source_rate_p99_concurrency() -> None:
    from veil.errors import InputError
    from veil.serve.autoscaling.prometheus import PrometheusSource

    texts = iter([_prom_text([0.02] * 10), _prom_text([0.02] * 10 + [0.02] * 99 + [0.4])])
    src = PrometheusSource(lambda: next(texts), service_time_s=0.02)
    first = src.sample(10.0)
    assert first.request_rate == 0.0 and first.service_time_s == 0.02
    s = src.sample(12.0)
    assert s.request_rate == pytest.approx(50.0)
    assert s.p99_latency_s == 0.05  # 99 of the 100 new requests fall in the 50 ms bucket
    assert s.concurrency == pytest.approx(50.0 * (99 * 0.02 + 0.4) / 100)
    bad = PrometheusSource(lambda: "# nothing here\n")
    with pytest.raises(InputError, match="not found"):
        bad.sample(1.0)


class _Metrics:
    """Serves a new Prometheus text on each scrape (load grows between scrapes)."""

    def __init__(self, texts: list[str]) -> None:
        import http.server

        texts_iter = iter(texts)
        last = {"t": texts[-1]}

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = next(texts_iter, last["t"]).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/metrics"
        self.t = threading.Thread(target=self.srv.serve_forever, daemon=True)

    def __enter__(self) -> _Metrics:
        self.t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.srv.shutdown()
        self.t.join(5)


def test_autoscaler_entry_point_scales_on_mock_cluster(
    cluster: MockCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m veil.serve.autoscaling --once`: 200 req/s at p99 ≥ SLO → the Deployment grows."""
    from veil.serve.autoscaling.__main__ import main

    slow = [0.6] * 400  # 400 requests in the 2 s interval, all slower than the SLO
    with _Metrics([_prom_text([]), _prom_text(slow)]) as m:
        rc = main(
            [
                "--namespace",
                NS,
                "--deployment",
                "veil-worker",
                "--api-url",
                cluster.url,
                "--metrics-url",
                m.url,
                "--interval",
                "2",
                "--enclave-mb",
                "32",
                "--max-replicas",
                "6",
                "--service-ms",
                "20",
                "--once",
            ]
        )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert cluster.deployment()["spec"]["replicas"] == 4, out  # 2 -> 4 (max 2x per step)
    assert "replicas=4" in out


def test_autoscaler_entry_point_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from veil.serve.autoscaling.__main__ import main

    rc = main(
        [
            "--namespace",
            NS,
            "--deployment",
            "w",
            "--api-url",
            "http://127.0.0.1:9",
            "--metrics-url",
            "http://127.0.0.1:9/metrics",
            "--interval",
            "0",
            "--once",
        ]
    )
    assert rc == 2 and "--interval must be > 0" in capsys.readouterr().err


def test_placement_without_known_nodes_does_not_touch_affinity(cluster: MockCluster) -> None:
    from veil.serve.autoscaling import ANY_HOST, MetricsWindow, ScalerState

    pol = SloAutoscaler(SloConfig(max_replicas=8))
    samples = [Sample(float(t), 80.0, 0.3, 4, 0.05, ready_replicas=2) for t in range(1, 5)]
    d = pol.decide(MetricsWindow(samples, []), ScalerState(2), 4.0)
    assert d.placement == {ANY_HOST: 4}
    n_before = len(cluster.requests())
    backend(cluster).apply(d.replicas, d.placement)
    patches = [r for r in cluster.requests()[n_before:] if str(r.method).upper().endswith("PATCH")]
    assert [p.data for p in patches] == [{"spec": {"replicas": 4}}]
    assert "affinity" not in cluster.deployment()["spec"]["template"]["spec"]
