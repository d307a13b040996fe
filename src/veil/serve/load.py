"""Open-loop load generator for a veil gateway (``veil serve load``).

Arrivals are a (non-homogeneous) Poisson process: requests are sent at pre-drawn arrival times
whatever the server does, so a slow server builds a queue instead of slowing the generator
(closed-loop generators hide tail latency). The run is bounded: it stops issuing at
``duration_s``, caps in-flight requests (over the cap an arrival is recorded as ``dropped``),
and waits at most ``drain_timeout_s`` for stragglers. Targets must be loopback addresses:
this is a test tool, not a traffic cannon.

Patterns (``rate`` is the base rate, requests/second):

``steady``   rate
``spike``    rate, and ``spike_factor`` × rate during [spike_start_s, spike_start_s + spike_len_s)
``diurnal``  rate × (1 + amplitude · sin(2π t / period_s)), never below 0
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from veil.errors import ConfigError, InputError

__all__ = [
    "LoadPattern",
    "LoadResult",
    "RequestRecord",
    "arrival_times",
    "check_loopback",
    "plot_latency",
    "run_load",
    "summarize",
    "write_jsonl",
]

PATTERNS = ("steady", "spike", "diurnal")
MAX_RATE = 5000.0
MAX_DURATION_S = 3600.0


@dataclass(frozen=True)
class LoadPattern:
    kind: str = "steady"
    rate: float = 10.0
    duration_s: float = 60.0
    spike_factor: float = 3.0
    spike_start_s: float | None = None
    """Default: one third into the run."""
    spike_len_s: float | None = None
    """Default: one third of the run."""
    period_s: float | None = None
    """Diurnal period; default: the whole run."""
    amplitude: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in PATTERNS:
            raise ConfigError(f"unknown pattern {self.kind!r}; choose one of {', '.join(PATTERNS)}")
        if not 0 < self.rate <= MAX_RATE:
            raise ConfigError(f"rate must be in (0, {MAX_RATE:g}] requests/s")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ConfigError(f"duration must be in (0, {MAX_DURATION_S:g}] s")
        if self.spike_factor <= 0 or self.rate * self.spike_factor > MAX_RATE:
            raise ConfigError(f"spike factor must be > 0 and the spike rate <= {MAX_RATE:g}/s")
        if not 0 <= self.amplitude <= 1:
            raise ConfigError("diurnal amplitude must be in [0, 1]")

    @property
    def spike_window(self) -> tuple[float, float]:
        start = self.duration_s / 3 if self.spike_start_s is None else self.spike_start_s
        length = self.duration_s / 3 if self.spike_len_s is None else self.spike_len_s
        return start, start + length

    def rate_at(self, t: float) -> float:
        if self.kind == "steady":
            return self.rate
        if self.kind == "spike":
            a, b = self.spike_window
            return self.rate * (self.spike_factor if a <= t < b else 1.0)
        period = self.period_s or self.duration_s
        return max(0.0, self.rate * (1 + self.amplitude * math.sin(2 * math.pi * t / period)))

    @property
    def max_rate(self) -> float:
        if self.kind == "spike":
            return self.rate * max(1.0, self.spike_factor)
        if self.kind == "diurnal":
            return self.rate * (1 + self.amplitude)
        return self.rate


def arrival_times(pattern: LoadPattern, rng: random.Random, *, max_requests: int = 1_000_000) -> list[float]:
    """Arrival offsets (seconds from start) of a Poisson process with rate ``pattern.rate_at``.

    Non-homogeneous rates use thinning (Lewis & Shedler): candidates at the peak rate, each
    kept with probability rate(t)/peak. ``rng`` is a seeded ``random.Random`` (load timing is
    not security-relevant).
    """
    peak = pattern.max_rate
    out: list[float] = []
    t = 0.0
    while len(out) < max_requests:
        t += rng.expovariate(peak)
        if t >= pattern.duration_s:
            break
        if rng.random() * peak <= pattern.rate_at(t):
            out.append(t)
    return out


def check_loopback(url: str) -> str:
    """Return ``url`` without a trailing slash if it targets a loopback address, else InputError."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise InputError(f"target must be an http(s) URL, got {url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            raise InputError(
                f"refusing to load {host!r}: only loopback targets (127.0.0.0/8, ::1, localhost)"
            )
    return url.rstrip("/")


@dataclass
class RequestRecord:
    t: float
    """Scheduled send time, seconds from the start of the run."""
    latency_s: float
    status: int
    """HTTP status; 0 = connection error or timeout, -1 = dropped by the in-flight cap."""
    error: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class LoadResult:
    pattern: LoadPattern
    records: list[RequestRecord]
    replicas: list[tuple[float, int]] = field(default_factory=list)
    wall_s: float = 0.0


async def run_load(
    send: Callable[[], Awaitable[int]],
    pattern: LoadPattern,
    *,
    seed: int = 0,
    max_inflight: int = 2000,
    request_timeout_s: float = 30.0,
    drain_timeout_s: float = 30.0,
    replica_probe: Callable[[], Awaitable[int]] | None = None,
    probe_interval_s: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Drive ``send`` (one request → HTTP status) with open-loop Poisson arrivals."""
    rng = random.Random(seed)  # noqa: S311 - load timing only
    times = arrival_times(pattern, rng)
    records: list[RequestRecord] = []
    replicas: list[tuple[float, int]] = []
    inflight: set[asyncio.Task[None]] = set()
    t0 = clock()

    async def one(at: float) -> None:
        start = clock()
        try:
            status = await asyncio.wait_for(send(), request_timeout_s)
            err = ""
        except TimeoutError:
            status, err = 0, "timeout"
        except Exception as exc:  # connection errors of any client library
            status, err = 0, type(exc).__name__
        rec = RequestRecord(at, clock() - start, status, err)
        records.append(rec)
        if on_record is not None:
            on_record(rec)

    async def probe() -> None:
        while True:
            try:
                n = await replica_probe() if replica_probe is not None else 0
                replicas.append((clock() - t0, n))
            except Exception:  # noqa: S110 - a failed probe is just a missing point
                pass
            await asyncio.sleep(probe_interval_s)

    prober = asyncio.create_task(probe()) if replica_probe is not None else None
    try:
        for at in times:
            delay = at - (clock() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= max_inflight:
                records.append(RequestRecord(at, 0.0, -1, "dropped: in-flight cap"))
                continue
            task = asyncio.create_task(one(at))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            _done, pending = await asyncio.wait(set(inflight), timeout=drain_timeout_s)
            for task in pending:
                task.cancel()
            for _ in pending:
                records.append(RequestRecord(pattern.duration_s, drain_timeout_s, 0, "cancelled at drain"))
    finally:
        if prober is not None:
            prober.cancel()
    records.sort(key=lambda r: r.t)
    return LoadResult(pattern, records, replicas, clock() - t0)


def summarize(records: Sequence[RequestRecord], slo_s: float) -> dict[str, Any]:
    """Counts, SLO attainment (% of all requests answered OK within the SLO) and percentiles."""
    n = len(records)
    ok = sorted(r.latency_s for r in records if r.ok)
    within = sum(1 for r in records if r.ok and r.latency_s <= slo_s)

    def pct(p: float) -> float:
        if not ok:
            return float("nan")
        # requests that failed count as infinitely slow for the tail
        lat = ok + [math.inf] * (n - len(ok))
        return lat[min(len(lat) - 1, math.ceil(p / 100 * len(lat)) - 1)]

    return {
        "requests": n,
        "ok": len(ok),
        "errors": n - len(ok),
        "slo_s": slo_s,
        "slo_attainment_pct": 100.0 * within / n if n else float("nan"),
        "p50_s": pct(50),
        "p99_s": pct(99),
        "max_s": ok[-1] if ok else float("nan"),
    }


def write_jsonl(records: Sequence[RequestRecord], path: Path | str) -> None:
    with Path(path).open("w") as fh:
        for r in records:
            fh.write(json.dumps(asdict(r)) + "\n")


def plot_latency(
    series: dict[str, tuple[Sequence[RequestRecord], Sequence[tuple[float, int]]]],
    path: Path | str,
    *,
    slo_s: float,
    title: str,
    rate: Callable[[float], float] | None = None,
) -> None:
    """Latency scatter over time (top) and replica count (bottom), one colour per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, height_ratios=[2, 1])
    colours = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    for (name, (recs, reps)), c in zip(series.items(), colours, strict=False):
        xs = [r.t for r in recs if r.ok]
        ys = [r.latency_s * 1e3 for r in recs if r.ok]
        ax1.scatter(xs, ys, s=3, alpha=0.35, color=c, label=name)
        bad = [r.t for r in recs if not r.ok]
        if bad:
            ax1.scatter(bad, [slo_s * 1e3 * 4] * len(bad), s=8, marker="x", color=c)
        if reps:
            ax2.step([t for t, _ in reps], [n for _, n in reps], where="post", color=c, label=name)
    ax1.axhline(slo_s * 1e3, color="k", ls="--", lw=1, label=f"SLO {slo_s * 1e3:.0f} ms")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    ax1.set_title(title)
    ax1.legend(loc="upper left", markerscale=4, fontsize=8)
    ax2.set_ylabel("replicas")
    ax2.set_xlabel("time (s)")
    if rate is not None:
        ax3 = ax2.twinx()
        end = max((r.t for recs, _ in series.values() for r in recs), default=0.0)
        ts = [i * end / 400 for i in range(401)]
        ax3.plot(ts, [rate(t) for t in ts], color="grey", lw=1, alpha=0.6)
        ax3.set_ylabel("offered rate (req/s)", color="grey")
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_DTYPE_ZERO: dict[str, Any] = {"BOOL": False, "BYTES": ""}


def v2_body_from_metadata(meta: dict[str, Any]) -> bytes:
    """A KServe v2 infer body of zeros shaped by the model's metadata (dynamic dims → 1)."""
    inputs = meta.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("model metadata has no inputs; pass --body with a v2 request")
    out = []
    for spec in inputs:
        try:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec["shape"]]
            dtype = str(spec["datatype"])
            name = str(spec["name"])
        except (KeyError, TypeError) as exc:
            raise InputError(f"malformed input in model metadata: {exc}") from None
        n = math.prod(shape)
        if n > 1_000_000:
            raise InputError(f"input {name!r} has {n} elements; pass --body with a smaller request")
        zero = _DTYPE_ZERO.get(dtype, 0.0 if dtype.startswith("FP") else 0)
        out.append({"name": name, "shape": shape, "datatype": dtype, "data": [zero] * n})
    return json.dumps({"inputs": out}).encode()


