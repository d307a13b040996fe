"""``veil boost``: secure two-party vertical XGBoost from the command line.

    veil keys init --name alice --out alice/        # once per party; exchange fingerprints
    veil boost train --role passive --data bank.csv --id-column id --listen 0.0.0.0:7000 \\
        --identity bob/ --peer-fingerprint <alice's> --out bob-model.json
    veil boost train --role active --data shop.csv --id-column id --label-column y \\
        --peer bob-host:7000 --identity alice/ --peer-fingerprint <bob's> --out alice-model.json
    veil boost predict --role active --data new.csv --id-column id --model alice-model.json \\
        --peer bob-host:7001 --identity alice/ --peer-fingerprint <bob's> --out scores.csv
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import typer

from veil.atomic import atomic_write_text
from veil.boost.errors import BoostConfigError, BoostInputError

app = typer.Typer(
    name="boost",
    help="Secure two-party vertical XGBoost (HE + secret sharing).",
    no_args_is_help=True,
)

log = logging.getLogger("veil.boost")

ROLE_HELP = "active = holds the labels; passive = holds only features."


def _run(fn: Callable[[], Any]) -> Any:
    from veil.cli.common import run_cli

    return run_cli(fn)()


# ---------------------------------------------------------------------------------- data
def load_table(
    path: Path,
    id_column: str | None,
    label_column: str | None,
    *,
    need_label: bool,
    columns: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, list[str]]:
    """Read CSV/Parquet -> (features, labels, ids, feature names); clear errors on bad input."""
    import pandas as pd

    if not path.exists():
        raise BoostInputError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif path.suffix.lower() in (".csv", ".txt"):
            df = pd.read_csv(path)
        else:
            raise BoostInputError(f"{path}: use a .csv or .parquet file")
    except BoostInputError:
        raise
    except Exception as exc:
        raise BoostInputError(f"cannot read {path}: {exc}") from None
    if df.shape[0] == 0:
        raise BoostInputError(f"{path} has no rows")
    ids = None
    if id_column is not None:
        if id_column not in df.columns:
            raise BoostInputError(
                f"{path} has no id column {id_column!r} (columns: {', '.join(map(str, df.columns))})"
            )
        ids = [str(v) for v in df[id_column].tolist()]
        if len(set(ids)) != len(ids):
            raise BoostInputError(f"{path}: id column {id_column!r} has duplicate values")
        df = df.drop(columns=[id_column])
    labels = None
    if label_column is not None:
        if label_column not in df.columns:
            raise BoostInputError(f"{path} has no label column {label_column!r}")
        lab = pd.to_numeric(df[label_column], errors="coerce")
        if lab.isna().any():
            raise BoostInputError(f"{path}: label column {label_column!r} has missing or non-numeric values")
        labels = lab.to_numpy(dtype=np.float64)
        df = df.drop(columns=[label_column])
    elif need_label:
        raise BoostInputError("the active party must name its label column (--label-column)")
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise BoostInputError(f"{path} lacks the model's feature column(s): {', '.join(missing)}")
        df = df[columns]
    bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise BoostInputError(f"{path}: non-numeric feature column(s): {', '.join(bad)} (encode them first)")
    if df.shape[1] == 0:
        raise BoostInputError(f"{path} has no feature columns")
    return df.to_numpy(dtype=np.float64), labels, ids, [str(c) for c in df.columns]


# ---------------------------------------------------------------------------------- channels
def open_channel(
    peer: str | None, listen: str | None, identity: Path, peer_fingerprint: str, timeout: float
) -> Any:
    """TLS channel to the peer: connect to ``peer`` or wait on ``listen``."""
    from veil.comm import GrpcChannel, PartyIdentity

    if (peer is None) == (listen is None):
        raise BoostConfigError("give exactly one of --peer HOST:PORT or --listen HOST:PORT")
    ident = PartyIdentity.load(identity)
    if listen is not None:
        return GrpcChannel.listen(listen, ident, peer_fingerprint, timeout=timeout)
    return GrpcChannel.connect(peer, ident, peer_fingerprint, timeout=timeout)  # type: ignore[arg-type]


def open_triples(
    kind: str,
    channel: Any,
    party: int,
    dealer: str | None,
    dealer_fingerprint: str | None,
    identity: Path,
    timeout: float,
) -> Any:
    from veil.boost.api import make_triple_source

    if kind == "dealer":
        from veil.comm import GrpcChannel, PartyIdentity
        from veil.crypto.triples import TrustedDealer

        if dealer is None or dealer_fingerprint is None:
            raise BoostConfigError("--triples dealer needs --dealer HOST:PORT and --dealer-fingerprint")
        dch = GrpcChannel.connect(dealer, PartyIdentity.load(identity), dealer_fingerprint, timeout=timeout)
        return TrustedDealer(dch, party, timeout=timeout)
    if kind != "homomorphic":
        raise BoostConfigError("--triples must be 'homomorphic' (dealer-free, default) or 'dealer'")
    return make_triple_source("homomorphic", channel, party)


# ---------------------------------------------------------------------------------- commands
@app.command("train")
def train(
    role: str = typer.Option(..., "--role", help=ROLE_HELP),
    data: Path = typer.Option(..., "--data", help="CSV or Parquet file with this party's columns."),
    id_column: str = typer.Option(None, "--id-column", help="Row id column; rows are aligned by PSI."),
    label_column: str = typer.Option(None, "--label-column", help="Label column (active party only)."),
    peer: str = typer.Option(None, "--peer", help="Connect to the peer at HOST:PORT."),
    listen: str = typer.Option(None, "--listen", help="Wait for the peer on HOST:PORT."),
    identity: Path = typer.Option(..., "--identity", help="This party's identity dir (veil keys init)."),
    peer_fingerprint: str = typer.Option(
        ..., "--peer-fingerprint", help="The peer's certificate fingerprint."
    ),
    algorithm: str = typer.Option(
        "auto", "--algorithm", help="ss-agg, he-agg, or auto (ss-agg, the faster with either triple source)."
    ),
    triples: str = typer.Option("homomorphic", "--triples", help="homomorphic (dealer-free) or dealer."),
    dealer: str = typer.Option(None, "--dealer", help="Trusted dealer HOST:PORT (with --triples dealer)."),
    dealer_fingerprint: str = typer.Option(None, "--dealer-fingerprint", help="The dealer's fingerprint."),
    n_estimators: int = typer.Option(10, "--n-estimators"),
    max_depth: int = typer.Option(5, "--max-depth"),
    learning_rate: float = typer.Option(0.3, "--learning-rate"),
    max_bin: int = typer.Option(16, "--max-bin"),
    reg_lambda: float = typer.Option(1.0, "--reg-lambda"),
    gamma: float = typer.Option(0.0, "--gamma"),
    min_child_weight: float = typer.Option(1.0, "--min-child-weight"),
    subsample: float = typer.Option(1.0, "--subsample"),
    colsample_bytree: float = typer.Option(1.0, "--colsample-bytree"),
    objective: str = typer.Option(
        "binary:logistic", "--objective", help="binary:logistic or reg:squarederror."
    ),
    valid: Path = typer.Option(
        None, "--valid", help="Validation file (same columns) for the summary metric."
    ),
    early_stopping_rounds: int = typer.Option(None, "--early-stopping-rounds", help="Needs --valid."),
    out: Path = typer.Option(..., "--out", help="Where to write this party's model file."),
    summary_json: Path = typer.Option(None, "--summary-json", help="Also write the summary as JSON."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds any single wait may take."),
) -> None:
    """Train a secure XGBoost model together with the peer; writes this party's half of the model."""
    kw = dict(locals())
    _run(lambda: _train(**kw))


