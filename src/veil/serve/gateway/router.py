"""The gateway's view of its replicas, and the routing policy it asks (``veil.serve.routing``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from veil.serve.routing import NoReplicaAvailable, Replica, RequestInfo, get_policy

__all__ = ["NoReplicaAvailable", "ReplicaState", "Router"]


@dataclass
class ReplicaState:
    """Mutable bookkeeping for one worker; :meth:`snapshot` gives the policy a frozen Replica."""

    id: str
    url: str
    host: str = "local"
    healthy: bool = False
    outstanding: int = 0
    ewma_latency_s: float = 0.0
    epc_pressure: float = 0.0
    service_time_s: float = 0.0
    models: frozenset[str] = field(default_factory=frozenset)
    tee: str = ""
    failures: int = 0
    draining: bool = False

    def snapshot(self) -> Replica:
        return Replica(
            id=self.id,
            url=self.url,
            host=self.host,
            outstanding=self.outstanding,
            epc_pressure=self.epc_pressure,
            ewma_latency_s=self.ewma_latency_s,
            healthy=self.healthy,
            service_time_s=self.service_time_s,
            models=self.models,
            draining=self.draining,
        )

    def observe_latency(self, seconds: float) -> None:
        self.ewma_latency_s = (
            seconds if self.ewma_latency_s == 0 else 0.8 * self.ewma_latency_s + 0.2 * seconds
        )


class Router:
    def __init__(self, policy: str = "round-robin", clock: Callable[[], float] | None = None) -> None:
        import time

        self.policy_name = policy
        self.policy = get_policy(policy)
        self._clock = clock or time.monotonic
        self.replicas: dict[str, ReplicaState] = {}

    def add(self, url: str, host: str = "local") -> ReplicaState:
        rid = url.rstrip("/").split("//", 1)[-1]
        st = self.replicas.get(rid)
        if st is None:
            st = self.replicas[rid] = ReplicaState(id=rid, url=url.rstrip("/"), host=host)
        return st

    def remove(self, rid: str) -> None:
        self.replicas.pop(rid, None)

    def choose(self, model: str, request_id: str, exclude: Sequence[str] = ()) -> ReplicaState:
        snaps = [r.snapshot() for r in self.replicas.values() if r.id not in exclude]
        chosen = self.policy.choose(snaps, RequestInfo(model=model, request_id=request_id), self._clock())
        return self.replicas[chosen.id]