async def load_gateway(
    url: str,
    model: str,
    pattern: LoadPattern,
    *,
    body: bytes | None = None,
    seed: int = 0,
    max_inflight: int = 2000,
    request_timeout_s: float = 30.0,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Load a veil gateway's ``/v2/models/{model}/infer`` (loopback only)."""
    import aiohttp

    base = check_loopback(url)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=5)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        if body is None:
            async with session.get(f"{base}/v2/models/{model}") as resp:
                if resp.status != 200:
                    raise InputError(
                        f"GET {base}/v2/models/{model} answered {resp.status}; is the model served?"
                    )
                body = v2_body_from_metadata(await resp.json())
        payload = body
        infer = f"{base}/v2/models/{model}/infer"
        headers = {"content-type": "application/json"}

        async def send() -> int:
            async with session.post(infer, data=payload, headers=headers) as resp:
                await resp.read()
                return resp.status

        async def replicas() -> int:
            async with session.get(
                f"{base}/veil/v1/replicas", timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                if resp.status != 200:
                    raise InputError("no replica endpoint")
                doc = await resp.json()
                return sum(1 for r in doc if r.get("healthy")) if isinstance(doc, list) else 0

        return await run_load(
            send,
            pattern,
            seed=seed,
            max_inflight=max_inflight,
            request_timeout_s=request_timeout_s,
            replica_probe=replicas,
            on_record=on_record,
        )
