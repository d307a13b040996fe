"""Routing policies for the gateway: pure ``choose(replicas, request, now) -> Replica``.

The gateway gathers a snapshot of its replicas (``Replica``: in-flight requests it has sent,
the host's EPC paging pressure and a latency estimate scraped from the worker) and asks a
policy which one gets the next request. Policies never do I/O and never read a clock: ``now``
is passed in; randomness (power-of-two-choices only) comes from an injected, seedable
``random.Random`` because routing randomness is not security-relevant.

Policies (``get_policy(name)``):

``round-robin``
    cycles through the healthy replicas in id order (cursor kept in the policy object).
``least-outstanding``
    the replica with the fewest in-flight requests (ties: lowest predicted latency, then id).
``p2c`` (``power-of-two``)
    samples two distinct healthy replicas and keeps the one with fewer in-flight requests.
``epc-aware``
    minimises the predicted completion time of the request::

        service  = service_time_s or ewma_latency_s or default_service_s
        slowdown = 1 + pressure_weight * epc_pressure
        score    = service * slowdown * (outstanding + 1) + hard_penalty_s * [epc_pressure >= hard_pressure]

    i.e. a replica on a host whose enclaves overflow the EPC (pressure > 0) is charged for the
    paging it will do, weighted by its queue, and a host at or above ``hard_pressure`` is only
    used when nothing else is available. Ties rotate so idle replicas share load.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from veil.errors import ConfigError
from veil.serve.errors import ServiceUnavailable

__all__ = [
    "POLICIES",
    "EpcAware",
    "LeastOutstanding",
    "NoReplicaAvailable",
    "PowerOfTwoChoices",
    "Replica",
    "RequestInfo",
    "RoundRobin",
    "RoutingPolicy",
    "eligible",
    "epc_score",
    "get_policy",
    "policy_names",
]


class NoReplicaAvailable(ServiceUnavailable):
    """No healthy replica can take the request (the gateway answers 503)."""


@dataclass(frozen=True)
class Replica:
    """A routing snapshot of one worker replica (immutable; the gateway builds a fresh one)."""

    id: str
    url: str
    host: str = "local"
    outstanding: int = 0
    """Requests the gateway has sent to this replica that have not completed yet."""
    epc_pressure: float = 0.0
    """Paging pressure of the replica's host: 0 = enclaves fit in the EPC, 1 = overflow equal to
    the EPC size (see :mod:`veil.serve.epc`)."""
    ewma_latency_s: float = 0.0
    """Exponentially weighted end-to-end latency observed by the gateway (0 = unknown)."""
    healthy: bool = True
    service_time_s: float = 0.0
    """Per-request service time reported by the worker, paging delay included (0 = unknown)."""
    models: frozenset[str] = field(default_factory=frozenset)
    """Models this replica serves; empty = any."""
    draining: bool = False
    """Being scaled down: receives no new requests."""
    weight: float = 1.0
    """Relative capacity (e.g. cores); divides the predicted latency in ``epc-aware``."""


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about the request being routed."""

    model: str = ""
    request_id: str = ""
    size_bytes: int = 0


def eligible(replicas: Sequence[Replica], request: RequestInfo) -> list[Replica]:
    """Healthy, non-draining replicas that serve ``request.model``, sorted by id.

    Raises :class:`NoReplicaAvailable` if there are none.
    """
    out = [
        r
        for r in replicas
        if r.healthy and not r.draining and (not r.models or not request.model or request.model in r.models)
    ]
    if not out:
        what = f" for model {request.model!r}" if request.model else ""
        raise NoReplicaAvailable(f"no healthy replica available{what} ({len(replicas)} known)")
    out.sort(key=lambda r: r.id)
    return out


