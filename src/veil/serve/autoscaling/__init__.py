"""Autoscaling as pure functions: ``decide(window, state, now) -> (replicas, placement, state)``.

The controller (:mod:`veil.serve.autoscaling.controller`) scrapes metrics into a
:class:`MetricsWindow` (samples over time + one snapshot per host) and applies the decision
through a backend (local processes or a Kubernetes Deployment). Nothing in this module reads a
clock, touches a process or draws randomness.

Two policies (``get_autoscaler(name)``):

``slo`` (:class:`SloAutoscaler`, veil's)
    Targets a tail-latency SLO (default p99 ≤ 500 ms). Capacity is *effective* capacity: a
    replica on a host whose enclaves overflow the EPC serves ``1 / (1 + pressure_weight *
    pressure)`` of a healthy one, so rising paging pressure raises the replica count *before*
    the latency SLO breaks. Three rules, the largest wins:

    1. load:   ``need = rate * service_s / (slots * utilization)`` effective replicas, with
       ``utilization = min(target_utilization, 1 - service_s·ln(100) / (scale_up_at·SLO))``
       (the M/M/1 bound that keeps p99 under the scale-up threshold); ``rate`` from the stable
       window, or from the short panic window as soon as that needs ``up_tolerance`` more than
       the effective fleet (fast scale-up); a panic-window need ≥ ``panic_threshold`` × fleet
       enters panic mode (no scale-down for one stable window);
    2. paging: replicas on paging hosts count at their effective capacity (rule 1) and are
       the first removed on scale-down, so the fleet migrates off paging hosts;
    3. SLO:    if the stable-window p99 exceeds ``scale_up_at`` × SLO, grow by the ratio
       ``p99 / (scale_up_at × SLO)`` (at most ``max_step_up``×), at most once per cooldown.

    New replicas go to hosts with the most free EPC that can hold ``enclave_mb`` without
    overflowing; if none can, the scale-up is capped (``state.reason`` says so). Scale-down
    happens only after the desired count stayed lower for a whole stable window, p99 is below
    ``scale_down_below`` × SLO, outside panic mode and the cooldown, one replica at a time.

``concurrency`` (:class:`ConcurrencyAutoscaler`, the Knative-KPA / HPA-style baseline)
    ``desired = ceil(mean in-flight requests / target concurrency per replica)`` over a 60 s
    stable window and a 6 s panic window (panic when the panic desire ≥ 2× current; no
    scale-down while panicking), or, with ``metric="cpu"``, the HPA rule
    ``ceil(replicas × cpu / target_cpu)``. Placement spreads replicas evenly by count
    across hosts, as the default scheduler does; it does not see EPC usage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol, runtime_checkable

from veil.errors import ConfigError, InputError

__all__ = [
    "ANY_HOST",
    "AUTOSCALERS",
    "Autoscaler",
    "ConcurrencyAutoscaler",
    "ConcurrencyConfig",
    "Decision",
    "HostInfo",
    "MetricsWindow",
    "Sample",
    "ScalerState",
    "SloAutoscaler",
    "SloConfig",
    "decide",
    "get_autoscaler",
    "place",
]


ANY_HOST = "*"
"""Placement key used when no hosts are known: "anywhere" (backends do not pin it to a node)."""


@dataclass(frozen=True)
class Sample:
    """Service-wide metrics aggregated over one scrape interval ending at ``t``."""

    t: float
    request_rate: float = 0.0
    """Requests per second that arrived during the interval."""
    p99_latency_s: float = float("nan")
    """p99 end-to-end latency of requests completed in the interval (nan: none completed)."""
    concurrency: float = 0.0
    """Mean in-flight requests over the whole service."""
    service_time_s: float = float("nan")
    """Mean per-request busy time of a worker slot *without* paging delay (nan: unknown)."""
    cpu_utilization: float = 0.0
    """Mean CPU utilisation per replica, 0..1 (for the HPA-style baseline)."""
    ready_replicas: int = 0


@dataclass(frozen=True)
class HostInfo:
    """One host (node) as the autoscaler sees it."""

    name: str
    epc_mb: float
    used_mb: float
    """EPC used by every enclave on the host (ours and other tenants')."""
    replicas: int = 0
    """Replicas of this service on the host."""
    schedulable: bool = True

    @property
    def free_mb(self) -> float:
        return self.epc_mb - self.used_mb

    @property
    def pressure(self) -> float:
        return max(0.0, self.used_mb - self.epc_mb) / self.epc_mb if self.epc_mb > 0 else 0.0


@dataclass(frozen=True)
class MetricsWindow:
    """What the controller hands a policy: recent samples (oldest first) and current hosts."""

    samples: Sequence[Sample]
    hosts: Sequence[HostInfo] = ()

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start < s.t <= end]


