"""Two parties train XGBoost together with `veil boost train`, each in its own process.

    python examples/01-secure-xgb/run.py            # 5 trees of depth 3 (a few minutes on 2 cores)
    python examples/01-secure-xgb/run.py --quick    # 1 small tree (about a minute)

The hospital holds 15 columns of the breast-cancer table and the diagnosis; the lab holds the
other 15 columns. Each has some patients the other lacks. The script writes each party's CSV
files, creates their identities with `veil keys init` / `veil keys trust`, runs the two
`veil boost train` commands against each other on 127.0.0.1 (mutual TLS, rows aligned by PSI,
dealer-free triples) and compares the validation AUC with plaintext xgboost on the joined table.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

VEIL = str(Path(sys.executable).with_name("veil"))


def veil(*args: str) -> str:
    """Run one veil command; stop with its error line if it fails."""
    r = subprocess.run([VEIL, *args], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        sys.exit(f"veil {' '.join(args[:2])} failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.stdout


def fingerprint(identity: Path) -> str:
    from veil.comm import PartyIdentity

    return PartyIdentity.load(identity).fingerprint


def write_tables(out: Path, quick: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = load_breast_cancer()
    x, y = data.data, data.target.astype(float)
    cols = [c.replace(" ", "_") for c in data.feature_names]
    ids = np.array([f"patient-{i:04d}" for i in range(len(y))])
    tr, va = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    if quick:
        tr = tr[:200]
    rng = np.random.default_rng(0)
    lack = rng.permutation(tr)[:20]  # 10 patients only the hospital has, 10 only the lab has
    parts = {"hospital": (slice(0, 15), np.setdiff1d(tr, lack[:10])),
             "lab": (slice(15, 30), np.setdiff1d(tr, lack[10:]))}
    for party, (cs, rows) in parts.items():
        d = out / party
        d.mkdir(parents=True, exist_ok=True)
        for name, r in (("train", rng.permutation(rows)), ("valid", rng.permutation(va))):
            df = pd.DataFrame(x[r][:, cs], columns=cols[cs])
            df.insert(0, "id", ids[r])
            if party == "hospital":
                df["diagnosis"] = y[r]
            df.to_csv(d / f"{name}.csv", index=False)
    shared = np.intersect1d(np.setdiff1d(tr, lack[:10]), np.setdiff1d(tr, lack[10:]))
    return x[shared], y[shared], x[va], y[va]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small tree (about a minute)")
    ap.add_argument("--out", type=Path, default=Path("runs/example-01"), help="working folder")
    a = ap.parse_args()
    trees, depth, bins = (1, 2, 8) if a.quick else (5, 3, 16)
    out = a.out
    xs, ys, xv, yv = write_tables(out, a.quick)
    for party in ("hospital", "lab"):
        veil("keys", "init", "--name", party, "--out", str(out / party / "id"), "--force")
    veil("keys", "trust", str(out / "hospital" / "id"), str(out / "lab" / "id" / "cert.pem"))
    veil("keys", "trust", str(out / "lab" / "id"), str(out / "hospital" / "id" / "cert.pem"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--id-column", "id", "--n-estimators", str(trees), "--max-depth", str(depth),
              "--max-bin", str(bins), "--algorithm", "he-agg", "--timeout", "600"]
    lab_log = (out / "lab" / "train.log").open("w")
    lab = subprocess.Popen(
        [VEIL, "boost", "train", "--role", "passive", "--data", str(out / "lab" / "train.csv"),
         "--valid", str(out / "lab" / "valid.csv"), "--listen", f"127.0.0.1:{port}",
         "--identity", str(out / "lab" / "id"), "--peer-fingerprint", fingerprint(out / "hospital" / "id"),
         "--out", str(out / "lab" / "model.json"), *common],
        stdout=lab_log, stderr=subprocess.STDOUT,
    )
    print(f"lab (passive) listening on 127.0.0.1:{port}; hospital (active) connects…", flush=True)
    try:
        hospital = subprocess.run(
            [VEIL, "boost", "train", "--role", "active", "--data", str(out / "hospital" / "train.csv"),
             "--valid", str(out / "hospital" / "valid.csv"), "--label-column", "diagnosis",
             "--peer", f"127.0.0.1:{port}", "--identity", str(out / "hospital" / "id"),
             "--peer-fingerprint", fingerprint(out / "lab" / "id"),
             "--out", str(out / "hospital" / "model.json"),
             "--summary-json", str(out / "hospital" / "summary.json"), *common],
            timeout=1200,
        )
        lab_rc = lab.wait(timeout=120)
    finally:
        if lab.poll() is None:
            lab.kill()
            lab.wait()
        lab_log.close()
    if hospital.returncode != 0 or lab_rc != 0:
        print(f"training failed (hospital exit {hospital.returncode}, lab exit {lab_rc}); "
              f"see {out / 'lab' / 'train.log'}", file=sys.stderr)
        return 1
    summary = json.loads((out / "hospital" / "summary.json").read_text())
    plain = xgb.XGBClassifier(n_estimators=trees, max_depth=depth, max_bin=bins, learning_rate=0.3,
                              tree_method="hist", n_jobs=1).fit(xs, ys)
    auc_plain = roc_auc_score(yv, plain.predict_proba(xv)[:, 1])
    print(f"validation AUC: secure {summary['auc']:.4f} ({summary['seconds']:.1f} s) | "
          f"plaintext xgboost {auc_plain:.4f}")
    result = {"secure": summary, "plaintext_auc": auc_plain, "trees": trees, "max_depth": depth,
              "max_bin": bins}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
