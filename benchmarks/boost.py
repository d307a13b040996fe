"""Benchmark secure vertical XGBoost: both algorithms, both triple sources, plaintext xgboost.

    .venv/bin/python benchmarks/boost.py            # 10k / 50k / 200k rows x 40 features, 10 trees, depth 5
    .venv/bin/python benchmarks/boost.py --quick    # small smoke run (< 2 min)
    .venv/bin/python benchmarks/boost.py --rows 10000 50000 --algorithms ss-agg --triples dealer

Both parties run in this process (two threads over MemoryChannel; the trusted dealer is a third
thread speaking the real dealer protocol), so "network" time is mostly waiting for the peer and
the machine's cores are shared by all three. The synthetic table is make_classification
(40 features, 20 informative), split 20/20 between the parties; AUC on a held-out 20%.
Writes benchmarks/results/boost.json (a list of runs) and boost.png (time vs rows).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from veil.boost.params import BoostParams
from veil.boost.predict import secure_predict_margin
from veil.boost.train import secure_train
from veil.comm import MemoryChannel
from veil.crypto.triples import TrustedDealer, run_dealer
from veil.testing import run_parties

console = Console(width=180)
RESULTS = Path(__file__).resolve().parent / "results"


def make_data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    n_test = max(1000, rows // 5)
    x, y = make_classification(
        n_samples=rows + n_test,
        n_features=40,
        n_informative=20,
        n_redundant=10,
        random_state=seed,
        flip_y=0.05,
    )
    return x[:rows], x[rows:], y[:rows].astype(float), y[rows:].astype(float)


def triple_sources(kind: str) -> tuple[Any, Any, threading.Thread | None]:
    if kind == "dealer":
        d0, p0 = MemoryChannel.pair(timeout=3600)
        d1, p1 = MemoryChannel.pair(timeout=3600)
        th = threading.Thread(target=run_dealer, args=(d0, d1), kwargs={"timeout": 3600}, daemon=True)
        th.start()
        box: dict[int, Any] = {}

        def mk(i: int, ch: Any) -> None:
            box[i] = TrustedDealer(ch, i, timeout=600)

        t0 = threading.Thread(target=mk, args=(0, p0))
        t0.start()
        mk(1, p1)
        t0.join()
        return box[0], box[1], th
    return None, None, None  # homomorphic: built inside each party (needs the party channel)


def _party(
    ch: Any,
    role: str,
    x: np.ndarray,
    y: np.ndarray | None,
    params: BoostParams,
    src: Any,
    xte: np.ndarray,
    he_backend: str | None,
) -> dict[str, Any]:
    if src is None:
        from veil.boost.api import make_triple_source

        t0 = time.perf_counter()
        src = make_triple_source("homomorphic", ch, 0 if role == "active" else 1, arith="ot")
        setup = time.perf_counter() - t0
    else:
        setup = 0.0
    res = secure_train(ch, role, x, y, params, src, he_backend=he_backend)
    t0 = time.perf_counter()
    margin = secure_predict_margin(ch, res.model, xte, src)
    pred_s = time.perf_counter() - t0
    if role == "passive":
        src.close()
    return {
        "res": res,
        "margin": margin,
        "predict_seconds": pred_s,
        "triples_setup": setup,
        "trust": str(src.trust),
    }


TRANSPORTS = {
    "memory": "memory: both parties threads of one process over MemoryChannel (no serialisation or "
    "encryption of messages)",
    "grpc": "grpc: two OS processes over GrpcChannel with mutual TLS on 127.0.0.1 (as deployed, "
    "every byte serialised, encrypted and copied)",
}


def run_one(
    rows: int,
    algorithm: str,
    triples: str,
    trees: int,
    depth: int,
    max_bin: int,
    he_backend: str | None,
    timeout: float,
    transport: str = "memory",
) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    xtr, xte, ytr, yte = make_data(rows)
    params = BoostParams(n_estimators=trees, max_depth=depth, max_bin=max_bin, algorithm=algorithm)
    run: dict[str, Any] = {
        "rows": rows,
        "features": 40,
        "split": "20/20",
        "algorithm": algorithm,
        "triples": triples,
        "n_estimators": trees,
        "max_depth": depth,
        "max_bin": max_bin,
        "transport": TRANSPORTS[transport],
    }
    # plaintext xgboost with the same hyper-parameters
    import xgboost as xgb

    t0 = time.perf_counter()
    m = xgb.XGBClassifier(
        n_estimators=trees,
        max_depth=depth,
        learning_rate=params.learning_rate,
        reg_lambda=params.reg_lambda,
        min_child_weight=params.min_child_weight,
        max_bin=max_bin,
        tree_method="hist",
        base_score=float(ytr.mean()),
        n_jobs=2,
    )
    m.fit(xtr, ytr)
    run["seconds_xgboost"] = round(time.perf_counter() - t0, 3)
    run["auc_xgboost"] = round(float(roc_auc_score(yte, m.predict_proba(xte)[:, 1])), 5)
    run["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    try:
        s0, s1, dealer = triple_sources(triples)
        t0 = time.perf_counter()
        if transport == "grpc" and dealer is not None:
            raise ValueError("--transport grpc runs dealer-free triples only (the dealer is a thread here)")
        ra, rb = run_parties(
            _party,
            _party,
            transport=transport,
            timeout=timeout,
            args_a=("active", xtr[:, :20], ytr, params, s0, xte[:, :20], he_backend),
            args_b=("passive", xtr[:, 20:], None, params, s1, xte[:, 20:], he_backend),
        )
        wall = time.perf_counter() - t0
        if dealer is not None:
            dealer.join(10)
    except Exception as exc:
        run["status"] = f"failed: {type(exc).__name__}: {exc}"
        console.print(f"[red]{rows} {algorithm} {triples}: {run['status']}[/]")
        traceback.print_exc()
        return run
    res_a, res_b = ra["res"], rb["res"]
    ts_a = res_a.time_split
    run.update(
        {
            "status": "ok",
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "trust": ra["trust"],
            "seconds": round(res_a.seconds, 2),
            "seconds_wall_incl_prediction": round(wall, 2),
            "predict_seconds": round(ra["predict_seconds"], 2),
            "triples_setup_seconds": round(ra["triples_setup"], 2),
            "auc": round(float(roc_auc_score(yte, ra["margin"])), 5),
            "bytes_sent": int(res_a.bytes_sent + res_b.bytes_sent),
            "bytes_sent_active": int(res_a.bytes_sent),
            "bytes_sent_passive": int(res_b.bytes_sent),
            "rounds": int(res_a.rounds),
            "he_ops": int(res_a.he_ops + res_b.he_ops),
            "he_ops_per_second": _rate(
                res_a.he_ops + res_b.he_ops, res_a.time_split.get("he", 0.0) + res_b.time_split.get("he", 0.0)
            ),
            "time_split": {
                "he": round(ts_a.get("he", 0.0), 2),
                # correlated randomness: triple-source calls (OT extension) + the one-hot product
                "triples": round(ts_a.get("triples", 0.0) + ts_a.get("onehot", 0.0), 2),
                "triples_of_which_onehot": round(ts_a.get("onehot", 0.0), 2),
                "ss_rounds": round(ts_a.get("ss_compute", 0.0), 2),
                "network": round(ts_a.get("network", 0.0), 2),
            },
            "time_split_passive": {k: round(v, 2) for k, v in res_b.time_split.items()},
        }
    )
    return run


def _he_layout(rows: int, plaintext_bits: int) -> tuple[int, int, int]:
    """he-agg's (ring, slot bits, slots per plaintext) for this benchmark (logistic loss)."""
    from veil.boost.histogram import he_slot_layout, sum_bound_bits
    from veil.boost.train import DEFAULT_FRAC_BITS

    bound = sum_bound_bits("binary:logistic", DEFAULT_FRAC_BITS, rows)
    return he_slot_layout(rows, plaintext_bits, bound)