@dataclass(frozen=True)
class ScalerState:
    """Everything a policy remembers between decisions (the controller stores it)."""

    replicas: int
    placement: Mapping[str, int] = field(default_factory=dict)
    last_scale_up: float = -math.inf
    last_scale_down: float = -math.inf
    panic_until: float = -math.inf
    below_since: float | None = None
    reason: str = "initial"


class Decision(NamedTuple):
    replicas: int
    placement: dict[str, int]
    state: ScalerState


@runtime_checkable
class Autoscaler(Protocol):
    name: str

    def decide(self, window: MetricsWindow, state: ScalerState, now: float) -> Decision: ...


def _finite(xs: Sequence[float]) -> list[float]:
    return [x for x in xs if not math.isnan(x) and not math.isinf(x)]


def _mean(xs: Sequence[float], default: float = 0.0) -> float:
    v = _finite(xs)
    return sum(v) / len(v) if v else default


def _check_window(window: MetricsWindow) -> None:
    for s in window.samples:
        if s.request_rate < 0 or s.concurrency < 0 or s.ready_replicas < 0:
            raise InputError(f"negative metric in sample at t={s.t}")
    names = [h.name for h in window.hosts]
    if len(set(names)) != len(names):
        raise InputError("duplicate host in metrics window")


def _check_windows(stable_window_s: float, panic_window_s: float) -> None:
    if panic_window_s <= 0 or stable_window_s < panic_window_s:
        raise ConfigError("need 0 < panic_window_s <= stable_window_s")


def _windows(
    window: MetricsWindow, state: ScalerState, now: float, stable_window_s: float, panic_window_s: float
) -> tuple[dict[str, int], int, list[Sample], list[Sample]]:
    """What every policy starts from: the validated window's current placement and replica
    count, and its samples in the stable and the panic window ending at ``now``."""
    _check_window(window)
    cur_pl = current_placement(window, state)
    cur = max(state.replicas, sum(cur_pl.values()))
    return cur_pl, cur, window.between(now - stable_window_s, now), window.between(now - panic_window_s, now)


def current_placement(window: MetricsWindow, state: ScalerState) -> dict[str, int]:
    if state.placement:
        return {h: n for h, n in state.placement.items() if n > 0}
    return {h.name: h.replicas for h in window.hosts if h.replicas > 0}


def place(
    hosts: Sequence[HostInfo],
    current: Mapping[str, int],
    target: int,
    *,
    enclave_mb: float,
    epc_aware: bool,
    pressure_weight: float = 4.0,
) -> tuple[dict[str, int], str]:
    """Grow or shrink ``current`` to ``target`` replicas; returns (placement, note).

    EPC-aware: add where free EPC (after earlier additions) is largest and fits a whole
    enclave; remove from the most-paging hosts first. Otherwise: spread evenly by count
    (fewest replicas first; remove from the most crowded host), and, when ``enclave_mb`` > 0,
    never more replicas on a host than its EPC fits by *request* accounting
    (count × enclave_mb ≤ epc_mb), as Kubernetes does with ``sgx.intel.com/epc`` requests: it
    cannot see enclaves outside its accounting (other tenants, actual vs requested size).
    """
    pl = {h: n for h, n in current.items() if n > 0}
    info = {h.name: h for h in hosts}
    extra_mb: dict[str, float] = {}  # EPC our pending changes add on each host
    note = ""
    total = sum(pl.values())
    while total < target:
        cands = [h for h in hosts if h.schedulable]
        if epc_aware:
            cands = [h for h in cands if h.free_mb - extra_mb.get(h.name, 0.0) >= enclave_mb]
            if not cands:
                note = f"EPC capacity exhausted: no host can fit another {enclave_mb:g} MiB enclave"
                break
            best = max(
                cands, key=lambda h: (h.free_mb - extra_mb.get(h.name, 0.0), -pl.get(h.name, 0), h.name)
            )
        else:
            if enclave_mb > 0:  # resource-request accounting only (what a scheduler sees)
                cands = [h for h in cands if (pl.get(h.name, 0) + 1) * enclave_mb <= h.epc_mb]
            if not cands:
                note = "no schedulable host with room for another replica's EPC request"
                break
            best = min(cands, key=lambda h: (pl.get(h.name, 0), h.name))
        pl[best.name] = pl.get(best.name, 0) + 1
        extra_mb[best.name] = extra_mb.get(best.name, 0.0) + enclave_mb
        total += 1
    while total > target:
        present = [h for h, n in pl.items() if n > 0]
        if epc_aware:

            def key(name: str) -> tuple[float, int, str]:
                h = info.get(name)
                return (h.pressure if h else 0.0, pl[name], name)

        else:

            def key(name: str) -> tuple[float, int, str]:
                return (0.0, pl[name], name)

        worst = max(present, key=key)
        pl[worst] -= 1
        if pl[worst] == 0:
            del pl[worst]
        total -= 1
    return pl, note


