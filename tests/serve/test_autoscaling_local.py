"""The `local` scaling backend over a LocalCluster-like object (no processes: a fake cluster)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from veil.serve.autoscaling import Sample, SloAutoscaler, SloConfig
from veil.serve.autoscaling.controller import Controller, ScalingError
from veil.serve.autoscaling.local import LocalClusterBackend
from veil.serve.epc import SimulatedEpcHost
from veil.serve.errors import ServeError

ENCLAVE = 30.0


class FakeCluster:
    """add_worker registers a simulated enclave on its host (as a worker does), remove_worker drops it."""

    def __init__(self, root: Path, fail_on: str = "") -> None:
        self.root = root
        self.gateway_url = "http://127.0.0.1:1"
        self.enclaves: dict[str, SimulatedEpcHost] = {}
        self.n = 0
        self.fail_on = fail_on
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []

    def add_worker(self, host: str = "local", package: object = None, timeout: float = 120.0) -> str:
        time.sleep(0.05)  # start-up
        if host == self.fail_on:
            raise ServeError(f"worker on {host} exited")
        with self.lock:
            self.n += 1
            rid = f"127.0.0.1:{9000 + self.n}"
            self.enclaves[rid] = SimulatedEpcHost(self.root, host, f"w{self.n}", ENCLAVE, epc_mb=100)
            self.calls.append(("add", host))
        return rid

    def remove_worker(self, rid: str, timeout: float = 60.0) -> None:
        with self.lock:
            self.enclaves.pop(rid).close()
            self.calls.append(("remove", rid))


def test_add_and_remove_follow_placement(tmp_path: Path) -> None:
    c = FakeCluster(tmp_path)
    first = c.add_worker("h0")
    b = LocalClusterBackend(c, hosts={"h0": 100, "h1": 100}, epc_root=tmp_path, initial={first: "h0"})
    assert b.current() == {"h0": 1}
    b.apply(3, {"h0": 1, "h1": 2})
    assert b.current() == {"h0": 1, "h1": 2}  # pending adds count at once
    b.wait(10)
    assert sorted(b.live.values()) == ["h0", "h1", "h1"]
    hosts = {h.name: h for h in b.hosts()}
    assert hosts["h1"].used_mb == 2 * ENCLAVE and hosts["h1"].replicas == 2 and hosts["h0"].used_mb == ENCLAVE
    b.apply(1, {"h0": 1})
    assert b.current() == {"h0": 1}  # draining replicas no longer count
    b.wait(10)
    assert list(b.live) == [first] and {h.name: h.used_mb for h in b.hosts()} == {"h0": ENCLAVE, "h1": 0.0}
    with pytest.raises(ScalingError, match="unknown host"):
        b.apply(2, {"h9": 2})
    b.close()


def test_failed_start_is_recorded_not_fatal(tmp_path: Path) -> None:
    c = FakeCluster(tmp_path, fail_on="bad")
    b = LocalClusterBackend(c, hosts={"bad": 100, "ok": 100}, epc_root=tmp_path)
    b.apply(2, {"bad": 1, "ok": 1})
    b.wait(10)
    assert b.current() == {"ok": 1} and b.errors and "exited" in b.errors[0]
    b.close()


def test_controller_scales_local_cluster_onto_free_epc(tmp_path: Path) -> None:
    """A co-tenant fills h0; the SLO policy adds the new replicas on h1 through the backend."""
    SimulatedEpcHost(tmp_path, "h0", "cotenant", 80, epc_mb=100)  # h0 pages with one worker
    c = FakeCluster(tmp_path)
    first = c.add_worker("h0")
    b = LocalClusterBackend(
        c, hosts={"h0": 100, "h1": 100}, epc_root=tmp_path, initial={first: "h0"}, enclave_mb=ENCLAVE
    )
    t = [0.0]

    class Busy:
        def sample(self, now: float) -> Sample:
            return Sample(
                now,
                request_rate=60.0,
                p99_latency_s=0.2,
                concurrency=2.0,
                service_time_s=0.02,
                ready_replicas=1,
            )

    ctl = Controller(
        SloAutoscaler(SloConfig(enclave_mb=ENCLAVE, max_replicas=6)), b, Busy(), clock=lambda: t[0]
    )
    t[0] = 1.0
    step = ctl.step()
    assert step.applied and step.decision.placement == {"h0": 1, "h1": 1}  # at most 2x per step
    t[0] = 2.0
    assert ENCLAVE <= {h.name: h.used_mb for h in b.hosts()}["h1"] <= 2 * ENCLAVE  # starting worker counts
    step = ctl.step()  # the pending add already counts: one more, not two
    assert step.applied and step.decision.placement == {"h0": 1, "h1": 2}
    b.wait(10)
    assert [x for x in c.calls if x[0] == "add"][1:] == [("add", "h1"), ("add", "h1")]
    b.close()
