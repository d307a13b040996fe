"""Enclave memory (EPC) model: how much enclave page cache a host has, who uses it, and what
oversubscribing it costs.

SGX enclaves live in the EPC, a small protected memory region shared by every enclave on a
host. Once the enclaves' working sets exceed it, the driver pages EPC pages out to normal
memory (encrypting and MAC'ing each 4 KiB page) and faults them back in, and latency explodes
(S3ML §2, §4). Routing and autoscaling in veil watch this *paging pressure*, not CPU.

Two backends, one interface (:class:`EpcMonitor`):

``simulated`` (:class:`SimulatedEpcHost`)
    Every simulated worker registers its enclave size in a small JSON registry under a host
    directory (``<dir>/<host>/epc.json``, guarded by an ``fcntl`` file lock; entries of dead
    processes are dropped). The host has a budget ``epc_mb`` (``--epc-mb`` /
    ``VEIL_SIM_EPC_MB``, default 93 MiB, the usable EPC of a 128 MiB SGX1 part). With
    ``total`` = sum of registered enclave sizes on the host::

        overflow_mb = max(0, total - epc_mb)
        pressure    = overflow_mb / epc_mb                       (0 = fits)
        resident    = min(1, epc_mb / total)                      (fraction of each enclave in EPC)
        delay_s     = fault_s_per_mb * enclave_mb * working_set * (1 - resident)

    i.e. each request touches ``working_set`` of its enclave, the non-resident part of which
    has to be paged in at ``fault_s_per_mb`` (default 3 ms/MiB ≈ 12 µs per 4 KiB EPC page
    fault, the order measured for SGX1 paging). The delay is proportional to the overflow for
    a fixed total and is 0 while the enclaves fit. Every output of this backend says
    ``simulated``.

``sgx`` (:class:`SgxEpcReader`)
    Reads real usage: the misc cgroup controller (``misc.current`` / ``misc.max`` lines
    ``sgx_epc <bytes>``, host capacity from ``misc.capacity``) or, on the out-of-tree
    ``isgx`` driver, ``/sys/module/isgx/parameters/sgx_nr_{total,free}_epc_pages``. Pressure
    is ``max(0, used - limit*high_water) / (limit*(1-high_water))`` — a cgroup about to be
    reclaimed is paging. Real paging costs real time, so :meth:`paging_delay_s` is 0 there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from veil.atomic import atomic_write_text
from veil.errors import ConfigError, InputError

__all__ = [
    "DEFAULT_EPC_MB",
    "DEFAULT_FAULT_S_PER_MB",
    "EpcMonitor",
    "EpcUsage",
    "HostEpc",
    "PagingModel",
    "SgxEpcReader",
    "SimulatedEpcHost",
    "open_epc",
    "read_host_registry",
]

log = logging.getLogger("veil.serve.epc")

DEFAULT_EPC_MB = 93.0
DEFAULT_FAULT_S_PER_MB = 0.003
MB = 1024 * 1024


@dataclass(frozen=True)
class PagingModel:
    """Parameters of the simulated paging delay (see the module docstring)."""

    fault_s_per_mb: float = DEFAULT_FAULT_S_PER_MB
    working_set: float = 1.0
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.fault_s_per_mb < 0 or not 0 < self.working_set <= 1 or self.max_delay_s < 0:
            raise ConfigError(
                "paging model: need fault_s_per_mb >= 0, 0 < working_set <= 1, max_delay_s >= 0"
            )

    def delay_s(self, enclave_mb: float, total_mb: float, epc_mb: float) -> float:
        """Per-request paging delay of an enclave of ``enclave_mb`` on a host with ``total_mb``."""
        if total_mb <= epc_mb or enclave_mb <= 0:
            return 0.0
        nonresident = 1.0 - epc_mb / total_mb
        return min(self.max_delay_s, self.fault_s_per_mb * enclave_mb * self.working_set * nonresident)


def pressure_of(total_mb: float, epc_mb: float) -> float:
    """Overflow of the host's enclaves relative to its EPC (0 = fits, 1 = twice the EPC)."""
    if epc_mb <= 0:
        raise ConfigError("EPC budget must be > 0")
    return max(0.0, total_mb - epc_mb) / epc_mb