# ----------------------------------------------------------------------------- SLO policy (veil)


@dataclass(frozen=True)
class SloConfig:
    slo_p99_s: float = 0.5
    min_replicas: int = 1
    max_replicas: int = 20
    slots_per_replica: int = 1
    """Requests one replica serves concurrently (enclave threads)."""
    target_utilization: float = 0.6
    default_service_s: float = 0.05
    enclave_mb: float = 32.0
    stable_window_s: float = 30.0
    panic_window_s: float = 3.0
    panic_threshold: float = 2.0
    scale_up_at: float = 0.8
    scale_down_below: float = 0.7
    max_step_up: float = 2.0
    scale_up_cooldown_s: float = 5.0
    scale_down_cooldown_s: float = 30.0
    pressure_weight: float = 4.0
    """Paging slowdown per unit of pressure, as in the epc-aware router."""
    pressure_threshold: float = 0.02
    up_tolerance: float = 0.1
    """Scale up on the panic window alone once it needs this much more than the effective fleet."""

    def __post_init__(self) -> None:
        if not 0 < self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"need 0 < min_replicas <= max_replicas (got {self.min_replicas}, {self.max_replicas})"
            )
        if self.slo_p99_s <= 0 or not 0 < self.target_utilization <= 1 or self.slots_per_replica < 1:
            raise ConfigError("need slo_p99_s > 0, 0 < target_utilization <= 1, slots_per_replica >= 1")
        _check_windows(self.stable_window_s, self.panic_window_s)
        if not 0 < self.scale_down_below < self.scale_up_at or self.max_step_up <= 1:
            raise ConfigError("need 0 < scale_down_below < scale_up_at and max_step_up > 1")


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


