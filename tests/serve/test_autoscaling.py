"""Autoscaling policies on synthetic metric traces (no processes, injected time)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest

from veil.errors import ConfigError, InputError
from veil.serve.autoscaling import (
    ConcurrencyAutoscaler,
    ConcurrencyConfig,
    HostInfo,
    MetricsWindow,
    Sample,
    ScalerState,
    SloAutoscaler,
    SloConfig,
    decide,
    get_autoscaler,
    place,
)

SERVICE = 0.05  # s per request per slot
ENCLAVE = 30.0  # MiB


def fluid_p99(rate: float, placement: dict[str, int], pressure: dict[str, float]) -> float:
    """p99 of an M/M/1-per-replica fluid model with capacity-proportional routing."""
    caps = [n / (SERVICE * (1 + 4 * pressure.get(h, 0.0))) for h, n in placement.items()]
    cap = sum(caps)
    if cap <= 0:
        return 10.0
    rho = rate / cap
    if rho >= 1:
        return 10.0
    return min(10.0, SERVICE * math.log(100) / (1 - rho))


def hosts_for(
    placement: dict[str, int], budgets: dict[str, float], tenants: dict[str, float]
) -> list[HostInfo]:
    return [
        HostInfo(h, epc, tenants.get(h, 0.0) + ENCLAVE * placement.get(h, 0), placement.get(h, 0))
        for h, epc in budgets.items()
    ]


def run(
    policy: SloAutoscaler | ConcurrencyAutoscaler,
    rate_at: Callable[[float], float],
    *,
    duration: float = 300.0,
    step: float = 2.0,
    budgets: dict[str, float] | None = None,
    tenants_at: Callable[[float], dict[str, float]] = lambda t: {},
    start: dict[str, int] | None = None,
    noise: random.Random | None = None,
) -> list[tuple[float, int, float, dict[str, int]]]:
    """Closed loop: metrics from the fluid model, decision applied instantly. Returns the trace."""
    budgets = budgets or {"h0": 100.0, "h1": 100.0, "h2": 100.0}
    pl = dict(start or {"h0": 1})
    state = ScalerState(replicas=sum(pl.values()), placement=pl)
    samples: list[Sample] = []
    trace = []
    t = 0.0
    while t < duration:
        t += step
        tenants = tenants_at(t)
        hosts = hosts_for(pl, budgets, tenants)
        pressure = {h.name: h.pressure for h in hosts}
        rate = rate_at(t) * (1 + noise.uniform(-0.15, 0.15) if noise else 1)
        p99 = fluid_p99(rate, pl, pressure)
        n = sum(pl.values())
        # Little's law with the M/M/1 mean (p99 / ln 100): in-flight requests grow with the queue
        concurrency = rate * p99 / math.log(100)
        cpu = min(1.0, rate * SERVICE / max(n, 1))
        samples.append(
            Sample(
                t,
                rate,
                p99,
                concurrency=concurrency,
                service_time_s=SERVICE,
                cpu_utilization=cpu,
                ready_replicas=n,
            )
        )
        window = MetricsWindow(samples[-40:], hosts)
        d = policy.decide(window, state, t)
        state = d.state
        pl = d.placement
        assert d.replicas == sum(pl.values())
        trace.append((t, d.replicas, p99, dict(pl)))
    return trace


def changes(trace: list[tuple[float, int, float, dict[str, int]]], after: float = 0.0) -> int:
    reps = [r for t, r, _, _ in trace if t >= after]
    return sum(1 for a, b in itertools.pairwise(reps) if a != b)


def test_scales_up_on_paging_before_slo_breaks() -> None:
    """A co-tenant enclave makes h0 page at t=100; the SLO policy adds capacity on free hosts
    before p99 gets anywhere near the SLO, while latency alone would not yet react."""
    pol = SloAutoscaler(SloConfig(enclave_mb=ENCLAVE, min_replicas=2))
    trace = run(
        pol,
        lambda t: 20.0,
        start={"h0": 2},
        tenants_at=lambda t: {"h0": 60.0} if t >= 100 else {},
        budgets={"h0": 100.0, "h1": 100.0, "h2": 100.0},
    )
    before = {r for t, r, _, _ in trace if 60 <= t < 100}
    assert len(before) == 1
    n0 = before.pop()
    first_up = next(t for t, r, _, _ in trace if t >= 100 and r > n0)
    assert first_up <= 102  # same scrape the pressure appears
    # the new replica went to a host with free EPC, never to the paging one
    pl_after = next(p for t, r, _, p in trace if t == first_up)
    assert sum(v for h, v in pl_after.items() if h != "h0") >= 1
    # and p99 never broke the SLO in the whole run
    assert max(p for t, _, p, _ in trace) <= pol.config.slo_p99_s
    # eventually the fleet migrated off the paging host
    final = trace[-1][3]
    assert final.get("h0", 0) <= 1


def test_paging_signal_leads_latency() -> None:
    """With pressure rising but p99 still far below the SLO, one decision already scales up."""
    pol = SloAutoscaler(SloConfig(enclave_mb=ENCLAVE))
    hosts = [HostInfo("h0", 100, 160, 2), HostInfo("h1", 100, 0, 0)]
    samples = [Sample(float(t), 20.0, 0.12, 1.0, SERVICE, ready_replicas=2) for t in range(1, 31)]
    d = pol.decide(MetricsWindow(samples, hosts), ScalerState(2, {"h0": 2}), 30.0)
    assert d.replicas > 2 and d.placement.get("h1", 0) >= 1 and d.placement["h0"] == 2
    assert "paging" in d.state.reason
    # the baseline sees the same (unchanged) concurrency and does nothing
    base = ConcurrencyAutoscaler(ConcurrencyConfig(target=0.7))
    assert base.decide(MetricsWindow(samples, hosts), ScalerState(2, {"h0": 2}), 30.0).replicas == 2


def test_spike_slo_policy_keeps_slo() -> None:
    pol = SloAutoscaler(SloConfig(enclave_mb=ENCLAVE, max_replicas=12))
    budgets = {f"h{i}": 100.0 for i in range(4)}
    spike = lambda t: 60.0 if 100 <= t < 160 else 20.0  # noqa: E731
    trace = run(pol, spike, budgets=budgets, start={"h0": 2})
    slo = pol.config.slo_p99_s
    # measure-then-act: only the scrape in which the step arrives may violate the SLO
    assert [t for t, _, p, _ in trace if t >= 40 and p > slo] == [100.0]
    peak = max(r for _, r, _, _ in trace)
    assert 5 <= peak <= 12
    assert trace[-1][1] < peak  # scaled back down after the spike


@pytest.mark.parametrize("policy", [SloAutoscaler(SloConfig(enclave_mb=ENCLAVE)), ConcurrencyAutoscaler()])
def test_no_flapping_on_noise(policy: SloAutoscaler | ConcurrencyAutoscaler) -> None:
    trace = run(
        policy,
        lambda t: 30.0,
        duration=900,
        noise=random.Random(3),
        budgets={f"h{i}": 200.0 for i in range(3)},
    )
    assert changes(trace, after=200) <= 1, [r for _, r, _, _ in trace]


def test_respects_min_and_max() -> None:
    pol = SloAutoscaler(SloConfig(min_replicas=2, max_replicas=5, enclave_mb=1.0))
    big = {f"h{i}": 1000.0 for i in range(3)}
    trace = run(pol, lambda t: 10_000.0, budgets=big, duration=60)
    assert max(r for _, r, _, _ in trace) == 5
    trace = run(pol, lambda t: 0.0, budgets=big, duration=600, start={"h0": 4})
    assert min(r for _, r, _, _ in trace) == 2 and trace[-1][1] == 2
    base = ConcurrencyAutoscaler(ConcurrencyConfig(min_replicas=2, max_replicas=5))
    trace = run(base, lambda t: 10_000.0, budgets=big, duration=60)
    assert max(r for _, r, _, _ in trace) == 5
    trace = run(base, lambda t: 0.0, budgets=big, duration=300, start={"h0": 4})
    assert trace[-1][1] == 2


def test_respects_epc_capacity() -> None:
    """Two hosts of 100 MiB fit three 30 MiB enclaves each: never more, never overflowing."""
    pol = SloAutoscaler(SloConfig(enclave_mb=ENCLAVE, max_replicas=20))
    budgets = {"h0": 100.0, "h1": 100.0}
    trace = run(pol, lambda t: 500.0, budgets=budgets, duration=120)
    assert max(r for _, r, _, _ in trace) == 6
    for _, _, _, pl in trace:
        assert all(n * ENCLAVE <= budgets[h] for h, n in pl.items())
    hosts = [HostInfo("h0", 100, 90, 3), HostInfo("h1", 100, 90, 3)]
    samples = [Sample(float(t), 500.0, 2.0, 10, SERVICE, ready_replicas=6) for t in range(1, 31)]
    d = pol.decide(MetricsWindow(samples, hosts), ScalerState(6, {"h0": 3, "h1": 3}), 31.0)
    assert d.replicas == 6 and "EPC capacity exhausted" in d.state.reason


def test_baseline_ignores_epc_and_spreads() -> None:
    pl, _ = place([HostInfo("a", 100, 95), HostInfo("b", 100, 0)], {}, 4, enclave_mb=30, epc_aware=False)
    assert pl == {"a": 2, "b": 2}
    pl, note = place([HostInfo("a", 100, 95), HostInfo("b", 100, 0)], {}, 4, enclave_mb=30, epc_aware=True)
    assert pl == {"b": 3} and "exhausted" in note
    # with request accounting (k8s + sgx.intel.com/epc): at most 3 x 30 MiB per 100 MiB host,
    # but a co-tenant's 95 MiB on "a" stays invisible
    pl, note = place([HostInfo("a", 100, 95), HostInfo("b", 100, 0)], {}, 8, enclave_mb=30, epc_aware=False)
    assert pl == {"a": 3, "b": 3} and "no schedulable host" in note
    # scale-down removes from the paging host first
    hosts = [HostInfo("a", 100, 150, 2), HostInfo("b", 100, 60, 2)]
    pl, _ = place(hosts, {"a": 2, "b": 2}, 2, enclave_mb=30, epc_aware=True)
    assert pl == {"b": 2}


def test_hpa_cpu_metric() -> None:
    hpa = get_autoscaler("hpa", target=0.5)
    samples = [Sample(float(t), cpu_utilization=0.9, ready_replicas=2) for t in range(1, 61)]
    d = hpa.decide(MetricsWindow(samples, [HostInfo("h", 100, 0, 2)]), ScalerState(2, {"h": 2}), 60.0)
    assert d.replicas == 4


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError):
        SloConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError):
        get_autoscaler("magic")
    with pytest.raises(ConfigError, match="bad parameters"):
        get_autoscaler("slo", nope=1)
    with pytest.raises(ConfigError):
        ConcurrencyConfig(metric="gpu")
    with pytest.raises(InputError):
        decide(MetricsWindow([Sample(1.0, request_rate=-1)]), ScalerState(1), 1.0)
    with pytest.raises(InputError):
        decide(MetricsWindow([Sample(1.0)], [HostInfo("a", 1, 0), HostInfo("a", 1, 0)]), ScalerState(1), 1.0)
    d = decide(MetricsWindow([]), ScalerState(3), 5.0)
    assert d.replicas == 3 and "no metrics" in d.state.reason


def test_lowered_max_is_obeyed_at_once() -> None:
    pol = SloAutoscaler(SloConfig(max_replicas=3, enclave_mb=ENCLAVE))
    hosts = [HostInfo("h0", 1000, 150, 5), HostInfo("h1", 1000, 0, 0)]
    samples = [Sample(float(t), 500.0, 2.0, 20, SERVICE, ready_replicas=5) for t in range(1, 31)]
    d = pol.decide(MetricsWindow(samples, hosts), ScalerState(5, {"h0": 5}), 31.0)
    assert d.replicas == 3 and d.placement == {"h0": 3}