@runtime_checkable
class RoutingPolicy(Protocol):
    """A routing policy: pure apart from its own small state (cursor, seeded RNG)."""

    name: str

    def choose(self, replicas: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        """Pick the replica for ``request`` at time ``now`` (NoReplicaAvailable if none)."""
        ...


class RoundRobin:
    """Cycle through eligible replicas in id order; the cursor is the only state."""

    name = "round-robin"

    def __init__(self, start: int = 0) -> None:
        self.cursor = start

    def choose(self, replicas: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        cands = eligible(replicas, request)
        pick = cands[self.cursor % len(cands)]
        self.cursor += 1
        return pick


def _predicted_s(r: Replica, default_service_s: float) -> float:
    service = r.service_time_s or r.ewma_latency_s or default_service_s
    return service * (r.outstanding + 1) / max(r.weight, 1e-9)


class LeastOutstanding:
    """Fewest in-flight requests; ties broken by predicted latency, then rotation."""

    name = "least-outstanding"

    def __init__(self, default_service_s: float = 0.05) -> None:
        self.default_service_s = default_service_s
        self._tie = 0

    def choose(self, replicas: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        cands = eligible(replicas, request)
        best = min(r.outstanding for r in cands)
        tied = [r for r in cands if r.outstanding == best]
        low = min(_predicted_s(r, self.default_service_s) for r in tied)
        tied = [r for r in tied if math.isclose(_predicted_s(r, self.default_service_s), low, rel_tol=1e-9)]
        pick = tied[self._tie % len(tied)]
        self._tie += 1
        return pick


class PowerOfTwoChoices:
    """Sample two distinct eligible replicas, keep the less loaded (Mitzenmacher)."""

    name = "p2c"

    def __init__(self, rng: random.Random | None = None, seed: int | None = None) -> None:
        # Routing randomness is not security-relevant: a seedable PRNG keeps tests reproducible.
        self.rng = rng if rng is not None else random.Random(seed)  # noqa: S311

    def choose(self, replicas: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        cands = eligible(replicas, request)
        if len(cands) == 1:
            return cands[0]
        a, b = self.rng.sample(cands, 2)
        if a.outstanding != b.outstanding:
            return a if a.outstanding < b.outstanding else b
        return a if a.epc_pressure <= b.epc_pressure else b


def epc_score(
    r: Replica,
    *,
    default_service_s: float = 0.05,
    pressure_weight: float = 4.0,
    hard_pressure: float = 1.0,
    hard_penalty_s: float = 60.0,
) -> float:
    """Predicted completion time (seconds) of one more request on ``r`` (lower is better)."""
    pressure = max(0.0, r.epc_pressure)
    slowdown = 1.0 + pressure_weight * pressure
    score = _predicted_s(r, default_service_s) * slowdown
    if pressure >= hard_pressure:
        score += hard_penalty_s
    return score


class EpcAware:
    """Prefer replicas on hosts with low EPC paging pressure, weighted by queue and latency."""

    name = "epc-aware"

    def __init__(
        self,
        *,
        default_service_s: float = 0.05,
        pressure_weight: float = 4.0,
        hard_pressure: float = 1.0,
        hard_penalty_s: float = 60.0,
    ) -> None:
        if pressure_weight < 0 or hard_pressure <= 0 or default_service_s <= 0 or hard_penalty_s < 0:
            raise ConfigError("epc-aware: weights must be >= 0 and hard_pressure, default_service_s > 0")
        self.default_service_s = default_service_s
        self.pressure_weight = pressure_weight
        self.hard_pressure = hard_pressure
        self.hard_penalty_s = hard_penalty_s
        self._tie = 0

    def score(self, r: Replica) -> float:
        return epc_score(
            r,
            default_service_s=self.default_service_s,
            pressure_weight=self.pressure_weight,
            hard_pressure=self.hard_pressure,
            hard_penalty_s=self.hard_penalty_s,
        )

    def choose(self, replicas: Sequence[Replica], request: RequestInfo, now: float) -> Replica:
        cands = eligible(replicas, request)
        scores = [self.score(r) for r in cands]
        low = min(scores)
        tied = [r for r, s in zip(cands, scores, strict=True) if math.isclose(s, low, rel_tol=1e-6)]
        pick = tied[self._tie % len(tied)]
        self._tie += 1
        return pick


POLICIES: dict[str, Callable[..., RoutingPolicy]] = {
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "p2c": PowerOfTwoChoices,
    "epc-aware": EpcAware,
}
_ALIASES = {
    "rr": "round-robin",
    "roundrobin": "round-robin",
    "least-outstanding-requests": "least-outstanding",
    "lor": "least-outstanding",
    "power-of-two": "p2c",
    "power-of-two-choices": "p2c",
    "epc": "epc-aware",
}


def policy_names() -> list[str]:
    """Canonical policy names."""
    return list(POLICIES)


def get_policy(name: str, **params: object) -> RoutingPolicy:
    """Build a policy by name (``round-robin``, ``least-outstanding``, ``p2c``, ``epc-aware``).

    ``params`` go to the policy constructor (e.g. ``seed=1`` for ``p2c``,
    ``pressure_weight=8`` for ``epc-aware``). Unknown names or parameters raise ConfigError.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in POLICIES:
        raise ConfigError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    try:
        return POLICIES[key](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for routing policy {key!r}: {exc}") from None