class SloAutoscaler:
    """veil's tail-latency-SLO autoscaler with paging pressure as the early signal."""

    name = "slo"

    def __init__(self, config: SloConfig | None = None) -> None:
        self.config = config or SloConfig()

    def effective_replicas(
        self,
        placement: Mapping[str, int],
        hosts: Sequence[HostInfo],
        baseline: Mapping[str, int] | None = None,
    ) -> float:
        """Capacity of ``placement`` in healthy-replica units; host pressure is recomputed for the
        enclaves ``placement`` adds or removes relative to ``baseline`` (the running placement)."""
        c = self.config
        base = baseline if baseline is not None else placement
        info = {h.name: h for h in hosts}
        eff = 0.0
        for name, n in placement.items():
            h = info.get(name)
            p = 0.0
            if h is not None and h.epc_mb > 0:
                used = h.used_mb + c.enclave_mb * (n - base.get(name, 0))
                p = max(0.0, used - h.epc_mb) / h.epc_mb
            p = p if p >= c.pressure_threshold else 0.0
            eff += n / (1.0 + c.pressure_weight * p)
        return eff

    def utilization_target(self, service_s: float) -> float:
        """Per-slot utilisation at which an M/M/1 queue keeps p99 under ``scale_up_at`` × SLO
        (p99 ≈ S·ln(100)/(1-ρ)), capped by ``target_utilization``."""
        c = self.config
        bound = 1.0 - service_s * math.log(100) / (c.scale_up_at * c.slo_p99_s)
        return max(0.05, min(c.target_utilization, bound))

    def decide(self, window: MetricsWindow, state: ScalerState, now: float) -> Decision:
        c = self.config
        cur_pl, cur, stable, panic = _windows(window, state, now, c.stable_window_s, c.panic_window_s)
        if not stable:
            pl, _ = self._fit(window, cur_pl, _clamp(cur, c.min_replicas, c.max_replicas))
            st = replace(state, replicas=sum(pl.values()), placement=pl, reason="no metrics: hold")
            return Decision(st.replicas, pl, st)

        service = _mean([s.service_time_s for s in stable], c.default_service_s)
        rate_stable = _mean([s.request_rate for s in stable])
        rate_panic = _mean([s.request_rate for s in panic], rate_stable)
        per_replica = c.slots_per_replica * self.utilization_target(service) / service  # req/s at target
        need_stable = rate_stable / per_replica
        need_panic = rate_panic / per_replica
        eff_now = self.effective_replicas(cur_pl, window.hosts) if window.hosts else float(cur)
        in_panic = now < state.panic_until
        reasons: list[str] = []
        if need_panic >= c.panic_threshold * max(eff_now, 1e-9) and need_panic > need_stable:
            in_panic = True
            state = replace(state, panic_until=now + c.stable_window_s)
            reasons.append(f"panic: rate {rate_panic:.1f}/s")
        need = max(need_stable, need_panic if in_panic else 0.0)
        if need_panic > need_stable and need_panic > eff_now * (1.0 + c.up_tolerance):
            # fast path up (HPA-style tolerance): the short window already needs more than we have
            need = max(need, need_panic)
        if cur - eff_now > 0.05:
            reasons.append(f"paging: {cur - eff_now:.2f} replicas lost to EPC paging")
        desired, note = self._smallest_meeting(window, cur_pl, need)
        # the SLO rule looks only at latency measured after the last scale-up settled
        settled = [s for s in stable if s.t > state.last_scale_up + c.scale_up_cooldown_s]
        p99s = _finite([s.p99_latency_s for s in settled])
        p99 = max(p99s) if p99s else 0.0
        if p99 > c.scale_up_at * c.slo_p99_s and now - state.last_scale_up >= c.scale_up_cooldown_s:
            ratio = min(c.max_step_up, p99 / (c.scale_up_at * c.slo_p99_s))
            desired = max(desired, math.ceil(cur * ratio))
            reasons.append(f"p99 {p99 * 1e3:.0f} ms > {c.scale_up_at:g}×SLO")
        desired = _clamp(desired, c.min_replicas, c.max_replicas)
        if desired > cur:
            desired = min(desired, math.ceil(max(cur, 1) * c.max_step_up))
            pl, note2 = self._fit(window, cur_pl, desired)
            note = note or note2
            if sum(pl.values()) > cur:
                why = "; ".join(reasons) or f"load {need:.2f} replicas"
                st = replace(
                    state,
                    replicas=sum(pl.values()),
                    placement=pl,
                    last_scale_up=now,
                    below_since=None,
                    reason=f"scale up: {why}" + (f" ({note})" if note else ""),
                )
                return Decision(st.replicas, pl, st)
            st = replace(state, replicas=cur, placement=cur_pl, below_since=None, reason=f"capped: {note}")
            return Decision(cur, dict(cur_pl), st)
        if cur > c.max_replicas:  # the bound was lowered: obey it at once
            pl, _ = self._fit(window, cur_pl, c.max_replicas)
            st = replace(
                state,
                replicas=sum(pl.values()),
                placement=pl,
                last_scale_down=now,
                below_since=None,
                reason=f"scale down to max_replicas={c.max_replicas}",
            )
            return Decision(st.replicas, pl, st)
        calm = self._calm_after_removal(window, stable, cur_pl, cur, rate_stable, service)
        if desired < cur and calm and not in_panic:
            below_since = state.below_since if state.below_since is not None else now
            if (
                now - below_since >= c.stable_window_s
                and now - state.last_scale_down >= c.scale_down_cooldown_s
                and now - state.last_scale_up >= c.scale_down_cooldown_s
            ):
                pl, _ = self._fit(window, cur_pl, cur - 1)
                st = replace(
                    state,
                    replicas=cur - 1,
                    placement=pl,
                    last_scale_down=now,
                    below_since=now,
                    reason=f"scale down: load {need:.2f} replicas",
                )
                return Decision(st.replicas, pl, st)
            st = replace(state, replicas=cur, placement=cur_pl, below_since=below_since, reason="hold")
            return Decision(cur, dict(cur_pl), st)
        st = replace(state, replicas=cur, placement=cur_pl, below_since=None, reason="steady")
        return Decision(cur, dict(cur_pl), st)

    def _calm_after_removal(
        self,
        window: MetricsWindow,
        stable: Sequence[Sample],
        cur_pl: Mapping[str, int],
        cur: int,
        rate: float,
        service: float,
    ) -> bool:
        """Would p99 stay under ``scale_down_below`` × SLO with one replica fewer?

        The measured stable-window p99 is projected with the M/M/1 shape p99 ∝ 1/(1-ρ):
        ``p99' = p99 · (1-ρ)/(1-ρ')`` where ρ, ρ' are the utilisations before and after.
        """
        c = self.config
        if cur <= c.min_replicas:
            return False
        p99s = _finite([s.p99_latency_s for s in stable])
        p99 = max(p99s) if p99s else 0.0
        pl_after, _ = self._fit(window, cur_pl, cur - 1)
        if window.hosts:
            eff_now = self.effective_replicas(cur_pl, window.hosts)
            eff_after = self.effective_replicas(pl_after, window.hosts, cur_pl)
        else:
            eff_now, eff_after = float(cur), float(cur - 1)
        cap = c.slots_per_replica / service
        rho = rate / (cap * max(eff_now, 1e-9))
        rho_after = rate / (cap * max(eff_after, 1e-9))
        if rho_after >= self.utilization_target(service) or rho >= 1:
            return False
        projected = p99 * (1 - rho) / (1 - rho_after)
        return projected < c.scale_down_below * c.slo_p99_s

    def _smallest_meeting(
        self, window: MetricsWindow, cur_pl: Mapping[str, int], need: float
    ) -> tuple[int, str]:
        """Fewest replicas (min..max) whose EPC-aware placement has effective capacity ≥ need."""
        c = self.config
        if not window.hosts:
            return _clamp(math.ceil(need - 1e-9), c.min_replicas, c.max_replicas), ""
        best, note = c.min_replicas, ""
        for n in range(c.min_replicas, c.max_replicas + 1):
            pl, note = self._fit(window, cur_pl, n)
            if sum(pl.values()) < n:
                break
            best = n
            if self.effective_replicas(pl, window.hosts, cur_pl) >= need - 1e-9:
                return n, ""
        return best, note

    def _fit(
        self, window: MetricsWindow, cur_pl: Mapping[str, int], target: int
    ) -> tuple[dict[str, int], str]:
        if not window.hosts:
            return ({ANY_HOST: target}, "") if target else ({}, "")
        return place(
            window.hosts,
            cur_pl,
            target,
            enclave_mb=self.config.enclave_mb,
            epc_aware=True,
            pressure_weight=self.config.pressure_weight,
        )


