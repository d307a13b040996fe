"""The autoscaling controller: gather a metrics window, call a pure policy, apply the decision.

All the impure parts live here and in the backends; the policy (:mod:`veil.serve.autoscaling`)
stays a pure function of (window, state, now). The clock is injected so the loop can be driven
step by step in tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from veil.errors import VeilError
from veil.serve.autoscaling import Autoscaler, Decision, HostInfo, MetricsWindow, Sample, ScalerState

__all__ = ["Controller", "ControllerStep", "MetricsSource", "ScalingBackend", "ScalingError"]

log = logging.getLogger("veil.serve.autoscaling")


class ScalingError(VeilError):
    """A backend could not read or apply a scaling decision."""


@runtime_checkable
class ScalingBackend(Protocol):
    """Applies decisions: local worker processes, or a Kubernetes Deployment."""

    name: str

    def current(self) -> dict[str, int]:
        """Replicas per host now (running or starting)."""
        ...

    def apply(self, replicas: int, placement: Mapping[str, int]) -> None:
        """Make the service have ``replicas`` replicas, placed as ``placement`` (host → count)."""
        ...

    def hosts(self) -> list[HostInfo]:
        """The hosts the backend can place replicas on, with their EPC use."""
        ...


@runtime_checkable
class MetricsSource(Protocol):
    """Produces one service-wide sample per scrape (the gateway's counters, a Prometheus query...)."""

    def sample(self, now: float) -> Sample: ...


@dataclass(frozen=True)
class ControllerStep:
    t: float
    sample: Sample
    decision: Decision
    applied: bool


class Controller:
    """Runs ``policy`` every ``interval_s`` against ``source`` and applies through ``backend``."""

    def __init__(
        self,
        policy: Autoscaler,
        backend: ScalingBackend,
        source: MetricsSource,
        *,
        interval_s: float = 2.0,
        window_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        on_step: Callable[[ControllerStep], None] | None = None,
    ) -> None:
        self.policy = policy
        self.backend = backend
        self.source = source
        self.interval_s = interval_s
        self.window_s = window_s
        self.clock = clock
        self.on_step = on_step
        cur = backend.current()
        self.state = ScalerState(replicas=sum(cur.values()), placement=cur)
        self.samples: deque[Sample] = deque()
        self.history: list[ControllerStep] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        log.info(
            "autoscaler %s on backend %s, %d replicas at start",
            policy.name,
            backend.name,
            self.state.replicas,
        )

    def step(self) -> ControllerStep:
        """One scrape → decide → apply cycle."""
        now = self.clock()
        s = self.source.sample(now)
        self.samples.append(s)
        while self.samples and self.samples[0].t < now - self.window_s:
            self.samples.popleft()
        hosts: Sequence[HostInfo] = self.backend.hosts()
        decision = self.policy.decide(MetricsWindow(list(self.samples), hosts), self.state, now)
        applied = False
        if decision.replicas != self.state.replicas or dict(decision.placement) != dict(self.state.placement):
            log.info(
                "autoscaler: %d -> %d replicas %s (%s)",
                self.state.replicas,
                decision.replicas,
                dict(decision.placement),
                decision.state.reason,
            )
            self.backend.apply(decision.replicas, decision.placement)
            applied = True
        self.state = decision.state
        step = ControllerStep(now, s, decision, applied)
        self.history.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return step

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except VeilError as exc:  # keep running: a failed scrape or apply is retried next tick
                log.warning("autoscaler step failed: %s", exc)
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="veil-autoscaler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
