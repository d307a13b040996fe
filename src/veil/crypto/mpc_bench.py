"""Micro-benchmarks of the MPC primitives at boost's sizes.

``python -m veil.crypto.mpc_bench [--quick] [--out FILE.json]``

``python -m veil.crypto.mpc_bench --only otk [--ot-m 1048576] [--ot-reps 5] [--out F.json] [--plot F.png]``:
``OTExtension.random_ots`` with the numpy path and the native kernel (both parties, then mixed),
plus the kernel's parts alone (one thread, no channel); a rich table. Works against a library
without the native kernel too (``PYTHONPATH`` at an older ``src``): then only the numpy rows.

Both parties run as threads over a :class:`~veil.comm.MemoryChannel` (frames go through the
real codec, so bytes are real; no network latency). Triples: ``LocalDealer`` (the trusted
dealer's generator in-process: online cost + dealer work) and ``HomomorphicTriples`` (OU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from veil.comm import Channel
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC, OneHotMatrix
from veil.crypto.sharing import AShare, share_floats
from veil.crypto.triples import LocalDealer
from veil.testing import run_parties

FXP = FixedPoint(20)


def _timed(name: str, fn: Callable[[MPC, Any], Any], arg0: Any, arg1: Any, rows: list[dict[str, Any]],
           sources: Any = None, **extra: Any) -> None:
    s0, s1 = sources if sources is not None else LocalDealer.pair()

    def role(p: int, src: Any, arg: Any) -> Callable[[Channel], dict[str, Any]]:
        def f(ch: Channel) -> dict[str, Any]:
            mpc = MPC(ch, p, src, FXP, timeout=600)
            before = ch.stats.as_dict()
            t = time.perf_counter()
            fn(mpc, arg)
            dt = time.perf_counter() - t
            after = ch.stats.as_dict()
            return {"seconds": dt, "bytes_sent": after["bytes_sent"] - before["bytes_sent"],
                    "rounds": after["rounds"] - before["rounds"]}

        return f

    r0, r1 = run_parties(role(0, s0, arg0), role(1, s1, arg1), timeout=1200)
    row = {"op": name, **extra, "seconds": round(max(r0["seconds"], r1["seconds"]), 4),
           "bytes_sent_per_party": max(r0["bytes_sent"], r1["bytes_sent"]),
           "rounds": max(r0["rounds"], r1["rounds"]), "load1": round(os.getloadavg()[0], 2)}
    rows.append(row)
    print(json.dumps(row), flush=True)


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def bench_ot_kernels(m: int, reps: int, rows: list[dict[str, Any]]) -> None:
    """random_ots (m OTs per direction) per path pair, and transpose / TCCR / finish alone."""
    from veil.crypto import triples_ot as T

    status = (T.native_status() if hasattr(T, "native_status")
              else {"native": False, "reason": "library without the native kernel"})
    rev = os.environ.get("VEIL_BENCH_REV", "")
    kern = T._load_native()[0] if status["native"] else None
    if m % 8:
        raise SystemExit("--ot-m must be a multiple of 8")
    choices = (np.arange(m) % 3 == 0).astype(np.uint8)  # data, not randomness: the OTs are random anyway

    def role(p: int, path: str) -> Callable[[Channel], list[float]]:
        def f(ch: Channel) -> list[float]:
            ot = T.OTExtension(ch, p, timeout=600)
            if path == "numpy" and hasattr(ot, "_native"):
                ot._native = None
            ot.random_ots(8, np.zeros(8, np.uint8))  # base OTs and first-call costs outside the timing
            out = []
            for _ in range(reps):
                t = time.perf_counter()
                ot.random_ots(m, choices)
                out.append(time.perf_counter() - t)
            return out

        return f

    pairs = [("numpy", "numpy")] + ([("native", "native"), ("native", "numpy")] if kern else [])
    base = None
    for p0, p1 in pairs:
        t0, t1 = run_parties(role(0, p0), role(1, p1), timeout=1200)
        per = [max(a, b) for a, b in zip(t0, t1, strict=True)]
        med = _median(per)
        base = base or med
        row = {"op": "OTExtension.random_ots (both directions, two threads)", "paths": f"{p0}/{p1}",
               "ots_per_direction": m, "reps": reps, "seconds_median": round(med, 4),
               "seconds_min": round(min(per), 4), "ots_per_second": round(m / med),
               "speedup_vs_numpy": round(base / med, 2), "load1": round(os.getloadavg()[0], 2),
               "native_reason": status["reason"], **({"library_rev": rev} if rev else {})}
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the kernel's parts alone: one thread, no channel
    buf = np.frombuffer(hashlib.shake_128(b"veil-ot-bench").digest(3 * 16 * m + 16), dtype=np.uint8)
    t_cols, q_cols, u_cols = (buf[i * 16 * m:(i + 1) * 16 * m].reshape(128, m // 8) for i in range(3))
    s_row = buf[-16:]
    s_bits = np.unpackbits(s_row, bitorder="little")
    t_rows = T._transpose(t_cols, m)
    parts: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        ("transpose", lambda: T._transpose(t_cols, m), (lambda: kern.transpose(t_cols, m)) if kern else None),
        ("tccr", lambda: T._tccr(t_rows, 0), (lambda: kern.tccr(t_rows, 0, T._PI_KEY)) if kern else None),
    ]
    if hasattr(T, "_finish_numpy"):
        nat_fin = (lambda: kern.finish(t_cols, q_cols, u_cols, s_row, m, 0, T._PI_KEY)) if kern else None
        parts.append(("finish (2 transposes + 3 hashes)",
                      lambda: T._finish_numpy(t_cols, q_cols.copy(), u_cols, s_bits, s_row, m, 0), nat_fin))
    for name, f_np, f_nat in parts:
        times: dict[str, float] = {}
        for label, f in (("numpy", f_np), ("native", f_nat)):
            if f is None:
                continue
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            times[label] = _median(ts)
        row = {"op": f"kernel part: {name} (one thread)", "ots": m, "reps": reps,
               **{f"{k}_seconds_median": round(v, 4) for k, v in times.items()},
               **({"speedup": round(times["numpy"] / times["native"], 1)} if "native" in times else {}),
               "load1": round(os.getloadavg()[0], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)


def _ot_table(rows: list[dict[str, Any]], png: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title="OT extension: numpy vs native kernel (seconds, median)")
    for col in ("op", "paths", "OTs", "seconds", "OTs/s", "speed-up", "load1"):
        tab.add_column(col)
    ot_rows = [r for r in rows if str(r["op"]).startswith(("OTExtension", "kernel part"))]
    for r in ot_rows:
        if "paths" in r:
            tab.add_row(r["op"], r["paths"], f"{r['ots_per_direction']:,}", f"{r['seconds_median']:.3f}",
                        f"{r['ots_per_second']:,}", f"{r['speedup_vs_numpy']}x", str(r["load1"]))
        else:
            keys = ("numpy_seconds_median", "native_seconds_median")
            sec = " / ".join(f"{r[k]:.4f}" for k in keys if k in r)
            tab.add_row(r["op"], "numpy / native" if "speedup" in r else "numpy", f"{r['ots']:,}", sec, "",
                        f"{r['speedup']}x" if "speedup" in r else "", str(r["load1"]))
    Console(width=160).print(tab)
    if png and ot_rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, np_s, nat_s = [], [], []
        for r in ot_rows:
            if "paths" in r:
                labels.append(f"random_ots {r['paths']}")
                np_s.append(r["seconds_median"] if r["paths"] == "numpy/numpy" else 0.0)
                nat_s.append(r["seconds_median"] if r["paths"] != "numpy/numpy" else 0.0)
            else:
                labels.append(r["op"].removeprefix("kernel part: ").removesuffix(" (one thread)"))
                np_s.append(r.get("numpy_seconds_median", 0.0))
                nat_s.append(r.get("native_seconds_median", 0.0))
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ax.bar(x - 0.2, np_s, 0.4, label="numpy")
        ax.bar(x + 0.2, nat_s, 0.4, label="native (or mixed)")
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("seconds (median)")
        m = ot_rows[0].get("ots_per_direction", ot_rows[0].get("ots"))
        ax.set_title(f"OT extension, {m:,} OTs: numpy vs native (load1 {ot_rows[-1]['load1']})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (< 1 min)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--no-he", action="store_true", help="skip dealer-free (HE) measurements")
    ap.add_argument("--only", default="", help="comma list: mul,ltz,argmax,reciprocal,sigmoid,pm,he,df,otk "
                    "(otk: OT extension numpy vs native kernel; only when named)")
    ap.add_argument("--ot-m", type=int, default=1 << 20, help="otk: OTs per direction and call")
    ap.add_argument("--ot-reps", type=int, default=5, help="otk: timed calls per path")
    ap.add_argument("--plot", default=None, help="otk: write a PNG bar chart here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    if "otk" in args.only.split(","):
        bench_ot_kernels(args.ot_m if not args.quick else min(args.ot_m, 1 << 17), args.ot_reps, rows)
        _ot_table(rows, args.plot)
    n = 20_000 if args.quick else 100_000
    x = rng.uniform(-100, 100, n)
    y = rng.uniform(-100, 100, n)
    xs, ys = share_floats(x, FXP), share_floats(y, FXP)

    only = set(filter(None, args.only.split(",")))

    def want(op: str) -> bool:
        return not only or op in only

    if want("mul"):
        _timed("mul", lambda m, a: m.mul(a[0], a[1]), (xs[0], ys[0]), (xs[1], ys[1]), rows, elements=n)
    if want("ltz"):
        _timed("ltz", lambda m, a: m.ltz(a), xs[0], xs[1], rows, elements=n)
    nodes, cands = (16, 1280) if not args.quick else (4, 1280)
    g = share_floats(rng.uniform(0, 50, (nodes, cands)), FXP)
    if want("argmax"):
        _timed("argmax", lambda m, a: m.argmax(a, axis=-1), g[0], g[1], rows, elements=nodes * cands,
               shape=[nodes, cands])
    h = share_floats(rng.uniform(1, 20_000, n // 5), FXP)
    if want("reciprocal"):
        _timed("reciprocal", lambda m, a: m.reciprocal(a, lo=1.0, hi=2.0**16), h[0], h[1], rows,
               elements=n // 5, range="[1, 2^16)")
    if want("sigmoid"):
        _timed("sigmoid", lambda m, a: m.sigmoid(a), xs[0], xs[1], rows, elements=n)

    rows_n, feats, bins, cols = (50_000, 20, 32, 32) if not args.quick else (10_000, 20, 32, 8)
    b = rng.integers(0, bins, (rows_n, feats))
    v = share_floats(rng.uniform(-1, 1, (rows_n, cols)), FXP)
    shape = (rows_n, feats * bins)

    def pm_prog(m: MPC, a: tuple[AShare, Any]) -> None:
        t = time.perf_counter()
        pm = m.public_matrix(a[1], holder=1, shape=shape)
        setup = time.perf_counter() - t
        t = time.perf_counter()
        pm.prepare(cols)
        prep = time.perf_counter() - t
        t = time.perf_counter()
        pm.t_matmul(a[0])
        print(json.dumps({"op": "public_matrix phases", "party": m.party, "holder": m.party == 1,
                          "setup_s": round(setup, 3), "prepare_s": round(prep, 3),
                          "t_matmul_s": round(time.perf_counter() - t, 3)}), flush=True)

    if want("pm"):
        _timed("public_matrix setup + prepare + 1 product", pm_prog, (v[0], None),
               (v[1], OneHotMatrix(b, bins)), rows, n=rows_n, k=feats * bins, cols=cols)

    if not args.no_he and want("he"):
        from veil.crypto import he
        from veil.crypto.triples_he import HomomorphicTriples

        for backend, scheme in (("heu", "ou"),):
            if backend not in he.available_backends():
                continue
            kp = he.keygen(scheme=scheme, key_bits=2048, backend=backend)
            def ht_role(
                p: int, what: str, arith: str, count: int, kp: Any = kp
            ) -> Callable[[Channel], float]:
                def f(ch: Channel) -> float:
                    src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, timeout=600,
                                             arith=arith, bits="ot" if arith == "ot" else "he")
                    if what != "beaver":
                        src.bit_triples(1)  # base OTs outside the timing
                    t = time.perf_counter()
                    if what == "beaver":
                        src.beaver(count)
                    elif what == "random_ots":
                        src._ot_engine().random_ots(count, np.zeros(count, np.uint8))
                    else:
                        src.bit_triples(count // 8)
                    return time.perf_counter() - t

                return f

            he_n = 300 if args.quick else 2000
            ot_n = 5000 if args.quick else 50_000
            bit_n = 200_000 if args.quick else 2_000_000
            for what, arith, count in (("beaver", "he", he_n), ("bits", "he", he_n // 2),
                                       ("beaver", "ot", ot_n), ("bits", "ot", bit_n),
                                       ("random_ots", "ot", bit_n)):
                t0, t1 = run_parties(ht_role(0, what, arith, count), ht_role(1, what, arith, count),
                                     timeout=1200)
                dt = max(t0, t1)
                row = {"op": f"HomomorphicTriples.{what}", "via": arith if what == "beaver" else
                       ("ot" if arith == "ot" else "he"), "he": f"{backend}-{scheme}-2048",
                       "elements": count, "seconds": round(dt, 3), "per_second": round(count / dt, 1),
                       "load1": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if not args.no_he and want("df"):
        # end-to-end dealer-free online+offline cost of the primitives (triples made on the fly)
        from veil.crypto import he
        from veil.crypto.triples_he import HomomorphicTriples

        kp2 = he.keygen(scheme="ou", key_bits=2048)
        m_df = 2000 if args.quick else 10_000

        def df_role(p: int, op: str, a: Any) -> Callable[[Channel], dict[str, Any]]:
            def f(ch: Channel) -> dict[str, Any]:
                src = HomomorphicTriples(ch, p, keypair=kp2 if p == 0 else None, arith="ot", timeout=600)
                src.bit_triples(1)  # base OTs outside the timing
                mpc = MPC(ch, p, src, FXP, timeout=600)
                b0 = ch.stats.bytes_sent
                t = time.perf_counter()
                if op == "mul":
                    mpc.mul(a[0], a[1])
                elif op == "square":
                    mpc.square(a[0])
                elif op == "mul_bits":
                    mpc.mul_bits([(a[2], a[1])])
                elif op == "ltz":
                    mpc.ltz(a[0])
                elif op == "argmax":
                    mpc.argmax(a[3], axis=-1, bits=40)
                elif op == "div":
                    mpc.div(a[0], a[4], lo=1.0, hi=2.0**14)
                elif op == "sigmoid":
                    mpc.sigmoid(a[0])
                else:
                    mpc.ltz(a[0], bits=40)
                return {"seconds": time.perf_counter() - t, "bytes": ch.stats.bytes_sent - b0}

            return f

        xa = share_floats(rng.uniform(-100, 100, m_df), FXP)
        ya = share_floats(rng.uniform(-100, 100, m_df), FXP)
        bb = share_floats(rng.integers(0, 2, m_df).astype(float), FixedPoint(0))
        ga = share_floats(rng.uniform(0, 50, (2, m_df // 2)), FXP)
        da = share_floats(np.exp(rng.uniform(0, np.log(2.0**14 - 1), m_df)), FXP)
        for op in ("mul", "square", "mul_bits", "ltz", "ltz_bits40", "argmax", "div", "sigmoid"):
            r0, r1 = run_parties(df_role(0, op, (xa[0], ya[0], bb[0], ga[0], da[0])),
                                 df_role(1, op, (xa[1], ya[1], bb[1], ga[1], da[1])), timeout=1200)
            label = {"argmax": "argmax bits=40 over (2, m/2)", "div": "div, divisor in [1, 2^14)",
                     "sigmoid": "sigmoid, x in [-100, 100]"}.get(op, op)
            row = {"op": f"{label} (dealer-free, triples on the fly, arith=ot)", "elements": m_df,
                   "seconds": round(max(r0["seconds"], r1["seconds"]), 3),
                   "bytes_sent_per_party": max(r0["bytes"], r1["bytes"]),
                   "load1": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