# ----------------------------------------------------------------------------- baseline (KPA / HPA)


@dataclass(frozen=True)
class ConcurrencyConfig:
    metric: str = "concurrency"
    """``concurrency`` (Knative KPA) or ``cpu`` (Kubernetes HPA)."""
    target: float = 0.7
    """Target in-flight requests per replica (concurrency) or CPU utilisation (cpu)."""
    min_replicas: int = 1
    max_replicas: int = 20
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_down_delay_s: float = 0.0
    request_mb: float = 0.0
    """EPC each replica requests (scheduler accounting, 0 = none)."""

    def __post_init__(self) -> None:
        if self.metric not in {"concurrency", "cpu"}:
            raise ConfigError(f"baseline metric must be 'concurrency' or 'cpu', not {self.metric!r}")
        if self.target <= 0 or not 0 < self.min_replicas <= self.max_replicas:
            raise ConfigError("need target > 0 and 0 < min_replicas <= max_replicas")
        _check_windows(self.stable_window_s, self.panic_window_s)


class ConcurrencyAutoscaler:
    """The Knative/HPA-style baseline: scale on concurrency (or CPU), spread by count."""

    name = "concurrency"

    def __init__(self, config: ConcurrencyConfig | None = None) -> None:
        self.config = config or ConcurrencyConfig()

    def _want(self, samples: Sequence[Sample], cur: int) -> float:
        c = self.config
        if c.metric == "concurrency":
            return _mean([s.concurrency for s in samples]) / c.target
        ready = _mean([float(s.ready_replicas) for s in samples], float(cur)) or float(cur)
        return ready * _mean([s.cpu_utilization for s in samples]) / c.target

    def decide(self, window: MetricsWindow, state: ScalerState, now: float) -> Decision:
        c = self.config
        cur_pl, cur, stable, panic = _windows(window, state, now, c.stable_window_s, c.panic_window_s)
        if not stable:
            st = replace(state, reason="no metrics: hold")
            return Decision(cur, dict(cur_pl) or self._fit(window, {}, cur), st)
        want_stable = math.ceil(self._want(stable, cur) - 1e-9)
        want_panic = math.ceil(self._want(panic, cur) - 1e-9) if panic else want_stable
        in_panic = now < state.panic_until
        if want_panic >= c.panic_threshold * max(cur, 1):
            in_panic = True
            state = replace(state, panic_until=now + c.stable_window_s)
        desired = max(want_stable, want_panic) if in_panic else want_stable
        if in_panic:
            desired = max(desired, cur)  # never scale down while panicking
        desired = min(desired, math.ceil(max(cur, 1) * c.max_scale_up_rate))
        desired = max(desired, math.floor(cur / c.max_scale_down_rate))
        if desired < cur and c.scale_down_delay_s > 0:
            below = state.below_since if state.below_since is not None else now
            if now - below < c.scale_down_delay_s:
                st = replace(state, replicas=cur, placement=cur_pl, below_since=below, reason="hold")
                return Decision(cur, dict(cur_pl), st)
        desired = _clamp(desired, c.min_replicas, c.max_replicas)
        pl = self._fit(window, cur_pl, desired)
        n = sum(pl.values())
        reason = (
            "steady"
            if n == cur
            else ("scale up" if n > cur else "scale down") + (" (panic)" if in_panic else "")
        )
        st = replace(
            state,
            replicas=n,
            placement=pl,
            last_scale_up=now if n > cur else state.last_scale_up,
            last_scale_down=now if n < cur else state.last_scale_down,
            below_since=None,
            reason=reason,
        )
        return Decision(n, pl, st)

    def _fit(self, window: MetricsWindow, cur_pl: Mapping[str, int], target: int) -> dict[str, int]:
        if not window.hosts:
            return {ANY_HOST: target} if target else {}
        return place(window.hosts, cur_pl, target, enclave_mb=self.config.request_mb, epc_aware=False)[0]


AUTOSCALERS = {"slo": SloAutoscaler, "concurrency": ConcurrencyAutoscaler}


def get_autoscaler(name: str, **params: object) -> Autoscaler:
    """``slo`` (veil) or ``concurrency`` (KPA/HPA baseline); ``params`` build its config."""
    key = name.strip().lower()
    key = {"kpa": "concurrency", "hpa": "concurrency", "knative": "concurrency", "veil": "slo"}.get(key, key)
    if name.strip().lower() == "hpa":
        params.setdefault("metric", "cpu")
    try:
        if key == "slo":
            return SloAutoscaler(SloConfig(**params))  # type: ignore[arg-type]
        if key == "concurrency":
            return ConcurrencyAutoscaler(ConcurrencyConfig(**params))  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"bad parameters for autoscaler {key!r}: {exc}") from None
    raise ConfigError(f"unknown autoscaler {name!r}; choose one of {', '.join(AUTOSCALERS)}")


def decide(
    window: MetricsWindow, state: ScalerState, now: float, *, policy: Autoscaler | None = None
) -> Decision:
    """Module-level entry point: veil's SLO policy with default settings unless ``policy`` given."""
    return (policy or SloAutoscaler()).decide(window, state, now)