def he_encryption_estimate(rows: int, trees: int, depth: int, he_backend: str | None) -> dict[str, Any]:
    """he-agg's OU encryption count for this configuration (both parties; the packing of
    ``HEAggregator``) and the packed-plaintext encryption rate measured now on this machine."""
    import math
    import random

    from veil.crypto import he

    kp = he.keygen(scheme="ou", key_bits=2048, backend=he_backend)
    _, slot_bits, slots = _he_layout(rows, kp.public.plaintext_bits)
    cols = [2] + [2 * 2 ** (d - 1) for d in range(1, depth)]  # left children's g, h per level
    per_row = sum(math.ceil(c / slots) for c in cols)
    count = 2 * rows * per_row * trees
    sample = [random.getrandbits(slots * slot_bits - 1) for _ in range(300)]  # benchmark data
    t0 = time.perf_counter()
    kp.public.encrypt(sample)
    rate = len(sample) / (time.perf_counter() - t0)
    return {
        "he_encryptions": count,
        "he_encryptions_per_row_tree_party": per_row,
        "he_slots_per_ciphertext": slots,
        "he_encrypt_per_second_measured": round(rate, 1),
        # both parties encrypt at the same time (level_sums), at most one core each
        "he_encrypt_seconds_estimate": round(count / (2 * rate), 1),
    }


