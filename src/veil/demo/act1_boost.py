"""Act 1: secure vertical XGBoost between two parties running as separate OS processes.

The breast-cancer table (569 patients, 30 features) is split by columns: the *active* party
(a hospital) holds 15 features and the diagnosis, the *passive* party (a lab) the other 15.
Each holds some patients the other does not have. The two processes

1. get throwaway TLS identities and pin each other's certificate (as ``veil keys init`` +
   ``veil keys trust`` would), then talk over gRPC + mutual TLS on 127.0.0.1;
2. align their rows by ECDH private set intersection (only the shared ids' positions are learnt);
3. train with the dealer-free hybrid algorithm (``he-agg``: bucket sums under the passive
   party's HE key joined to additive secret sharing, Beaver triples made between the two
   parties with no dealer);
4. score a held-out test set with the secure prediction protocol (only the active party sees
   the scores).

The demo process then trains plaintext XGBoost on the joined table with the same
hyper-parameters and compares AUC and time; writes ``act1.json`` and ``act1_roc.png``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from veil.atomic import atomic_write_text
from veil.demo._common import (
    DemoError,
    progress,
    pyplot,
    spawn_context,
    stop_processes,
    wait_processes,
    write_json,
)
from veil.demo.runner import ActResult

__all__ = ["run"]

TITLE = "Secure XGBoost between two parties (PSI + HE/SS hybrid)"
ALGORITHM = "he-agg"
SEED = 7


def _params(quick: bool) -> dict[str, Any]:
    """Hyper-parameters shared by the secure run and the plaintext baseline."""
    return {
        "n_estimators": 2 if quick else 5,
        "max_depth": 3,
        "learning_rate": 0.3,
        "max_bin": 8 if quick else 16,
        "reg_lambda": 1.0,
        "min_child_weight": 1.0,
    }


# ------------------------------------------------------------------------------------ data


def make_tables(work: Path, quick: bool) -> dict[str, Any]:
    """Write each party's CSV files; return what the demo process needs for the baseline."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float64)
    y = np.asarray(data.target, dtype=np.float64)
    names = [str(n).replace(" ", "_") for n in data.feature_names]
    rng = np.random.default_rng(SEED)
    ids = np.array([f"patient-{i:04d}" for i in rng.permutation(100_000)[: len(y)]])
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=SEED, stratify=y)
    if quick:
        idx_tr = idx_tr[:240]
    # each party lacks some of the other's patients (5% each, disjoint), rows in its own order
    gone = rng.permutation(idx_tr)
    n_gone = max(1, len(idx_tr) // 20)
    miss_a, miss_p = set(gone[:n_gone].tolist()), set(gone[n_gone : 2 * n_gone].tolist())
    rows_a = rng.permutation([i for i in idx_tr if i not in miss_a])
    rows_p = rng.permutation([i for i in idx_tr if i not in miss_p])
    half = x.shape[1] // 2
    cols_a, cols_p = names[:half], names[half:]

    def table(rows: np.ndarray, cols: list[str], lo: int, hi: int, label: bool) -> Any:
        df = pd.DataFrame(x[np.ix_(rows, np.arange(lo, hi))], columns=cols)
        df.insert(0, "id", ids[rows])
        if label:
            df["diagnosis"] = y[rows]
        return df

    files = {}
    for role, rows_tr, cols, lo, hi in (("active", rows_a, cols_a, 0, half),
                                         ("passive", rows_p, cols_p, half, x.shape[1])):
        d = work / role
        d.mkdir(parents=True, exist_ok=True)
        te = rng.permutation(idx_te)
        table(rows_tr, cols, lo, hi, role == "active").to_csv(d / "train.csv", index=False)
        table(te, cols, lo, hi, role == "active").to_csv(d / "test.csv", index=False)
        files[role] = d
    shared = sorted(set(rows_a.tolist()) & set(rows_p.tolist()))
    return {
        "x": x, "y": y, "ids": ids, "shared_train": np.array(shared), "test": idx_te, "dirs": files,
        "rows_active": len(rows_a), "rows_passive": len(rows_p), "features": (half, x.shape[1] - half),
    }


# ------------------------------------------------------------------------------------ parties


def _read(path: Path, label: bool) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    import pandas as pd

    df = pd.read_csv(path)
    ids = [str(v) for v in df.pop("id").tolist()]
    y = df.pop("diagnosis").to_numpy(dtype=np.float64) if label else None
    return ids, df.to_numpy(dtype=np.float64), y


def party_main(role: str, cfg: dict[str, Any], events: Any) -> None:
    """Entry point of one party's OS process: its own files, its own identity, one TLS channel."""
    out = Path(cfg["dir"]) / "result.json"
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        logging.basicConfig(level=logging.WARNING)
        result = _party(role, cfg, events)
        result["ok"] = True
    except BaseException as exc:  # reported to the demo process as text, never pickled
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    atomic_write_text(out, json.dumps(result))
    if not result["ok"]:
        raise SystemExit(1)


def _emit(events: Any, *item: Any) -> None:
    if events is not None:
        events.put(item)


def _party(role: str, cfg: dict[str, Any], events: Any) -> dict[str, Any]:
    from veil.boost.api import SecureXGBClassifier, align_rows
    from veil.comm import GrpcChannel, PartyIdentity
    from veil.crypto.triples_he import HomomorphicTriples

    active = role == "active"
    me = PartyIdentity.load(cfg["identity"])
    ids, x, y = _read(Path(cfg["dir"]) / "train.csv", active)
    tids, xt, yt = _read(Path(cfg["dir"]) / "test.csv", active)
    t0 = time.perf_counter()
    if active:
        # wait for the passive party's port (it listens, we connect)
        port = int(cfg["port_queue"].get(timeout=cfg["timeout"]))
        ch = GrpcChannel.connect(f"127.0.0.1:{port}", me, cfg["peer_fingerprint"], timeout=cfg["timeout"])
    else:
        ch = GrpcChannel.listen("127.0.0.1:0", me, cfg["peer_fingerprint"], timeout=cfg["timeout"],
                                on_bound=lambda p: cfg["port_queue"].put(p))
    with ch:
        _emit(events, "stage", "connected (mutual TLS, pinned certificates)")
        t_psi = time.perf_counter()
        pos = align_rows(ch, ids, role)
        psi_s = time.perf_counter() - t_psi
        _emit(events, "psi", len(ids), len(pos))
        # dealer-free Beaver triples between the two parties (Gilboa products over OT extension)
        triples = HomomorphicTriples(ch, 0 if active else 1, arith="ot", timeout=cfg["timeout"])
        clf = SecureXGBClassifier(
            role, ch, triples=triples, algorithm=ALGORITHM, seed=SEED, **cfg["params"],
            progress=(lambda done, total: _emit(events, "tree", done, total)) if active else None,
        )
        clf.fit(x[pos], y[pos] if y is not None else None, feature_names=cfg["names"])
        res = clf.result_
        _emit(events, "stage", "secure prediction on the test set")
        tpos = align_rows(ch, tids, role)
        t_pred = time.perf_counter()
        proba = clf.predict_proba(xt[tpos])
        pred_s = time.perf_counter() - t_pred
        clf.save_model(Path(cfg["dir"]) / "model.json")
        stats = ch.stats
        out: dict[str, Any] = {
            "role": role, "rows": len(ids), "shared_rows": len(pos), "psi_s": psi_s,
            "train_s": res.seconds if res is not None else None,
            "predict_s": pred_s, "wall_s": time.perf_counter() - t0,
            "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received, "rounds": stats.rounds,
            "triples": clf.triples.trust, "trees": len(res.model.trees) if res is not None else 0,
            "time_split": dict(res.time_split) if res is not None else {},
            "test_rows": len(tpos), "model": str(Path(cfg["dir"]) / "model.json"),
        }
        if active and proba is not None and yt is not None:
            out["test_ids"] = [tids[i] for i in tpos]
            out["test_y"] = yt[tpos].tolist()
            out["test_proba"] = proba[:, 1].tolist()
        elif not active:
            out["saw_scores"] = proba is not None
    return out


# ------------------------------------------------------------------------------------ act


def _identities(work: Path) -> tuple[Any, Any]:
    from veil.comm import PartyIdentity

    a = PartyIdentity.create("hospital", work / "active" / "identity", overwrite=True)
    p = PartyIdentity.create("lab", work / "passive" / "identity", overwrite=True)
    a.trust(p.cert_pem)  # = veil keys trust active/identity lab.pem
    p.trust(a.cert_pem)
    return a, p


def _plaintext(tables: dict[str, Any], params: dict[str, Any], test_ids: list[str]) -> dict[str, Any]:
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    x, y = tables["x"], tables["y"]
    tr = tables["shared_train"]
    where = {s: i for i, s in enumerate(tables["ids"])}
    te = np.array([where[s] for s in test_ids])
    t0 = time.perf_counter()
    model = xgb.XGBClassifier(
        n_estimators=params["n_estimators"], max_depth=params["max_depth"],
        learning_rate=params["learning_rate"], max_bin=params["max_bin"], reg_lambda=params["reg_lambda"],
        min_child_weight=params["min_child_weight"], tree_method="hist", n_jobs=1, random_state=SEED,
    )
    model.fit(x[tr], y[tr])
    train_s = time.perf_counter() - t0
    proba = model.predict_proba(x[te])[:, 1]
    return {"auc": float(roc_auc_score(y[te], proba)), "train_s": train_s, "proba": proba.tolist()}


def _plot(path: Path, y: np.ndarray, secure: np.ndarray, plain: np.ndarray, auc_s: float,
          auc_p: float) -> None:
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, p, auc, style in (("secure (veil, he-agg)", secure, auc_s, "-"),
                                ("plaintext xgboost", plain, auc_p, "--")):
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, style, label=f"{name}: AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Breast cancer, features split 15/15 between two parties")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path, quick: bool, console: Console) -> ActResult:
    """Run act 1; returns its headline metrics and artefacts."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    t_start = time.perf_counter()
    params = _params(quick)
    work = out_dir / "parties"
    tables = make_tables(work, quick)
    ident_a, ident_p = _identities(work)
    console.print(
        f"hospital (active): {tables['rows_active']} patients x {tables['features'][0]} features"
        " + diagnosis; "
        f"lab (passive): {tables['rows_passive']} patients x {tables['features'][1]} features; "
        f"{len(tables['shared_train'])} patients in common (neither side learns the others)."
    )
    console.print(f"algorithm {ALGORITHM} (HE bucket sums + secret sharing), dealer-free triples; "
                  f"{params['n_estimators']} trees of depth {params['max_depth']}, {params['max_bin']} bins")
    ctx = spawn_context()
    events = ctx.Queue()
    port_q = ctx.Queue()
    timeout = 900.0 if quick else 1800.0  # every wait is bounded; generous for a shared machine
    procs = []
    for role, peer in (("passive", ident_a), ("active", ident_p)):
        d = tables["dirs"][role]
        (d / "result.json").unlink(missing_ok=True)
        names = [c for c in pd.read_csv(d / "test.csv", nrows=1).columns if c not in ("id", "diagnosis")]
        cfg = {"dir": str(d), "identity": str(d / "identity"), "peer_fingerprint": peer.fingerprint,
               "params": params, "timeout": timeout, "port_queue": port_q, "names": names}
        p = ctx.Process(target=party_main, args=(role, cfg, events if role == "active" else None),
                        name=f"veil-demo-{role}", daemon=True)
        procs.append(p)
    with progress(console) as prog:
        t_setup = prog.add_task("start 2 party processes, TLS + PSI", total=2)
        t_trees = prog.add_task("secure training (trees)", total=params["n_estimators"])

        def drain() -> None:
            while True:
                try:
                    ev = events.get_nowait()
                except queue.Empty:
                    return
                if ev[0] == "stage":
                    prog.console.print(f"  · {ev[1]}")
                    prog.update(t_setup, completed=max(1, prog.tasks[t_setup].completed))
                elif ev[0] == "psi":
                    prog.update(t_setup, completed=2)
                    prog.console.print(f"  · PSI: {ev[2]} of the hospital's {ev[1]} patients are shared")
                elif ev[0] == "tree":
                    prog.update(t_trees, completed=int(ev[1]), total=int(ev[2]))

        for p in procs:
            p.start()
        try:
            wait_processes(procs, timeout, on_tick=drain)
        finally:
            stop_processes(procs)
            for q in (events, port_q):
                q.close()
                q.join_thread()
    res: dict[str, dict[str, Any]] = {}
    for role in ("active", "passive"):
        f = tables["dirs"][role] / "result.json"
        if not f.exists():
            raise DemoError(f"the {role} party process exited without a result")
        res[role] = json.loads(f.read_text())
    for role in ("active", "passive"):
        if not res[role]["ok"]:
            raise DemoError(f"{role} party failed: {res[role]['error']}")
    a, p = res["active"], res["passive"]
    y = np.array(a["test_y"])
    secure_p = np.array(a["test_proba"])
    auc_secure = float(roc_auc_score(y, secure_p))
    plain = _plaintext(tables, params, a["test_ids"])
    png = out_dir / "act1_roc.png"
    _plot(png, y, secure_p, np.array(plain["proba"]), auc_secure, plain["auc"])

    table = Table(title="Act 1 · secure vs plaintext XGBoost (same hyper-parameters, same rows)")
    for col in ("", "AUC (test)", "train time", "traffic"):
        table.add_column(col, justify="right")
    table.add_row("veil secure (2 processes, TLS)", f"{auc_secure:.4f}", f"{a['train_s']:.1f} s",
                  f"{(a['bytes_sent'] + a['bytes_received']) / 1e6:.1f} MB")
    table.add_row("plaintext xgboost (1 process)", f"{plain['auc']:.4f}", f"{plain['train_s']:.2f} s", "-")
    console.print(table)
    console.print(f"the lab saw the scores: {p.get('saw_scores')}; PSI revealed only the "
                  f"{a['shared_rows']} shared ids to both sides")
    summary = {
        "act": 1, "quick": quick, "dataset": "sklearn breast_cancer (569 x 30), features split 15/15",
        "algorithm": ALGORITHM, "triples": a["triples"], "transport": "gRPC + mutual TLS on 127.0.0.1",
        "params": params,
        "rows": {"active": a["rows"], "passive": p["rows"], "shared_train": a["shared_rows"],
                 "test": a["test_rows"]},
        "secure": {"auc": auc_secure, "train_s": a["train_s"], "psi_s": a["psi_s"],
                   "predict_s": a["predict_s"],
                   "bytes_sent_active": a["bytes_sent"], "bytes_sent_passive": p["bytes_sent"],
                   "rounds_active": a["rounds"], "time_split_active": a["time_split"], "trees": a["trees"],
                   "passive_saw_scores": p.get("saw_scores")},
        "plaintext": {"auc": plain["auc"], "train_s": plain["train_s"]},
        "auc_gap": abs(auc_secure - plain["auc"]),
        "models": {"active": a["model"], "passive": p["model"]},
        "machine": {"cpu_count": os.cpu_count()},
        "wall_s": time.perf_counter() - t_start,
    }
    js = write_json(out_dir / "act1.json", summary)
    return ActResult(
        act=1, title=TITLE, ok=True, seconds=0.0,
        metrics={
            "AUC secure": round(auc_secure, 4), "AUC plaintext": round(plain["auc"], 4),
            "train s secure": round(float(a["train_s"]), 1), "train s plaintext": round(plain["train_s"], 2),
            "shared rows (PSI)": a["shared_rows"],
        },
        artefacts=[str(js), str(png), a["model"], p["model"]],
    )
