"""Benchmark confidential serving: latency and throughput of a small ONNX model

* in-process onnxruntime (the floor),
* a worker called directly over HTTP (no gateway),
* the veil gateway (KServe v2, binary tensors) without end-to-end encryption,
* the veil gateway with end-to-end encryption (X25519 + AES-GCM per request, verified service),

at 1 and 8 concurrent clients, against a local cluster (`veil serve up` machinery: KMS, 2 simulated
enclave workers, gateway as separate processes on 127.0.0.1).

    .venv/bin/python benchmarks/serve.py --quick

Prints a rich table, writes benchmarks/results/serve.json and benchmarks/results/serve.png.
Workers run on the SIMULATED TEE backend (no SGX here): enclave costs (EPC paging, OCALLs) are
not in these numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from veil.crypto.random import random_bytes
from veil.serve import signing
from veil.serve.client import ServeClient
from veil.serve.cluster.local import LocalCluster
from veil.serve.package import KeyFile, build_package
from veil.serve.worker.app import worker_measurement
from veil.tee import Policy, platform_public_key

console = Console(width=150)
RESULTS = Path(__file__).resolve().parent / "results"


def make_model(path: Path, d_in: int = 32, hidden: int = 64, d_out: int = 8) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(d_in, hidden)).astype(np.float32)
    w2 = rng.normal(size=(hidden, d_out)).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["z"]),
            helper.make_node("Softmax", ["z"], ["y"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d_out])],
        initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def run_load(
    make_call: Callable[[], Callable[[], Any]], clients: int, n_per_client: int, warmup: int = 10
) -> dict[str, float]:
    lat: list[list[float]] = [[] for _ in range(clients)]
    spans: list[tuple[float, float]] = []
    barrier = threading.Barrier(clients)

    def worker(i: int) -> None:
        call = make_call()
        for _ in range(warmup):
            call()
        barrier.wait()
        start = time.perf_counter()
        for _ in range(n_per_client):
            t0 = time.perf_counter()
            call()
            lat[i].append(time.perf_counter() - t0)
        spans.append((start, time.perf_counter()))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return {"lat": [x for lst in lat for x in lst], "wall": wall}


def summarize(parts: list[dict[str, Any]]) -> dict[str, float]:
    all_lat = np.array([x for p in parts for x in p["lat"]])
    wall = sum(p["wall"] for p in parts)
    return {
        "p50_ms": float(np.percentile(all_lat, 50) * 1e3),
        "p99_ms": float(np.percentile(all_lat, 99) * 1e3),
        "mean_ms": float(all_lat.mean() * 1e3),
        "throughput_rps": float(len(all_lat) / wall),
        "requests": len(all_lat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all configurations")
    args = ap.parse_args()
    n1, n8 = (600, 120) if args.quick else (3000, 600)

    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="veil-bench-serve-"))
    os.environ.setdefault("VEIL_HOME", str(tmp / "home"))
    os.environ.setdefault("VEIL_SIM_EPC_DIR", str(tmp / "epc"))
    model = tmp / "mlp.onnx"
    make_model(model)
    sk = signing.SigningKey.generate()
    key, kid = random_bytes(32), random_bytes(16).hex()
    pkg = tmp / "mlp.veil"
    pkg.write_bytes(build_package(model, name="mlp", signing_key=sk, data_key=key, key_id=kid))
    kf = tmp / "keys" / "mlp.key.json"
    KeyFile(model="mlp", key_id=kid, key=key.hex(), signer=sk.public_bytes.hex()).write(kf)

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(1, 32)).astype(np.float32)
    want = sess.run(None, {"x": x})[0]
    policy = Policy(
        allowed_measurements={worker_measurement()},
        allow_simulated=True,
        simulated_platform_keys={platform_public_key().hex()},
    )

    rows: list[dict[str, Any]] = []
    cluster = LocalCluster(
        packages=[pkg], workers=args.workers, state_dir=tmp / "state", key_files=[kf], reattest_s=0
    )
    with console.status("starting local cluster (KMS, workers, gateway)…"):
        cluster.start(timeout=180)
    try:
        worker_url = cluster.worker_procs()[0].url

        def http_call(url: str, e2e: bool) -> Callable[[], Callable[[], Any]]:
            def make() -> Callable[[], Any]:
                c = ServeClient(url, policy=policy if e2e else None, e2e=e2e)
                if e2e:
                    c.attest()
                out = c.infer("mlp", {"x": x})["y"]
                np.testing.assert_allclose(out, want, rtol=1e-6)
                return lambda: c.infer("mlp", {"x": x})

            return make

        configs: list[tuple[str, Callable[[], Callable[[], Any]]]] = [
            ("onnxruntime in-process", lambda: lambda: sess.run(None, {"x": x})),
            ("worker direct (no gateway)", http_call(worker_url, False)),
            ("gateway", http_call(cluster.gateway_url, False)),
            ("gateway + E2E", http_call(cluster.gateway_url, True)),
        ]
        # interleaved rounds, so load spikes from other jobs on the machine hit every config alike
        parts: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            for name, make in configs:
                for clients in (1, 8):
                    n = (n1 if clients == 1 else n8) // args.rounds
                    with console.status(f"round {rnd + 1}/{args.rounds}: {name}, {clients} client(s)…"):
                        parts.setdefault((name, clients), []).append(run_load(make, clients, n))
        for (name, clients), ps in parts.items():
            rows.append({"config": name, "clients": clients, **summarize(ps)})
    finally:
        cluster.stop()

    def p50(cfg: str, c: int) -> float:
        return next(r["p50_ms"] for r in rows if r["config"] == cfg and r["clients"] == c)

    overhead = p50("gateway", 1) - p50("onnxruntime in-process", 1)
    hop = p50("gateway", 1) - p50("worker direct (no gateway)", 1)
    e2e_cost = p50("gateway + E2E", 1) - p50("gateway", 1)
    table = Table(title="veil.serve latency/throughput (small ONNX MLP, SIMULATED TEE, loopback)")
    for col in ("config", "clients", "p50 ms", "p99 ms", "mean ms", "req/s"):
        table.add_column(col, justify="right" if col != "config" else "left")
    for r in rows:
        table.add_row(
            r["config"],
            str(r["clients"]),
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['mean_ms']:.3f}",
            f"{r['throughput_rps']:.0f}",
        )
    console.print(table)
    console.print(
        f"gateway overhead at p50, 1 client (gateway - in-process onnxruntime): {overhead:.3f} ms "
        f"(target <= 2 ms: {'met' if overhead <= 2 else 'NOT met'}); gateway hop alone "
        f"(gateway - worker direct): {hop:.3f} ms; E2E encryption adds {e2e_cost:.3f} ms"
    )
    load = os.getloadavg()
    out = {
        "benchmark": "serve",
        "quick": args.quick,
        "tee": "simulated",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": load,
        },
        "command": "python benchmarks/serve.py" + (" --quick" if args.quick else ""),
        "model": "ONNX MLP 32-64-8, batch 1",
        "workers": args.workers,
        "rows": rows,
        "gateway_overhead_p50_ms": overhead,
        "gateway_hop_p50_ms": hop,
        "e2e_extra_p50_ms": e2e_cost,
        "target_gateway_overhead_p50_ms": 2.0,
        "target_met": overhead <= 2.0,
        "note": "client: veil.serve.client (http.client keep-alive, KServe v2 binary tensors); cluster "
        "processes on 127.0.0.1; 2-core machine shared with other jobs (see loadavg); configs interleaved "
        "over rounds",
    }
    (RESULTS / "serve.json").write_text(json.dumps(out, indent=2))
    plot(rows, RESULTS / "serve.png")
    console.print(f"wrote {RESULTS / 'serve.json'} and {RESULTS / 'serve.png'}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for k, clients in enumerate((1, 8)):
        sel = [next(r for r in rows if r["config"] == c and r["clients"] == clients) for c in cfgs]
        xs = np.arange(len(cfgs)) + (k - 0.5) * width
        axes[0].bar(xs, [r["p50_ms"] for r in sel], width, label=f"p50, {clients} client(s)")
        axes[0].scatter(xs, [r["p99_ms"] for r in sel], marker="_", s=200, color="black")
        axes[1].bar(xs, [r["throughput_rps"] for r in sel], width, label=f"{clients} client(s)")
    for ax, title in zip(axes, ("latency ms (bar p50, tick p99)", "throughput req/s"), strict=True):
        ax.set_xticks(np.arange(len(cfgs)))
        ax.set_xticklabels(cfgs, rotation=15, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle("veil.serve, small ONNX model, SIMULATED TEE, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
