"""The ``local`` backend: scale the worker processes of ``veil serve up`` (serving core's LocalCluster).

It needs from the cluster object only ``gateway_url``, ``add_worker(host) -> replica id`` (start a
worker on simulated EPC host ``host``, wait until ready, register it at the gateway) and
``remove_worker(id)`` (drain at the gateway, then stop). Adds and removes run on a small thread
pool so a decision never blocks the control loop for a worker's start-up; replicas being added
count as present (so the next decision does not add them again) and replicas being drained as
gone.

Host EPC use comes from the simulated EPC registry (:mod:`veil.serve.epc`) of the hosts the
cluster's workers register on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from veil.errors import ConfigError, VeilError
from veil.serve.autoscaling import HostInfo
from veil.serve.autoscaling.controller import ScalingError
from veil.serve.autoscaling.prometheus import PrometheusSource
from veil.serve.epc import DEFAULT_EPC_MB, read_host_registry

__all__ = ["ClusterLike", "LocalClusterBackend", "gateway_source"]

log = logging.getLogger("veil.serve.autoscaling")


class ClusterLike(Protocol):
    gateway_url: str

    def add_worker(self, host: str = ..., package: Any = ..., timeout: float = ...) -> str: ...

    def remove_worker(self, rid: str, timeout: float = ...) -> None: ...


class LocalClusterBackend:
    """ScalingBackend over a LocalCluster-like object (see module docstring)."""

    name = "local"

    def __init__(
        self,
        cluster: ClusterLike,
        *,
        hosts: Mapping[str, float],
        epc_root: Path | str,
        initial: Mapping[str, str] | None = None,
        enclave_mb: float = 0.0,
        max_parallel: int = 4,
    ) -> None:
        if not hosts:
            raise ConfigError("local backend: give at least one host (name -> EPC MiB)")
        self.cluster = cluster
        self.host_epc = {h: float(mb or DEFAULT_EPC_MB) for h, mb in hosts.items()}
        self.epc_root = Path(epc_root)
        self.enclave_mb = enclave_mb
        self._lock = threading.Lock()
        self.live: dict[str, str] = dict(initial or {})  # replica id -> host
        self.adding: dict[int, str] = {}  # ticket -> host
        self.removing: set[str] = set()
        self.errors: list[str] = []
        self._ticket = 0
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="veil-local-scale")

    def current(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self._lock:
            for rid, host in self.live.items():
                if rid not in self.removing:
                    out[host] = out.get(host, 0) + 1
            for host in self.adding.values():
                out[host] = out.get(host, 0) + 1
        return out

    def _add(self, ticket: int, host: str) -> None:
        try:
            rid = self.cluster.add_worker(host=host)
            with self._lock:
                self.live[rid] = host
        except VeilError as exc:
            log.warning("local backend: adding a worker on %s failed: %s", host, exc)
            self.errors.append(f"add on {host}: {exc}")
        finally:
            with self._lock:
                self.adding.pop(ticket, None)

    def _remove(self, rid: str) -> None:
        try:
            self.cluster.remove_worker(rid)
            with self._lock:
                self.live.pop(rid, None)
        except VeilError as exc:
            log.warning("local backend: removing %s failed: %s", rid, exc)
            self.errors.append(f"remove {rid}: {exc}")
        finally:
            with self._lock:
                self.removing.discard(rid)

    def apply(self, replicas: int, placement: Mapping[str, int]) -> None:
        unknown = set(placement) - set(self.host_epc)
        if unknown:
            raise ScalingError(f"local backend: unknown host(s) {sorted(unknown)}")
        cur = self.current()
        futures: list[Future[None]] = []
        for host in sorted(set(cur) | set(placement)):
            diff = placement.get(host, 0) - cur.get(host, 0)
            for _ in range(max(0, diff)):
                with self._lock:
                    self._ticket += 1
                    ticket = self._ticket
                    self.adding[ticket] = host
                futures.append(self._pool.submit(self._add, ticket, host))
            if diff < 0:
                with self._lock:
                    # newest first: the initial replicas are the last to go
                    victims = [
                        r
                        for r, h in reversed(list(self.live.items()))
                        if h == host and r not in self.removing
                    ]
                    victims = victims[:-diff]
                    self.removing.update(victims)
                for rid in victims:
                    futures.append(self._pool.submit(self._remove, rid))
        self._futures = futures

    def wait(self, timeout: float | None = None) -> None:
        """Block until the operations of the last ``apply`` finished (tests, shutdown)."""
        for f in getattr(self, "_futures", []):
            f.result(timeout=timeout)

    def hosts(self) -> list[HostInfo]:
        """EPC per host from the registry, plus ``enclave_mb`` for each worker still starting
        (it may not have registered its enclave yet; counting it twice for a moment is the
        conservative error)."""
        cur = self.current()
        with self._lock:
            starting = list(self.adding.values())
        out = []
        for h, mb in self.host_epc.items():
            snap = read_host_registry(self.epc_root, h, mb)
            used = snap.used_mb + self.enclave_mb * starting.count(h)
            out.append(HostInfo(h, mb, used, cur.get(h, 0)))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


def gateway_source(gateway_url: str, *, service_time_s: float = float("nan")) -> PrometheusSource:
    """A PrometheusSource on the gateway's /metrics, with ready replicas from /veil/v1/replicas."""
    import httpx

    from veil.errors import InputError

    def fetch() -> str:
        try:
            r = httpx.get(gateway_url + "/metrics", timeout=5.0)
        except httpx.HTTPError as exc:
            raise InputError(f"scraping {gateway_url}/metrics failed: {exc}") from None
        return r.text

    def ready() -> int:
        try:
            doc = httpx.get(gateway_url + "/veil/v1/replicas", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return 0
        return sum(1 for r in doc if r.get("healthy")) if isinstance(doc, list) else 0

    return PrometheusSource(fetch, service_time_s=service_time_s, ready_replicas=ready)
