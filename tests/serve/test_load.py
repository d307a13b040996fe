"""The open-loop load generator: arrival process, loopback guard, real HTTP runs, CLI."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from typer.testing import CliRunner

from veil.errors import ConfigError, InputError
from veil.serve.load import (
    LoadPattern,
    arrival_times,
    check_loopback,
    load_gateway,
    run_load,
    summarize,
    v2_body_from_metadata,
)


def test_poisson_counts_and_spike_density() -> None:
    rng = random.Random(1)
    ts = arrival_times(LoadPattern("steady", rate=50, duration_s=100), rng)
    assert abs(len(ts) - 5000) < 5 * 5000**0.5
    assert ts == sorted(ts) and 0 <= ts[0] and ts[-1] < 100
    spike = LoadPattern("spike", rate=20, duration_s=90, spike_start_s=30, spike_len_s=30, spike_factor=3)
    ts = arrival_times(spike, random.Random(2))
    before = sum(1 for t in ts if t < 30)
    during = sum(1 for t in ts if 30 <= t < 60)
    after = sum(1 for t in ts if t >= 60)
    assert 2.5 < during / before < 3.5 and 2.5 < during / after < 3.5
    di = LoadPattern("diurnal", rate=40, duration_s=100, amplitude=0.8)
    ts = arrival_times(di, random.Random(3))
    first_half = sum(1 for t in ts if t < 50)
    assert first_half > 2 * (len(ts) - first_half)  # sin > 0 in the first half-period
    assert arrival_times(spike, random.Random(2)) == arrival_times(spike, random.Random(2))


def test_pattern_validation() -> None:
    with pytest.raises(ConfigError):
        LoadPattern("burst")
    with pytest.raises(ConfigError):
        LoadPattern(rate=0)
    with pytest.raises(ConfigError):
        LoadPattern(duration_s=10_000)
    with pytest.raises(ConfigError):
        LoadPattern("spike", rate=4000, spike_factor=3)


@pytest.mark.parametrize(
    "url", ["http://10.1.2.3:80", "http://example.com", "ftp://127.0.0.1/", "http://[2001:db8::1]:8"]
)
def test_refuses_non_loopback(url: str) -> None:
    with pytest.raises(InputError):
        check_loopback(url)


def test_accepts_loopback() -> None:
    assert check_loopback("http://127.0.0.9:8080/") == "http://127.0.0.9:8080"
    assert check_loopback("http://[::1]:1") == "http://[::1]:1"
    assert check_loopback("http://localhost:5") == "http://localhost:5"


def test_open_loop_keeps_sending_while_server_is_slow() -> None:
    """A server that takes 200 ms does not slow arrivals down (closed loop would send ~10)."""

    async def main() -> None:
        sent: list[float] = []
        loop = asyncio.get_running_loop()

        async def send() -> int:
            sent.append(loop.time())
            await asyncio.sleep(0.2)
            return 200

        pat = LoadPattern("steady", rate=100, duration_s=1.0)
        res = await run_load(send, pat, seed=5)
        expected = len(arrival_times(pat, random.Random(5)))
        assert len(res.records) == len(sent) == expected > 60
        assert all(r.ok and r.latency_s >= 0.19 for r in res.records)
        assert sent[-1] - sent[0] < 1.1  # all sent within the 1 s window
        # bounded: over the in-flight cap, arrivals are dropped, not queued
        res = await run_load(send, pat, seed=5, max_inflight=10)
        dropped = [r for r in res.records if r.status == -1]
        assert len(dropped) > 30 and len(res.records) == expected
        s = summarize(res.records, slo_s=0.5)
        assert s["errors"] == len(dropped) and s["slo_attainment_pct"] < 70

    asyncio.run(main())


def test_summary_counts_errors_as_violations() -> None:
    from veil.serve.load import RequestRecord

    recs = [RequestRecord(float(i), 0.1, 200) for i in range(98)] + [
        RequestRecord(98.0, 0.9, 200),
        RequestRecord(99.0, 0.0, 503),
    ]
    s = summarize(recs, slo_s=0.5)
    assert s["slo_attainment_pct"] == 98.0 and s["errors"] == 1
    assert s["p50_s"] == 0.1 and s["p99_s"] == 0.9


def test_body_from_metadata() -> None:
    meta = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 4]},
            {"name": "f", "datatype": "BOOL", "shape": [2]},
        ]
    }
    doc = json.loads(v2_body_from_metadata(meta))
    assert doc["inputs"][0] == {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}
    assert doc["inputs"][1]["data"] == [False, False]
    with pytest.raises(InputError):
        v2_body_from_metadata({"inputs": []})


class FakeGateway:
    """A loopback KServe-v2 endpoint that checks the body and reports 2 healthy replicas."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        app = web.Application()

        async def meta(_: web.Request) -> web.Response:
            return web.json_response(
                {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]}
            )

        async def infer(req: web.Request) -> web.Response:
            doc = await req.json()
            self.bodies.append(doc)
            await asyncio.sleep(0.01)
            return web.json_response({"outputs": []})

        async def reps(_: web.Request) -> web.Response:
            return web.json_response(
                [{"id": "a", "healthy": True}, {"id": "b", "healthy": True}, {"id": "c", "healthy": False}]
            )

        app.add_routes(
            [
                web.get("/v2/models/m", meta),
                web.post("/v2/models/m/infer", infer),
                web.get("/veil/v1/replicas", reps),
            ]
        )
        runner = web.AppRunner(app)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> FakeGateway:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None and self._loop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture()
def gateway() -> Iterator[FakeGateway]:
    with FakeGateway() as g:
        yield g


def test_load_gateway_end_to_end(gateway: FakeGateway) -> None:
    pat = LoadPattern("steady", rate=40, duration_s=1.5)
    res = asyncio.run(load_gateway(f"http://127.0.0.1:{gateway.port}", "m", pat, seed=3))
    assert len(res.records) == len(arrival_times(pat, random.Random(3)))
    assert all(r.ok for r in res.records)
    assert gateway.bodies[0]["inputs"][0]["shape"] == [1, 3]
    assert res.replicas and all(n == 2 for _, n in res.replicas)


def test_cli_load_writes_jsonl_and_png(gateway: FakeGateway, tmp_path: Path) -> None:
    from veil.cli.serve import app

    out = tmp_path / "lat.jsonl"
    r = CliRunner().invoke(
        app,
        [
            "load",
            "--url",
            f"http://127.0.0.1:{gateway.port}",
            "--model",
            "m",
            "--rate",
            "30",
            "--duration",
            "1",
            "--pattern",
            "spike",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines and all(x["status"] == 200 for x in lines)
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "SLO 500 ms attained by 100.00%" in r.output
    r = CliRunner().invoke(app, ["load", "--url", "http://192.168.1.1:80", "--model", "m"])
    assert r.exit_code == 2 and "only loopback" in r.output