@dataclass(frozen=True)
class EpcUsage:
    """One reading of a worker's and its host's enclave memory."""

    host: str
    epc_mb: float
    """Host EPC size (budget)."""
    used_mb: float
    """Sum of enclave sizes (or EPC pages in use) on the host."""
    enclave_mb: float
    """This worker's enclave."""
    pressure: float
    delay_s: float
    simulated: bool
    source: str

    @property
    def free_mb(self) -> float:
        return max(0.0, self.epc_mb - self.used_mb)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["free_mb"] = self.free_mb
        return d

    def prometheus(self) -> dict[str, float]:
        """Metric name → value, for the worker's /metrics (label ``simulated`` added by caller)."""
        return {
            "veil_epc_paging_pressure": self.pressure,
            "veil_epc_paging_delay_seconds": self.delay_s,
            "veil_epc_enclave_bytes": self.enclave_mb * MB,
            "veil_epc_host_used_bytes": self.used_mb * MB,
            "veil_epc_host_capacity_bytes": self.epc_mb * MB,
        }


@runtime_checkable
class EpcMonitor(Protocol):
    """What a worker calls per request and exports as metrics."""

    simulated: bool
    host: str

    def usage(self) -> EpcUsage: ...

    def paging_pressure(self) -> float: ...

    def paging_delay_s(self) -> float: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- simulated backend


@dataclass(frozen=True)
class HostEpc:
    """A host registry snapshot: budget and registered enclaves (worker id → MiB)."""

    host: str
    epc_mb: float
    enclaves: dict[str, float]

    @property
    def used_mb(self) -> float:
        return sum(self.enclaves.values())

    @property
    def pressure(self) -> float:
        return pressure_of(self.used_mb, self.epc_mb)

    @property
    def free_mb(self) -> float:
        return max(0.0, self.epc_mb - self.used_mb)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _valid_name(kind: str, name: str) -> str:
    if not name or len(name) > 128 or not all(c.isalnum() or c in "-_." for c in name) or name in {".", ".."}:
        raise InputError(f"invalid {kind} name {name!r}: use letters, digits, '-', '_', '.' (max 128)")
    return name