def _train(**kw: Any) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from veil.boost.api import SecureXGBClassifier, SecureXGBRegressor

    console = Console(stderr=True)
    role = kw["role"]
    if role not in ("active", "passive"):
        raise BoostConfigError("--role must be 'active' or 'passive'")
    if kw["objective"] not in ("binary:logistic", "reg:squarederror"):
        raise BoostConfigError("--objective must be binary:logistic or reg:squarederror")
    if kw["early_stopping_rounds"] is not None and kw["valid"] is None:
        raise BoostConfigError("--early-stopping-rounds needs --valid")
    active = role == "active"
    x, y, ids, names = load_table(
        kw["data"], kw["id_column"], kw["label_column"] if active else None, need_label=active
    )
    vdata = None
    if kw["valid"] is not None:
        vdata = load_table(
            kw["valid"], kw["id_column"], kw["label_column"] if active else None, need_label=active
        )
    ch = open_channel(kw["peer"], kw["listen"], kw["identity"], kw["peer_fingerprint"], kw["timeout"])
    try:
        party = 0 if active else 1
        src = open_triples(
            kw["triples"], ch, party, kw["dealer"], kw["dealer_fingerprint"], kw["identity"], kw["timeout"]
        )
        cls = SecureXGBClassifier if kw["objective"] == "binary:logistic" else SecureXGBRegressor
        with Progress(
            TextColumn("[bold]secure XGBoost[/] {task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} trees"),
            TimeElapsedColumn(),
            console=console,
        ) as prog:
            from veil.boost.api import resolve_algorithm

            kw["algorithm"] = resolve_algorithm(kw["algorithm"], src)
            task = prog.add_task(
                f"({role}, {kw['algorithm']}, triples={src.trust})", total=kw["n_estimators"]
            )
            est = cls(
                role,
                ch,
                triples=src,
                algorithm=kw["algorithm"],
                n_estimators=kw["n_estimators"],
                max_depth=kw["max_depth"],
                learning_rate=kw["learning_rate"],
                max_bin=kw["max_bin"],
                reg_lambda=kw["reg_lambda"],
                gamma=kw["gamma"],
                min_child_weight=kw["min_child_weight"],
                subsample=kw["subsample"],
                colsample_bytree=kw["colsample_bytree"],
                early_stopping_rounds=kw["early_stopping_rounds"],
                progress=lambda done, total: prog.update(task, completed=done),
            )
            eval_set = (vdata[0], vdata[1]) if vdata is not None and kw["early_stopping_rounds"] else None
            est.fit(
                x,
                y,
                ids=ids,
                eval_set=eval_set,
                eval_ids=vdata[2] if eval_set and vdata else None,
                feature_names=names,
            )
        res = est.result_
        if res is None:
            raise BoostConfigError("training produced no result")
        metric_name, metric = "", None
        if vdata is not None:
            t0 = time.perf_counter()
            vx, yv = vdata[0], vdata[1]
            if vdata[2] is not None:
                from veil.boost.api import align_rows

                pos = align_rows(ch, vdata[2], role)
                vx = vx[pos]
                yv = None if yv is None else yv[pos]
            m = est.predict_margin(vx)
            if m is not None and yv is not None:
                metric_name, metric = _metric(kw["objective"], yv, m)
            log.info("validation prediction took %.1f s", time.perf_counter() - t0)
        est.save_model(kw["out"])
        summary = {
            "role": role,
            "algorithm": kw["algorithm"],
            "triples": src.trust,
            "trees": len(res.model.trees),
            "seconds": round(res.seconds, 2),
            "bytes_sent": res.bytes_sent,
            "rounds": res.rounds,
            "he_ops": res.he_ops,
            "time_split": {k: round(v, 2) for k, v in res.time_split.items()},
            "model": str(kw["out"]),
        }
        if metric is not None:
            summary[metric_name] = round(metric, 5)
        table = Table(title=f"veil boost train — {role}")
        table.add_column("trees", justify="right")
        table.add_column("seconds", justify="right")
        table.add_column("bytes sent", justify="right")
        table.add_column("rounds", justify="right")
        table.add_column(metric_name or "validation", justify="right")
        table.add_row(
            str(summary["trees"]),
            f"{res.seconds:.1f}",
            f"{res.bytes_sent:,}",
            str(res.rounds),
            "-" if metric is None else f"{metric:.4f}",
        )
        Console().print(table)
        if kw["summary_json"] is not None:
            atomic_write_text(kw["summary_json"], json.dumps(summary, indent=1))
    except BaseException as exc:
        _abort(ch, exc)
        raise
    finally:
        ch.close()