def he_rates(rows: int, count: int, he_backend: str | None) -> list[dict[str, Any]]:
    """Encryptions/s vs plaintext width for OU-2048 and Paillier-2048 (HEU: ZPaillier), and the
    values/s he-agg would get with 1..max slots of its slot width for ``rows`` rows."""
    import random

    from veil.crypto import he

    out = []
    for scheme in ("ou", "paillier"):
        t0 = time.perf_counter()
        kp = he.keygen(scheme=scheme, key_bits=2048, backend=he_backend)
        keygen_s = time.perf_counter() - t0
        _, slot_bits, max_slots = _he_layout(rows, kp.public.plaintext_bits)
        widths = sorted({64, 128, 256, 610} | {k * slot_bits for k in (1, 2, max_slots)})
        for bits in [w for w in widths if w < kp.public.plaintext_bits]:
            vals = [random.getrandbits(bits - 1) for _ in range(count)]  # benchmark data
            t0 = time.perf_counter()
            kp.public.encrypt(vals)
            rate = count / (time.perf_counter() - t0)
            slots = bits // slot_bits
            out.append(
                {
                    "scheme": scheme,
                    "key_bits": 2048,
                    "plaintext_bits": bits,
                    "encrypt_per_second": round(rate, 1),
                    "he_agg_slots": slots,
                    "he_agg_values_per_second": round(rate * slots, 1) if slots else None,
                    "slot_bits": slot_bits,
                    "keygen_seconds": round(keygen_s, 2),
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
            )
            console.print(out[-1])
    return out


def _rate(ops: int, seconds: float) -> float | None:
    """HE operations per second of HE time (both parties; includes key generation)."""
    return round(ops / seconds, 1) if ops and seconds > 0 else None


def _run_key(r: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a benchmark configuration (``--merge`` replaces runs with the same key)."""
    keys = ("rows", "algorithm", "triples", "n_estimators", "max_depth", "max_bin")
    return (*(r.get(k) for k in keys), _transport(r))


def _transport(r: dict[str, Any]) -> str:
    """A run's transport name (runs recorded before --transport existed used memory)."""
    return str(r.get("transport") or "memory").split(":")[0]


def _merged(out: Path, mine: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs in ``out`` as they are NOW (another benchmark may have written since this one
    started), without those replaced by this call's runs ``mine``, plus ``mine``."""
    current: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    keys = {_run_key(r) for r in mine}
    return [r for r in current if _run_key(r) not in keys] + mine


def binning_check(rows: int, trees: int, depth: int, max_bins: list[int]) -> list[dict[str, Any]]:
    """AUC of the plaintext reference (our binning + our tree rules) vs xgboost per max_bin."""
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    from veil.boost.binning import QuantileBinner
    from veil.boost.reference import train_reference

    xtr, xte, ytr, yte = make_data(rows)
    cols = (slice(0, 20), slice(20, 40))
    out = []
    for mb in max_bins:
        params = BoostParams(n_estimators=trees, max_depth=depth, max_bin=mb)
        binners = [QuantileBinner(mb).fit(xtr[:, c]) for c in cols]
        t0 = time.perf_counter()
        model = train_reference(
            [b.transform(xtr[:, c]) for b, c in zip(binners, cols, strict=True)], ytr, params
        )
        secs = time.perf_counter() - t0
        margin = model.predict_margin_bins(
            [b.transform(xte[:, c]) for b, c in zip(binners, cols, strict=True)], mb
        )
        m = xgb.XGBClassifier(
            n_estimators=trees,
            max_depth=depth,
            learning_rate=params.learning_rate,
            max_bin=mb,
            tree_method="hist",
            base_score=float(ytr.mean()),
            n_jobs=2,
        ).fit(xtr, ytr)
        out.append(
            {
                "rows": rows,
                "algorithm": "plaintext-reference",
                "triples": "-",
                "n_estimators": trees,
                "max_depth": depth,
                "max_bin": mb,
                "status": "binning check (not secure: both parties' columns)",
                "seconds_reference": round(secs, 2),
                "auc_reference": round(float(roc_auc_score(yte, margin)), 5),
                "auc_xgboost": round(float(roc_auc_score(yte, m.predict_proba(xte)[:, 1])), 5),
            }
        )
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    ok = [r for r in runs if r.get("status") == "ok"]

    def cfg(r: dict[str, Any]) -> str:
        return f"{r['n_estimators']} trees, depth {r['max_depth']}"

    def series(r: dict[str, Any]) -> tuple[str, str, str]:
        extra = "" if _transport(r) == "memory" else f", {_transport(r)}"
        return (r["algorithm"], r["triples"], cfg(r) + extra)

    for key in sorted({series(r) for r in ok}):
        pts = sorted((r["rows"], r["seconds"]) for r in ok if series(r) == key)
        style = "--" if "grpc" in key[2] else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=style,
                label=f"{key[0]} / {'dealer-free' if key[1] == 'homomorphic' else key[1]} ({key[2]})")
    # the targets at 50k rows x 40 features, 10 trees, depth 5
    for secs, what in ((120.0, "target with dealer"), (300.0, "target dealer-free")):
        ax.plot([50_000], [secs], marker="*", markersize=11, linestyle="none", color="black")
        ax.annotate(f"{what} ({secs:g} s)", (50_000, secs), textcoords="offset points", xytext=(8, -3),
                    fontsize=7)
    for c in sorted({cfg(r) for r in runs if "seconds_xgboost" in r}):
        # one point per row count: the median over this file's runs (each run times xgboost again)
        by_rows: dict[int, list[float]] = {}
        for r in runs:
            if "seconds_xgboost" in r and cfg(r) == c:
                by_rows.setdefault(r["rows"], []).append(float(r["seconds_xgboost"]))
        xg = sorted((rows, float(np.median(v))) for rows, v in by_rows.items())
        ax.plot(
            [p[0] for p in xg],
            [p[1] for p in xg],
            marker="s",
            linestyle="--",
            label=f"xgboost plaintext ({c})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows (40 features, 20/20)")
    ax.set_ylabel("training seconds")
    ax.set_title("veil.boost training time vs rows (max_bin 16; 2-core machine, load per run in the JSON)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (< 2 min)")
    ap.add_argument("--rows", type=int, nargs="+", default=None)
    ap.add_argument("--algorithms", nargs="+", default=["ss-agg", "he-agg"])
    ap.add_argument("--triples", nargs="+", default=None, help="default: dealer homomorphic (quick: dealer)")
    ap.add_argument(
        "--budget",
        type=float,
        default=900.0,
        help="skip larger row counts of a combination once one run took longer than this",
    )
    ap.add_argument(
        "--he-budget",
        type=float,
        default=None,
        help="he-agg: measure the OU encryption rate first and skip (with the estimate in the JSON) "
        "when the encryptions alone would take longer than this many seconds",
    )
    ap.add_argument(
        "--he-rates",
        action="store_true",
        help="measure OU / Paillier encryptions per second vs plaintext width (he-agg packing) "
        "for --rows (first value), write results/boost_he_rates.json and exit",
    )
    ap.add_argument("--trees", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--max-bin", type=int, default=16)
    ap.add_argument("--he-backend", default=None)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per run")
    ap.add_argument(
        "--transport",
        choices=sorted(TRANSPORTS),
        default="memory",
        help="memory: parties are threads of this process (default); grpc: two processes over "
        "TLS on localhost (dealer-free triples only)",
    )
    ap.add_argument("--out", default=None, help="default results/boost.json (--quick: boost_quick.json)")
    ap.add_argument("--append", action="store_true", help="add to the runs already in --out")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs already in --out (e.g. another engineer's dealer-free rows) and replace "
        "only those with the same rows/algorithm/triples/trees/depth/max_bin as a run of this call",
    )
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out and exit")
    ap.add_argument(
        "--drop-stale",
        action="store_true",
        help="remove the placeholder rows of configurations an earlier session did not run "
        "(status 'not run in this session ...') from --out, redraw the PNG and exit",
    )
    ap.add_argument(
        "--binning-check",
        type=int,
        nargs="*",
        default=None,
        metavar="MAX_BIN",
        help="append plaintext-reference vs xgboost AUC for these max_bin values and exit",
    )
    args = ap.parse_args(argv)
    rows = args.rows or ([1000] if args.quick else [10_000, 50_000, 200_000])
    trees = args.trees or (2 if args.quick else 10)
    kinds = args.triples or (["dealer"] if args.quick else ["dealer", "homomorphic"])
    slow: set[tuple[str, str]] = set()
    depth = args.depth or (3 if args.quick else 5)
    # --quick (make bench) must not replace the full runs in boost.json
    out = Path(args.out or RESULTS / ("boost_quick.json" if args.quick else "boost.json"))
    if args.he_rates:
        rates = he_rates((args.rows or [50_000])[0], 300, args.he_backend)
        path = out.parent / "boost_he_rates.json"
        cmd = "python benchmarks/boost.py " + " ".join(sys.argv[1:] if argv is None else argv)
        path.write_text(json.dumps({"command": cmd, "rates": rates}, indent=1))
        console.print(f"wrote {path}")
        return 0
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return 0
    if args.drop_stale:
        kept = [r for r in json.loads(out.read_text())
                if not str(r.get("status", "")).startswith("not run in this session")]
        out.write_text(json.dumps(kept, indent=1))
        plot(kept, out.with_suffix(".png"))
        console.print(f"kept {len(kept)} runs in {out}")
        return 0
    keep_old = (args.append or args.merge) and out.exists()
    runs: list[dict[str, Any]] = json.loads(out.read_text()) if keep_old else []
    mine: list[dict[str, Any]] = []  # this call's runs (--merge)
    if args.binning_check is not None:
        for n in args.rows or [10_000]:
            runs += binning_check(n, args.trees or 10, args.depth or 5, args.binning_check or [16, 32, 64])
        out.write_text(json.dumps(runs, indent=1))
        console.print(runs[-3:])
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/boost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores "
        "(shared with other work; timings under contention)",
        "python": platform.python_version(),
    }
    for n in rows:
        for alg in args.algorithms:
            for tk in kinds:
                console.print(f"[bold]{n} rows, {alg}, triples={tk}[/] ...")
                base = {
                    "rows": n,
                    "algorithm": alg,
                    "triples": tk,
                    "n_estimators": trees,
                    "max_depth": depth,
                    "max_bin": args.max_bin,
                }
                if alg == "he-agg" and args.he_budget is not None and (
                    est := he_encryption_estimate(n, trees, depth, args.he_backend)
                )["he_encrypt_seconds_estimate"] > args.he_budget:
                    r = {
                        **base,
                        **est,
                        "load_average_before": [round(x, 2) for x in os.getloadavg()],
                        "status": f"skipped: {est['he_encryptions']:,} OU encryptions at the "
                        f"{est['he_encrypt_per_second_measured']:,.0f}/s measured now need "
                        f"~{est['he_encrypt_seconds_estimate']:,.0f} s with both cores (> --he-budget "
                        f"{args.he_budget:g} s); ss-agg is the faster algorithm",
                    }
                elif (alg, tk) in slow:
                    r = {
                        **base,
                        "status": f"skipped: a smaller run of this combination exceeded {args.budget:g} s",
                    }
                else:
                    r = run_one(
                        n, alg, tk, trees, depth, args.max_bin, args.he_backend, args.timeout, args.transport
                    )
                    if r.get("status") != "ok" or r.get("seconds", 0) > args.budget:
                        slow.add((alg, tk))
                r["meta"] = meta
                if args.merge:
                    mine.append(r)
                    runs = _merged(out, mine)
                else:
                    runs.append(r)
                out.write_text(json.dumps(runs, indent=1))
    table = Table(title="veil.boost benchmark (secure training vs plaintext xgboost)")
    for col in (
        "rows",
        "algorithm",
        "triples",
        "status",
        "seconds",
        "xgboost s",
        "auc",
        "auc xgb",
        "MB sent",
        "rounds",
        "he ops",
        "he / triples / ss / network s",
        "load 1m",
    ):
        table.add_column(col, justify="right")
    for r in runs:
        ts = r.get("time_split", {})
        if "rows" not in r:
            continue
        table.add_row(
            str(r["rows"]),
            r["algorithm"],
            r["triples"],
            str(r.get("status", ""))[:40],
            str(r.get("seconds", "-")),
            str(r.get("seconds_xgboost", "-")),
            str(r.get("auc", "-")),
            str(r.get("auc_xgboost", "-")),
            f"{r.get('bytes_sent', 0) / 1e6:.0f}",
            str(r.get("rounds", "-")),
            str(r.get("he_ops", "-")),
            " / ".join(str(ts.get(k, "-")) for k in ("he", "triples", "ss_rounds", "network")),
            str(r.get("load_average_before", ["-"])[0]),
        )
    console.print(table)
    plot(runs, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