@contextlib.contextmanager
def _locked(path: Path, timeout_s: float = 10.0) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"EPC registry {path} stayed locked for {timeout_s}s") from None
                time.sleep(0.005)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _load(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {"enclaves": {}}
    except (OSError, ValueError) as exc:
        raise InputError(f"EPC registry {path} is unreadable: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("enclaves"), dict):
        raise InputError(f"EPC registry {path} is malformed")
    return raw


def _prune(raw: dict[str, Any]) -> dict[str, Any]:
    raw["enclaves"] = {
        wid: e
        for wid, e in raw["enclaves"].items()
        if isinstance(e, dict) and _pid_alive(int(e.get("pid", 0))) and float(e.get("mb", 0)) >= 0
    }
    return raw


def read_host_registry(root: Path | str, host: str, epc_mb: float | None = None) -> HostEpc:
    """Read one simulated host's registry (dead workers pruned); ``epc_mb`` overrides the stored one."""
    path = Path(root) / _valid_name("host", host) / "epc.json"
    with _locked(path):
        raw = _prune(_load(path))
    budget = float(epc_mb if epc_mb is not None else raw.get("epc_mb", DEFAULT_EPC_MB))
    return HostEpc(host, budget, {k: float(v["mb"]) for k, v in raw["enclaves"].items()})


def list_hosts(root: Path | str) -> list[HostEpc]:
    """Every simulated host under ``root`` (for the autoscaler's placement)."""
    base = Path(root)
    if not base.is_dir():
        return []
    return [read_host_registry(base, p.name) for p in sorted(base.iterdir()) if (p / "epc.json").exists()]


class SimulatedEpcHost:
    """A simulated worker's view of its host's EPC: registers on creation, unregisters on close.

    SIMULATED: no enclave memory is involved; the delay is a model (see module docstring).
    """

    simulated = True

    def __init__(
        self,
        root: Path | str,
        host: str,
        worker_id: str,
        enclave_mb: float,
        *,
        epc_mb: float = DEFAULT_EPC_MB,
        model: PagingModel | None = None,
        clock: Callable[[], float] = time.monotonic,
        cache_s: float = 0.2,
        pid: int | None = None,
    ) -> None:
        if epc_mb <= 0 or enclave_mb < 0:
            raise ConfigError(f"EPC budget must be > 0 and enclave size >= 0 (got {epc_mb}, {enclave_mb})")
        self.root = Path(root)
        self.host = _valid_name("host", host)
        self.worker_id = _valid_name("worker", worker_id)
        self.enclave_mb = float(enclave_mb)
        self.epc_mb = float(epc_mb)
        self.model = model or PagingModel()
        self.clock = clock
        self.cache_s = cache_s
        self.pid = os.getpid() if pid is None else pid
        self.path = self.root / self.host / "epc.json"
        self._cached: tuple[float, EpcUsage] | None = None
        self._closed = False
        with _locked(self.path):
            raw = _prune(_load(self.path))
            raw["epc_mb"] = self.epc_mb
            raw["enclaves"][self.worker_id] = {"mb": self.enclave_mb, "pid": self.pid}
            self._write(raw)
        log.info(
            "SIMULATED EPC: worker %s registered a %.1f MiB enclave on host %s (budget %.1f MiB)",
            self.worker_id,
            self.enclave_mb,
            self.host,
            self.epc_mb,
        )

    def _write(self, raw: dict[str, Any]) -> None:
        # hardening (issue 9): temp file + fsync + rename + directory fsync (veil.atomic)
        atomic_write_text(self.path, json.dumps(raw, sort_keys=True), make_parents=False)

    def usage(self) -> EpcUsage:
        now = self.clock()
        if self._cached is not None and now - self._cached[0] < self.cache_s:
            return self._cached[1]
        snap = read_host_registry(self.root, self.host, self.epc_mb)
        total = snap.used_mb
        u = EpcUsage(
            host=self.host,
            epc_mb=self.epc_mb,
            used_mb=total,
            enclave_mb=self.enclave_mb,
            pressure=pressure_of(total, self.epc_mb),
            delay_s=self.model.delay_s(self.enclave_mb, total, self.epc_mb),
            simulated=True,
            source="simulated",
        )
        self._cached = (now, u)
        return u

    def paging_pressure(self) -> float:
        return self.usage().pressure

    def paging_delay_s(self) -> float:
        return self.usage().delay_s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _locked(self.path):
            raw = _prune(_load(self.path))
            raw["enclaves"].pop(self.worker_id, None)
            self._write(raw)

    def __enter__(self) -> SimulatedEpcHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- real SGX


def _read_misc(path: Path, key: str = "sgx_epc") -> float | None:
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return float("inf") if parts[1] == "max" else float(parts[1])
    except (OSError, ValueError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class SgxEpcReader:
    """EPC usage on real SGX hardware, from the misc cgroup or the isgx driver.

    ``sysfs`` is the root under which ``fs/cgroup`` and ``module/isgx`` are looked up
    (``/sys`` normally; tests pass a fake tree). ``cgroup`` is this process's cgroup path
    relative to the cgroup root (read from ``/proc/self/cgroup`` by default).
    """

    simulated = False

    def __init__(
        self,
        *,
        sysfs: Path | str = "/sys",
        cgroup: str | None = None,
        host: str | None = None,
        high_water: float = 0.9,
        enclave_mb: float = 0.0,
    ) -> None:
        if not 0 < high_water < 1:
            raise ConfigError("high_water must be in (0, 1)")
        self.sysfs = Path(sysfs)
        self.host = host or os.uname().nodename
        self.high_water = high_water
        self.enclave_mb = enclave_mb
        if cgroup is None:
            cgroup = ""
            with contextlib.suppress(OSError):
                for line in Path("/proc/self/cgroup").read_text().splitlines():
                    if line.startswith("0::"):
                        cgroup = line[3:].strip().lstrip("/")
        self.cg_root = self.sysfs / "fs" / "cgroup"
        self.cg_dir = self.cg_root / cgroup if cgroup else self.cg_root
        self.isgx = self.sysfs / "module" / "isgx" / "parameters"
        self.source = self._detect()
        log.info("EPC monitor: real SGX via %s on host %s", self.source, self.host)

    def _detect(self) -> str:
        if _read_misc(self.cg_root / "misc.capacity") is not None:
            return "misc-cgroup"
        if _read_int(self.isgx / "sgx_nr_total_epc_pages") is not None:
            return "isgx-driver"
        raise ConfigError(
            "no EPC usage source found (no sgx_epc in misc.capacity, no isgx driver parameters); "
            "use the simulated EPC model or run on an SGX host with the misc cgroup controller"
        )

    def usage(self) -> EpcUsage:
        if self.source == "misc-cgroup":
            capacity = _read_misc(self.cg_root / "misc.capacity") or 0.0
            used = _read_misc(self.cg_dir / "misc.current") or 0.0
            limit = _read_misc(self.cg_dir / "misc.max")
            limit = capacity if limit is None or limit == float("inf") else min(limit, capacity)
            host_used = _read_misc(self.cg_root / "misc.current")
            host_used = used if host_used is None else max(host_used, used)
        else:
            total_pages = _read_int(self.isgx / "sgx_nr_total_epc_pages") or 0
            free_pages = _read_int(self.isgx / "sgx_nr_free_pages") or 0
            capacity = limit = float(total_pages * 4096)
            used = host_used = float(max(0, total_pages - free_pages) * 4096)
        if limit <= 0:
            raise ConfigError("EPC capacity reads as 0")
        hw = limit * self.high_water
        pressure = max(0.0, used - hw) / (limit - hw)
        return EpcUsage(
            host=self.host,
            epc_mb=capacity / MB,
            used_mb=host_used / MB,
            enclave_mb=self.enclave_mb or used / MB,
            pressure=pressure,
            delay_s=0.0,
            simulated=False,
            source=self.source,
        )

    def paging_pressure(self) -> float:
        return self.usage().pressure

    def paging_delay_s(self) -> float:
        return 0.0

    def close(self) -> None:
        return None


def open_epc(
    *,
    simulated: bool,
    worker_id: str,
    enclave_mb: float,
    host: str | None = None,
    epc_mb: float | None = None,
    root: Path | str | None = None,
    model: PagingModel | None = None,
    sysfs: Path | str = "/sys",
) -> EpcMonitor:
    """The EPC monitor for a worker: simulated model for simulated enclaves, real reader on SGX.

    Environment (simulated): ``VEIL_SIM_EPC_MB`` (budget, MiB), ``VEIL_SIM_HOST`` (host name,
    default ``sim-host-0``), ``VEIL_SIM_EPC_DIR`` (registry root, default
    ``$XDG_RUNTIME_DIR or /tmp``/veil-epc-<uid>), ``VEIL_SIM_EPC_FAULT_S_PER_MB``.
    No silent fallback: on real hardware without an EPC source this raises ConfigError.
    """
    if not simulated:
        return SgxEpcReader(sysfs=sysfs, host=host, enclave_mb=enclave_mb)
    try:
        budget = float(epc_mb if epc_mb is not None else os.environ.get("VEIL_SIM_EPC_MB", DEFAULT_EPC_MB))
        fault = float(os.environ.get("VEIL_SIM_EPC_FAULT_S_PER_MB", DEFAULT_FAULT_S_PER_MB))
    except ValueError as exc:
        raise ConfigError(f"bad simulated EPC setting: {exc}") from None
    if root is None:
        base = os.environ.get("VEIL_SIM_EPC_DIR") or os.path.join(
            os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(),
            f"veil-epc-{os.getuid()}",
        )
        root = Path(base)
    return SimulatedEpcHost(
        root,
        host or os.environ.get("VEIL_SIM_HOST", "sim-host-0"),
        worker_id,
        enclave_mb,
        epc_mb=budget,
        model=model or PagingModel(fault_s_per_mb=fault),
    )