def _metric(objective: str, y: np.ndarray, margin: np.ndarray) -> tuple[str, float]:
    if objective == "binary:logistic":
        from sklearn.metrics import roc_auc_score

        if len(set(y.tolist())) < 2:
            return "auc", float("nan")
        return "auc", float(roc_auc_score(y, margin))
    return "rmse", float(np.sqrt(np.mean((margin - y) ** 2)))


def _abort(ch: Any, exc: BaseException) -> None:
    try:
        ch.abort(f"{type(exc).__name__}: {exc}")
    except Exception as err:
        log.debug("abort failed: %s", err)


@app.command("predict")
def predict(
    role: str = typer.Option(..., "--role", help=ROLE_HELP),
    data: Path = typer.Option(..., "--data", help="CSV or Parquet with this party's feature columns."),
    model: Path = typer.Option(..., "--model", help="This party's model file."),
    id_column: str = typer.Option(None, "--id-column", help="Row id column; rows are aligned by PSI."),
    peer: str = typer.Option(None, "--peer"),
    listen: str = typer.Option(None, "--listen"),
    identity: Path = typer.Option(..., "--identity"),
    peer_fingerprint: str = typer.Option(..., "--peer-fingerprint"),
    triples: str = typer.Option("homomorphic", "--triples"),
    dealer: str = typer.Option(None, "--dealer"),
    dealer_fingerprint: str = typer.Option(None, "--dealer-fingerprint"),
    out: Path = typer.Option(None, "--out", help="CSV of predictions (active party)."),
    timeout: float = typer.Option(600.0, "--timeout"),
) -> None:
    """Secure prediction: the active party gets the scores; the passive party learns nothing."""
    kw = dict(locals())
    _run(lambda: _predict(**kw))


