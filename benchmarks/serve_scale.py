"""Benchmark veil.serve scaling: a load spike against enclave workers on hosts with a simulated EPC.

    .venv/bin/python benchmarks/serve_scale.py            # 60 s spike at 3x the base rate
    .venv/bin/python benchmarks/serve_scale.py --quick    # 20 s spike (CI smoke)

Two configurations see the same Poisson arrivals (same seed) on the same hosts:

  baseline  round-robin routing + Knative-KPA-style concurrency autoscaler (spread placement)
  veil      EPC-aware routing + SLO autoscaler (paging-aware capacity, EPC-aware placement)

What runs (SIMULATED TEE; an in-process cluster, see docs/protocols/scaling.md):
  * workers are real aiohttp servers on 127.0.0.1; each serves one request at a time (one
    enclave thread) for `compute_ms` plus the paging delay of veil.serve.epc's model, and
    registers its enclave in the file-locked EPC registry of its simulated host when it starts;
  * a co-tenant enclave already occupies part of host h0's EPC;
  * a gateway (aiohttp, loopback) routes with veil.serve.routing and forwards over HTTP;
  * veil.serve.load drives open-loop Poisson arrivals through real HTTP;
  * veil.serve.autoscaling.controller.Controller runs the pure policy every second and starts
    or drains workers (a new worker is ready after `startup_s`: attestation + key release).

Writes benchmarks/results/serve_scale.json and serve_scale.png (latency and replicas over time).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import platform
import random
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

from veil.serve.autoscaling import (
    Autoscaler,
    ConcurrencyAutoscaler,
    ConcurrencyConfig,
    HostInfo,
    Sample,
    SloAutoscaler,
    SloConfig,
)
from veil.serve.autoscaling.controller import Controller
from veil.serve.epc import PagingModel, SimulatedEpcHost, read_host_registry
from veil.serve.load import LoadPattern, plot_latency, run_load, summarize
from veil.serve.routing import NoReplicaAvailable, Replica, RequestInfo, RoutingPolicy, get_policy

console = Console(width=150)
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "m"


@dataclass(frozen=True)
class Params:
    base_rate: float = 10.0
    spike_factor: float = 3.0
    before_s: float = 30.0
    spike_s: float = 60.0
    after_s: float = 60.0
    slo_s: float = 0.5
    compute_ms: float = 40.0
    startup_s: float = 1.5
    enclave_mb: float = 40.0
    hosts: tuple[str, ...] = ("h0", "h1", "h2")
    host_epc_mb: float = 93.0
    cotenant: Mapping[str, float] = field(default_factory=lambda: {"h0": 60.0})
    fault_s_per_mb: float = 0.003
    initial: Mapping[str, int] = field(default_factory=lambda: {"h0": 1, "h1": 1})
    min_replicas: int = 2
    max_replicas: int = 10
    interval_s: float = 1.0
    seed: int = 7

    @property
    def duration_s(self) -> float:
        return self.before_s + self.spike_s + self.after_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SimWorker:
    """One enclave worker: a loopback HTTP server with one enclave thread and the EPC model."""

    def __init__(self, wid: str, host: str, p: Params, epc_root: Path, rng: random.Random) -> None:
        self.id, self.host, self.p = wid, host, p
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rng = rng
        self.slot = asyncio.Semaphore(1)
        self.ready = False
        self.draining = False
        self.busy_s = 0.0
        self.compute_s_sum = 0.0
        self.served = 0
        self.paged = 0
        self.ewma_service_s = 0.0
        # the enclave (and its EPC) exists from the moment the worker starts
        self.epc = SimulatedEpcHost(
            epc_root,
            host,
            wid,
            p.enclave_mb,
            epc_mb=p.host_epc_mb,
            model=PagingModel(fault_s_per_mb=p.fault_s_per_mb),
            cache_s=0.1,
        )
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.post(f"/v2/models/{MODEL}/infer", self.infer)])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        await asyncio.sleep(self.p.startup_s)  # attestation, key release, model decryption
        self.ready = True

    async def infer(self, request: web.Request) -> web.Response:
        await request.read()
        async with self.slot:  # the enclave thread is busy for compute + paging
            compute = self.p.compute_ms / 1e3 * self.rng.uniform(0.8, 1.2)
            paging = self.epc.paging_delay_s()
            await asyncio.sleep(compute + paging)
            self.busy_s += compute + paging
            self.compute_s_sum += compute
            self.served += 1
            self.paged += paging > 0
            s = compute + paging
            self.ewma_service_s = s if self.ewma_service_s == 0 else 0.9 * self.ewma_service_s + 0.1 * s
        return web.json_response(
            {"model_name": MODEL, "outputs": [{"name": "y", "shape": [1], "datatype": "FP32", "data": [0.0]}]}
        )

    async def stop(self) -> None:
        self.ready = False
        if self.runner is not None:
            await self.runner.cleanup()
        self.epc.close()


class SimCluster:
    """Gateway + workers + the autoscaler's backend and metrics source, all on one event loop."""

    name = "local-sim"

    def __init__(self, p: Params, policy: RoutingPolicy, epc_root: Path) -> None:
        self.p = p
        self.policy = policy
        self.epc_root = epc_root
        self.rng = random.Random(p.seed + 1)
        self.workers: dict[str, SimWorker] = {}
        self.outstanding: dict[str, int] = {}
        self.counter = 0
        self.t0 = 0.0
        self.loop = asyncio.get_running_loop()
        self.session: aiohttp.ClientSession | None = None
        # metrics since the last scrape
        self.arrivals = 0
        self.done_lat: list[float] = []
        self.inflight = 0
        self.inflight_area = 0.0
        self.last_change = 0.0
        self.last_scrape = 0.0
        self.last_busy: dict[str, float] = {}
        self.last_compute = (0.0, 0)
        self.replica_series: list[tuple[float, int]] = []
        self.replica_seconds = 0.0
        self._last_rs = 0.0
        self.pending: set[asyncio.Task[None]] = set()
        self.url = ""
        self.snap: list[Replica] = []
        self.snap_t = -1.0

    def now(self) -> float:
        return self.loop.time() - self.t0

    # ---------------------------------------------------------------- gateway
    async def start(self) -> None:
        self.t0 = self.loop.time()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
        )
        app = web.Application()
        app.add_routes([web.post(f"/v2/models/{MODEL}/infer", self.route)])
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        starts = [self.spawn(h) for h, n in self.p.initial.items() for _ in range(n)]
        await asyncio.gather(*starts)

    def _track_inflight(self, delta: int) -> None:
        t = self.now()
        self.inflight_area += self.inflight * (t - self.last_change)
        self.last_change = t
        self.inflight += delta

    def snapshots(self) -> list[Replica]:
        # the gateway refreshes worker-reported stats every 250 ms (as a status poll would)
        t = self.now()
        if t - self.snap_t >= 0.25:
            self.snap_t = t
            self.stats = {w.id: (w.epc.paging_pressure(), w.ewma_service_s) for w in self.workers.values()}
        out = []
        for w in self.workers.values():
            pressure, service = self.stats.get(w.id, (0.0, 0.0))
            out.append(
                Replica(
                    id=w.id,
                    url=w.url,
                    host=w.host,
                    outstanding=self.outstanding[w.id],
                    epc_pressure=pressure,
                    service_time_s=service,
                    healthy=w.ready,
                    draining=w.draining,
                )
            )
        return out

    async def route(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.arrivals += 1
        self._track_inflight(+1)
        start = self.now()
        try:
            for _attempt in range(3):
                try:
                    r = self.policy.choose(self.snapshots(), RequestInfo(model=MODEL), self.now())
                except NoReplicaAvailable:
                    await asyncio.sleep(0.05)
                    continue
                self.outstanding[r.id] += 1
                try:
                    assert self.session is not None
                    async with self.session.post(r.url + f"/v2/models/{MODEL}/infer", data=body) as resp:
                        data = await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    continue
                finally:
                    self.outstanding[r.id] -= 1
                self.done_lat.append(self.now() - start)
                return web.Response(body=data, status=status, content_type="application/json")
            return web.json_response({"error": "no replica"}, status=503)
        finally:
            self._track_inflight(-1)

    # ---------------------------------------------------------------- backend (ScalingBackend)
    async def spawn(self, host: str) -> None:
        self.counter += 1
        w = SimWorker(f"w{self.counter}", host, self.p, self.epc_root, self.rng)
        self.workers[w.id] = w
        self.outstanding[w.id] = 0
        self._account()
        await w.start()

    async def drain(self, w: SimWorker) -> None:
        w.draining = True
        deadline = self.now() + 30
        while self.outstanding[w.id] > 0 and self.now() < deadline:
            await asyncio.sleep(0.05)
        await w.stop()
        self._account()
        del self.workers[w.id]
        del self.outstanding[w.id]
        self._account()

    def _account(self) -> None:
        t = self.now()
        live = sum(1 for w in self.workers.values())
        self.replica_seconds += (t - self._last_rs) * (
            self.replica_series[-1][1] if self.replica_series else 0
        )
        self._last_rs = t
        self.replica_series.append((t, live))

    def current(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for w in self.workers.values():
            if not w.draining:
                out[w.host] = out.get(w.host, 0) + 1
        return out

    def apply(self, replicas: int, placement: Mapping[str, int]) -> None:
        cur = self.current()
        for host in set(cur) | set(placement):
            diff = placement.get(host, 0) - cur.get(host, 0)
            for _ in range(max(0, diff)):
                self._task(self.spawn(host))
            if diff < 0:
                # drain the least busy live workers of that host
                victims = sorted(
                    (w for w in self.workers.values() if w.host == host and not w.draining),
                    key=lambda w: (w.ready, -self.outstanding[w.id]),
                )[:-diff]
                for w in victims:
                    self._task(self.drain(w))

    def _task(self, coro: Any) -> None:
        t = self.loop.create_task(coro)
        self.pending.add(t)
        t.add_done_callback(self.pending.discard)

    def hosts(self) -> list[HostInfo]:
        cur = self.current()
        return [
            HostInfo(h, snap.epc_mb, snap.used_mb, cur.get(h, 0))
            for h in self.p.hosts
            for snap in [read_host_registry(self.epc_root, h, self.p.host_epc_mb)]
        ]

    # ---------------------------------------------------------------- metrics (MetricsSource)
    def sample(self, now: float) -> Sample:
        dt = max(1e-6, now - self.last_scrape)
        self._track_inflight(0)
        conc = self.inflight_area / dt
        self.inflight_area = 0.0
        lat = sorted(self.done_lat)
        p99 = lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else float("nan")
        ready = [w for w in self.workers.values() if w.ready]
        busy = sum(w.busy_s - self.last_busy.get(w.id, 0.0) for w in ready)
        self.last_busy = {w.id: w.busy_s for w in self.workers.values()}
        c_sum = sum(w.compute_s_sum for w in self.workers.values())
        c_n = sum(w.served for w in self.workers.values())
        d_sum, d_n = c_sum - self.last_compute[0], c_n - self.last_compute[1]
        self.last_compute = (c_sum, c_n)
        s = Sample(
            t=now,
            request_rate=self.arrivals / dt,
            p99_latency_s=p99,
            concurrency=conc,
            service_time_s=d_sum / d_n if d_n > 0 else float("nan"),
            cpu_utilization=min(1.0, busy / dt / max(1, len(ready))),
            ready_replicas=len(ready),
        )
        self.arrivals = 0
        self.done_lat = []
        self.last_scrape = now
        return s

    async def close(self) -> None:
        for t in list(self.pending):
            t.cancel()
        for w in list(self.workers.values()):
            await w.stop()
        self._account()
        if self.session is not None:
            await self.session.close()
        await self.runner.cleanup()


def make_autoscaler(name: str, p: Params) -> Autoscaler:
    if name == "veil":
        return SloAutoscaler(
            SloConfig(
                slo_p99_s=p.slo_s,
                min_replicas=p.min_replicas,
                max_replicas=p.max_replicas,
                enclave_mb=p.enclave_mb,
                default_service_s=p.compute_ms / 1e3,
            )
        )
    # Knative KPA defaults for containerConcurrency=1: target 70% of 1 in-flight request,
    # 60 s stable window, 6 s panic window, panic at 200%.
    # The baseline's scheduler accounts each replica's EPC *request* (sgx.intel.com/epc), as
    # Kubernetes with the SGX device plugin does, but cannot see the co-tenant's enclave.
    return ConcurrencyAutoscaler(
        ConcurrencyConfig(
            metric="concurrency",
            target=0.7,
            min_replicas=p.min_replicas,
            max_replicas=p.max_replicas,
            request_mb=p.enclave_mb,
        )
    )


async def run_config(name: str, p: Params, pattern: LoadPattern) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="veil-epc-bench-") as tmp:
        root = Path(tmp)
        tenants = [
            SimulatedEpcHost(root, h, f"cotenant-{h}", mb, epc_mb=p.host_epc_mb)
            for h, mb in p.cotenant.items()
        ]
        routing = get_policy("epc-aware" if name == "veil" else "round-robin")
        cluster = SimCluster(p, routing, root)
        await cluster.start()
        ctl_clock = cluster.now
        ctl = Controller(make_autoscaler(name, p), cluster, cluster, interval_s=p.interval_s, clock=ctl_clock)
        decisions: list[dict[str, Any]] = []

        async def control() -> None:
            while True:
                await asyncio.sleep(p.interval_s)
                step = ctl.step()
                if step.applied:
                    decisions.append(
                        {
                            "t": round(step.t, 2),
                            "replicas": step.decision.replicas,
                            "placement": dict(step.decision.placement),
                            "reason": step.decision.state.reason,
                        }
                    )

        ctl_task = asyncio.create_task(control())
        lags: list[float] = []

        async def lag_monitor() -> None:
            # event-loop lag = CPU starvation of this process (the machine is shared)
            loop = asyncio.get_running_loop()
            while True:
                t = loop.time()
                await asyncio.sleep(0.05)
                lags.append(loop.time() - t - 0.05)

        lag_task = asyncio.create_task(lag_monitor())
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as sess:
            infer = cluster.url + f"/v2/models/{MODEL}/infer"
            body = json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
            )

            async def send() -> int:
                async with sess.post(infer, data=body, headers={"content-type": "application/json"}) as r:
                    await r.read()
                    return r.status

            res = await run_load(send, pattern, seed=p.seed, request_timeout_s=30, drain_timeout_s=30)
        ctl_task.cancel()
        lag_task.cancel()
        cluster._account()
        served = sum(w.served for w in cluster.workers.values())
        paged = sum(w.paged for w in cluster.workers.values())
        await cluster.close()
        for t in tenants:
            t.close()
    s = summarize(res.records, p.slo_s)
    s.update(
        replica_seconds=round(cluster.replica_seconds, 1),
        max_replicas=max(n for _, n in cluster.replica_series),
        scale_decisions=len(decisions),
        paged_requests_on_final_replicas=paged,
        loop_lag_p99_ms=round(sorted(lags)[int(0.99 * (len(lags) - 1))] * 1e3, 1) if lags else None,
        loop_lag_max_ms=round(max(lags) * 1e3, 1) if lags else None,
        served_on_final_replicas=served,
    )
    return {"summary": s, "records": res.records, "replicas": cluster.replica_series, "decisions": decisions}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 s before, 20 s spike, 15 s after")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_scale.json")
    args = ap.parse_args()
    p = (
        Params(seed=args.seed)
        if not args.quick
        else Params(before_s=10, spike_s=20, after_s=15, seed=args.seed)
    )
    pattern = LoadPattern(
        "spike",
        rate=p.base_rate,
        duration_s=p.duration_s,
        spike_factor=p.spike_factor,
        spike_start_s=p.before_s,
        spike_len_s=p.spike_s,
    )
    console.print(
        f"[bold]serve_scale[/] SIMULATED TEE, in-process cluster; spike {p.spike_factor:g}x "
        f"{p.base_rate:g} req/s for {p.spike_s:g}s ({p.duration_s:g}s per configuration)"
    )
    out: dict[str, Any] = {}
    for name in ("baseline", "veil"):
        t0 = time.perf_counter()
        out[name] = asyncio.run(run_config(name, p, pattern))
        console.print(f"  {name}: done in {time.perf_counter() - t0:.0f}s")
    base, veil = out["baseline"]["summary"], out["veil"]["summary"]
    table = Table(title="serve_scale (SIMULATED TEE; loopback HTTP; shared 2-core machine)")
    for col in (
        "config",
        "requests",
        "errors",
        "SLO attainment %",
        "p50 ms",
        "p99 ms",
        "replica-s",
        "max replicas",
    ):
        table.add_column(col, justify="right")
    labels = {"baseline": "round-robin + KPA concurrency", "veil": "EPC-aware + SLO autoscaler"}
    for name, s in (("baseline", base), ("veil", veil)):
        table.add_row(
            labels[name],
            str(s["requests"]),
            str(s["errors"]),
            f"{s['slo_attainment_pct']:.2f}",
            f"{s['p50_s'] * 1e3:.1f}",
            f"{s['p99_s'] * 1e3:.1f}",
            f"{s['replica_seconds']:.0f}",
            str(s["max_replicas"]),
        )
    console.print(table)
    target = {
        "veil_slo_attainment_ge_99": veil["slo_attainment_pct"] >= 99.0,
        "veil_strictly_better_attainment": veil["slo_attainment_pct"] > base["slo_attainment_pct"],
        "veil_replica_seconds_le_baseline": veil["replica_seconds"] <= base["replica_seconds"],
    }
    target["met"] = all(target.values())
    console.print(f"target: {target}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "serve_scale",
        "simulated": True,
        "tee": "simulated",
        "setup": "in-process cluster: loopback aiohttp workers (1 enclave thread each) + gateway + "
        "veil.serve.load open-loop Poisson client + veil.serve.autoscaling Controller; EPC paging "
        "from veil.serve.epc's simulated model",
        "command": "python benchmarks/serve_scale.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "note": "shared with other jobs; timings taken under contention",
        },
        "params": {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(p).items()},
        "configs": labels,
        "results": {name: {**out[name]["summary"], "decisions": out[name]["decisions"]} for name in out},
        "target": target,
    }
    args.out.write_text(json.dumps(doc, indent=2, default=float))
    png = args.out.with_suffix(".png")
    plot_latency(
        {labels[n]: (out[n]["records"], out[n]["replicas"]) for n in out},
        png,
        slo_s=p.slo_s,
        title=f"serve_scale (SIMULATED TEE): {p.spike_factor:g}x spike of {p.base_rate:g} req/s",
        rate=pattern.rate_at,
    )
    console.print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
