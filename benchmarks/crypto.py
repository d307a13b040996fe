"""Benchmark veil's security core: HE ops/s per backend/scheme/key size, AEAD and session MB/s,
channel MB/s on loopback (MemoryChannel, GrpcChannel over mutual TLS).

    .venv/bin/python benchmarks/crypto.py            # full run
    .venv/bin/python benchmarks/crypto.py --quick    # fewer ops / bytes (CI smoke)

Prints a rich table, writes benchmarks/results/crypto.json and benchmarks/results/crypto.png.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from veil.crypto import he
from veil.crypto.aead import aead_encrypt
from veil.crypto.random import random_bytes, random_int_array
from veil.crypto.session import SecureSession

console = Console(width=170)
RESULTS = Path(__file__).resolve().parent / "results"
HE_CONFIGS = [("heu", "ou"), ("heu", "paillier"), ("phe", "paillier")]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_he(backend: str, scheme: str, key_bits: int, n_ops: int) -> dict[str, Any]:
    t_key, kp = _timed(lambda: he.keygen(scheme=scheme, key_bits=key_bits, backend=backend))
    pk, sk = kp.public, kp.secret
    # 64-bit signed plaintexts plus a 104-bit mask, as in the secure-XGBoost HE->SS conversion
    vals = np.array([v - 2**63 for v in random_int_array(n_ops, 64)], dtype=np.int64)
    masks = random_int_array(n_ops, 104)
    pk.encrypt(vals[:4])  # warm-up (phe builds its fixed-base table here)
    t_enc, ct = _timed(lambda: pk.encrypt(vals))
    t_add, ct2 = _timed(lambda: ct + ct)
    t_addp, _ = _timed(lambda: ct + masks)
    k = np.array([v - 2**31 for v in random_int_array(n_ops, 32)], dtype=np.int64)
    t_mul, _ = _timed(lambda: ct * k)
    n_bins, n_feat = 32, 4
    bins = np.arange(n_ops * n_feat).reshape(n_ops, n_feat) % n_bins
    t_bs, _ = _timed(lambda: ct.bucket_sums(bins, n_bins))
    t_rr, _ = _timed(lambda: ct.rerandomize())
    t_ser, blob = _timed(lambda: ct.to_bytes())
    t_dec, dec = _timed(lambda: sk.decrypt(ct2))
    ok = dec == [2 * int(v) for v in vals]
    if not ok:
        raise SystemExit(f"{backend}/{scheme}: decrypted sums differ from the plaintext")
    return {
        "backend": backend,
        "scheme": scheme,
        "key_bits": key_bits,
        "n": n_ops,
        "keygen_s": t_key,
        "encrypt_ops_s": n_ops / t_enc,
        "add_ops_s": n_ops / t_add,
        "add_plain_ops_s": n_ops / t_addp,
        "scalar_mul_ops_s": n_ops / t_mul,
        "bucket_sum_elems_s": n_ops * n_feat / t_bs,
        "rerandomize_ops_s": n_ops / t_rr,
        "decrypt_ops_s": n_ops / t_dec,
        "ciphertext_bytes": len(blob) / n_ops,
        "serialize_mb_s": len(blob) / t_ser / 1e6,
        "plaintext_bits": pk.plaintext_bits,
        "correct": ok,
    }


def bench_aead(total_mb: int) -> list[dict[str, Any]]:
    msg = random_bytes(1 << 20)
    key, nonce = random_bytes(32), random_bytes(12)
    out = []
    for cipher in ("aes-256-gcm", "chacha20-poly1305"):
        dt, _ = _timed(lambda c=cipher: [aead_encrypt(key, nonce, msg, b"", c) for _ in range(total_mb)])
        a = SecureSession.from_shared_secret(key, initiator=True, cipher=cipher)
        b = SecureSession.from_shared_secret(key, initiator=False, cipher=cipher)
        dts, _ = _timed(lambda a=a, b=b: [b.decrypt(a.encrypt(msg)) for _ in range(total_mb)])
        out.append(
            {
                "cipher": cipher,
                "aead_encrypt_mb_s": total_mb * len(msg) / dt / 1e6,
                "session_roundtrip_mb_s": total_mb * len(msg) / dts / 1e6,
            }
        )
    return out


def bench_channels(total_mb: int, message_mb: int = 4) -> list[dict[str, Any]]:
    """Loopback channel throughput via veil.comm.bench (grpc: two OS processes over mTLS)."""
    try:
        from veil.comm.bench import channel_throughput
    except ImportError as exc:  # veil.comm not there yet
        console.print(f"[yellow]channel benchmark skipped: {exc}[/]")
        return []
    rows = []
    for transport, label in (
        ("memory", "MemoryChannel (threads)"),
        ("grpc", "GrpcChannel (2 processes, mTLS)"),
    ):
        r = channel_throughput(transport, total_mb=total_mb, message_mb=message_mb)
        if r["sender_bytes_sent"] != r["receiver_bytes_received"]:
            raise SystemExit(f"{label}: byte counters differ")
        rows.append({"channel": label, "mb": r["payload_bytes"] / 1e6, "mb_s": r["mb_per_s"], **r})
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [2, 1]})
    ops = ["encrypt_ops_s", "add_ops_s", "scalar_mul_ops_s", "decrypt_ops_s"]
    rows = results["he"]
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = np.arange(len(ops)) + i * width
        axes[0].bar(xs, [r[o] for o in ops], width, label=f"{r['backend']}/{r['scheme']} {r['key_bits']}")
    axes[0].set_xticks(np.arange(len(ops)) + 0.4 - width / 2)
    axes[0].set_xticklabels([o.replace("_ops_s", "") for o in ops])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ops/s (log)")
    axes[0].set_title("HE throughput")
    axes[0].legend(fontsize=7)
    labels, vals = [], []
    for r in results["aead"]:
        labels += [f"{r['cipher']}\nAEAD", f"{r['cipher']}\nsession"]
        vals += [r["aead_encrypt_mb_s"], r["session_roundtrip_mb_s"]]
    for r in results["channels"]:
        labels.append(r["channel"].split(" ")[0])
        vals.append(r["mb_s"])
    axes[1].barh(labels, vals, color="tab:green")
    axes[1].set_xlabel("MB/s")
    axes[1].set_title("symmetric crypto and channels")
    axes[1].tick_params(axis="y", labelsize=7)
    fig.suptitle(f"veil crypto benchmark ({results['meta']['mode']}, {results['meta']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer ops and bytes")
    ap.add_argument("--key-bits", type=int, nargs="+", default=[2048, 3072])
    ap.add_argument("--backends", nargs="+", default=["heu", "phe"], choices=["heu", "phe"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    n_ops = 200 if args.quick else 2000
    mb = 32 if args.quick else 256
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": "quick" if args.quick else "full",
        "date_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "he_ops_per_config": n_ops,
    }
    results: dict[str, Any] = {"meta": meta, "he": [], "aead": [], "channels": []}
    for backend, scheme in HE_CONFIGS:
        if backend not in args.backends:
            continue
        for bits in args.key_bits:
            console.print(f"HE {backend}/{scheme} {bits} bits, {n_ops} ops …")
            results["he"].append(bench_he(backend, scheme, bits, n_ops))
    console.print(f"AEAD {mb} MiB per cipher …")
    results["aead"] = bench_aead(mb)
    console.print(f"channels {mb} MiB …")
    results["channels"] = bench_channels(mb)
    meta["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    t = Table(title=f"veil HE ({meta['mode']}, n={n_ops} per op; ops/s)")
    for c in [
        "backend",
        "scheme",
        "bits",
        "keygen s",
        "encrypt",
        "add",
        "add plain",
        "scalar-mul",
        "bucket-sum elem/s",
        "rerand",
        "decrypt",
        "ct bytes",
    ]:
        t.add_column(c, justify="right")
    for r in results["he"]:
        t.add_row(
            r["backend"],
            r["scheme"],
            str(r["key_bits"]),
            f"{r['keygen_s']:.2f}",
            f"{r['encrypt_ops_s']:,.0f}",
            f"{r['add_ops_s']:,.0f}",
            f"{r['add_plain_ops_s']:,.0f}",
            f"{r['scalar_mul_ops_s']:,.0f}",
            f"{r['bucket_sum_elems_s']:,.0f}",
            f"{r['rerandomize_ops_s']:,.0f}",
            f"{r['decrypt_ops_s']:,.0f}",
            f"{r['ciphertext_bytes']:.0f}",
        )
    console.print(t)
    t2 = Table(title="symmetric crypto and channels (MB/s)")
    t2.add_column("what")
    t2.add_column("MB/s", justify="right")
    for r in results["aead"]:
        t2.add_row(f"{r['cipher']} aead_encrypt (1 MiB msgs)", f"{r['aead_encrypt_mb_s']:,.0f}")
        t2.add_row(f"{r['cipher']} SecureSession encrypt+decrypt", f"{r['session_roundtrip_mb_s']:,.0f}")
    for r in results["channels"]:
        t2.add_row(f"{r['channel']} ({r['mb']:.0f} MB, {r['message_mb']} MB msgs)", f"{r['mb_s']:,.0f}")
    console.print(t2)
    console.print(
        f"load average 1 min: start {meta['load_avg_1m']}, end {meta['load_avg_1m_end']} "
        f"on {meta['cpus']} CPUs (timings under contention if these exceed the CPU count)"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crypto.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "crypto.png")
    console.print(f"wrote {args.out / 'crypto.json'} and {args.out / 'crypto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