def _predict(**kw: Any) -> None:
    from veil.boost.model import load_model
    from veil.boost.predict import secure_predict_margin

    role = kw["role"]
    pm = load_model(kw["model"])
    if pm.role != role:
        raise BoostConfigError(f"{kw['model']} belongs to the {pm.role} party, not {role}")
    x, _, ids, _ = load_table(kw["data"], kw["id_column"], None, need_label=False, columns=pm.feature_names)
    ch = open_channel(kw["peer"], kw["listen"], kw["identity"], kw["peer_fingerprint"], kw["timeout"])
    try:
        src = open_triples(
            kw["triples"], ch, pm.party, kw["dealer"], kw["dealer_fingerprint"], kw["identity"], kw["timeout"]
        )
        if ids is not None:
            from veil.boost.api import align_rows

            pos = align_rows(ch, ids, role)
            x = x[pos]
            ids = [ids[i] for i in pos]
        m = secure_predict_margin(ch, pm, x, src)
    except BaseException as exc:
        _abort(ch, exc)
        raise
    finally:
        ch.close()
    if m is None:
        typer.echo(f"prediction done: {x.shape[0]} rows scored; the active party holds the results")
        return
    score = 1.0 / (1.0 + np.exp(-m)) if pm.objective == "binary:logistic" else m
    lines = ["id,score"] + [f"{i if ids is None else ids[i]},{s:.6f}" for i, s in enumerate(score)]
    if kw["out"] is not None:
        atomic_write_text(kw["out"], "\n".join(lines) + "\n")  # temp + fsync + rename (veil.atomic)
        typer.echo(f"wrote {len(score)} predictions to {kw['out']}")
    else:
        typer.echo("\n".join(lines))


@app.command("dealer")
def dealer_cmd(
    listen_active: str = typer.Option(
        ..., "--listen-active", help="HOST:PORT where the active party connects."
    ),
    listen_passive: str = typer.Option(
        ..., "--listen-passive", help="HOST:PORT where the passive party connects."
    ),
    identity: Path = typer.Option(..., "--identity", help="The dealer's identity dir."),
    active_fingerprint: str = typer.Option(..., "--active-fingerprint"),
    passive_fingerprint: str = typer.Option(..., "--passive-fingerprint"),
    timeout: float = typer.Option(3600.0, "--timeout"),
) -> None:
    """Serve one training/prediction session as the TRUSTED DEALER (weaker trust: it must not collude)."""
    kw = dict(locals())
    _run(lambda: _dealer(**kw))


def _dealer(**kw: Any) -> None:
    from veil.comm import PartyIdentity
    from veil.comm.grpc_channel import GrpcListener
    from veil.crypto.triples import run_dealer

    ident = PartyIdentity.load(kw["identity"])
    la = GrpcListener(kw["listen_active"], ident, kw["active_fingerprint"], timeout=kw["timeout"])
    lp = GrpcListener(kw["listen_passive"], ident, kw["passive_fingerprint"], timeout=kw["timeout"])
    typer.echo(
        "trusted dealer: waiting for both parties (weaker trust: must not collude with either)", err=True
    )
    ca = la.accept(kw["timeout"])
    cp = lp.accept(kw["timeout"])
    served = run_dealer(ca, cp, timeout=kw["timeout"])
    typer.echo(f"trusted dealer: served {served} requests", err=True)
    ca.close()
    cp.close()
