"""`veil boost train/predict` end to end: CSV files, PSI on ids, TLS channel, model files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from veil.cli.boost import app, load_table
from veil.comm import PartyIdentity
from veil.errors import InputError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_load_table_errors(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame({"id": ["a", "b"], "x": [1.0, 2.0], "s": ["u", "v"], "y": [0, 1]}).to_csv(p, index=False)
    with pytest.raises(InputError, match="non-numeric"):
        load_table(p, "id", "y", need_label=True)
    with pytest.raises(InputError, match="label column"):
        load_table(p, "id", "nope", need_label=True)
    with pytest.raises(InputError, match="label"):
        load_table(p, "id", None, need_label=True)
    with pytest.raises(InputError, match="does not exist"):
        load_table(tmp_path / "missing.csv", None, None, need_label=False)
    pd.DataFrame({"id": ["a", "a"], "x": [1.0, 2.0]}).to_csv(p, index=False)
    with pytest.raises(InputError, match="duplicate"):
        load_table(p, "id", None, need_label=False)


@pytest.mark.slow
def test_cli_train_and_predict_three_processes(tmp_path, cancer):
    """dealer + passive + active as three `veil` processes over mutual TLS; then `veil boost predict`."""
    import subprocess
    import sys
    from pathlib import Path

    veil = str(Path(sys.executable).parent / "veil")
    xtr, _, ytr, _ = cancer
    xtr, ytr = xtr[:160], ytr[:160]
    ids = [f"r{i}" for i in range(len(xtr))]
    a = pd.DataFrame(xtr[:, :4], columns=[f"a{i}" for i in range(4)])
    a.insert(0, "id", ids)
    a["label"] = ytr
    b = pd.DataFrame(xtr[:, 4:8], columns=[f"b{i}" for i in range(4)])
    b.insert(0, "id", ids)
    b = b.iloc[::-1].iloc[:150]  # other order, 10 ids missing
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_parquet(tmp_path / "b.parquet")
    ia = PartyIdentity.create("alice", tmp_path / "ia")
    ib = PartyIdentity.create("bob", tmp_path / "ib")
    idl = PartyIdentity.create("dealer", tmp_path / "id")
    for x, y in ((ia, ib), (ia, idl), (ib, idl)):
        x.trust(y.cert_pem)
        y.trust(x.cert_pem)

    def run3(cmd_a, cmd_b, port_da, port_db):
        dealer = subprocess.Popen(
            [
                veil,
                "boost",
                "dealer",
                "--listen-active",
                f"127.0.0.1:{port_da}",
                "--listen-passive",
                f"127.0.0.1:{port_db}",
                "--identity",
                str(tmp_path / "id"),
                "--active-fingerprint",
                ia.fingerprint,
                "--passive-fingerprint",
                ib.fingerprint,
                "--timeout",
                "120",
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        pb = subprocess.Popen(cmd_b, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pa = subprocess.Popen(cmd_a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = []
        for p in (pa, pb, dealer):
            try:
                o, e = p.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                o, e = p.communicate()
            out.append((p.returncode, o, e))
        return out

    port, pda, pdb = _free_port(), _free_port(), _free_port()
    common = [
        "--n-estimators",
        "2",
        "--max-depth",
        "2",
        "--max-bin",
        "8",
        "--timeout",
        "120",
        "--triples",
        "dealer",
    ]
    ra, rb, rd = run3(
        [
            veil,
            "boost",
            "train",
            "--role",
            "active",
            "--data",
            str(tmp_path / "a.csv"),
            "--id-column",
            "id",
            "--label-column",
            "label",
            "--peer",
            f"127.0.0.1:{port}",
            "--identity",
            str(tmp_path / "ia"),
            "--peer-fingerprint",
            ib.fingerprint,
            "--dealer",
            f"127.0.0.1:{pda}",
            "--dealer-fingerprint",
            idl.fingerprint,
            "--out",
            str(tmp_path / "ma.json"),
            "--summary-json",
            str(tmp_path / "sa.json"),
            *common,
        ],
        [
            veil,
            "boost",
            "train",
            "--role",
            "passive",
            "--data",
            str(tmp_path / "b.parquet"),
            "--id-column",
            "id",
            "--listen",
            f"127.0.0.1:{port}",
            "--identity",
            str(tmp_path / "ib"),
            "--peer-fingerprint",
            ia.fingerprint,
            "--dealer",
            f"127.0.0.1:{pdb}",
            "--dealer-fingerprint",
            idl.fingerprint,
            "--out",
            str(tmp_path / "mb.json"),
            *common,
        ],
        pda,
        pdb,
    )
    assert ra[0] == 0, ra[2]
    assert rb[0] == 0, rb[2]
    assert rd[0] == 0, rd[2]
    assert "bytes sent" in ra[1] and "rounds" in ra[1]
    summary = json.loads((tmp_path / "sa.json").read_text())
    assert summary["trees"] == 2 and summary["bytes_sent"] > 0 and summary["triples"] == "dealer"
    from veil.boost.model import load_model

    ma, mb = load_model(tmp_path / "ma.json"), load_model(tmp_path / "mb.json")
    assert ma.model_id == mb.model_id and ma.metadata["n_rows"] == 150
    assert ma.feature_names == ["a0", "a1", "a2", "a3"] and mb.feature_names == ["b0", "b1", "b2", "b3"]
    # secure prediction with the two model files
    port, pda, pdb = _free_port(), _free_port(), _free_port()
    pc = ["--triples", "dealer", "--timeout", "120"]
    ra, rb, rd = run3(
        [
            veil,
            "boost",
            "predict",
            "--role",
            "active",
            "--data",
            str(tmp_path / "a.csv"),
            "--id-column",
            "id",
            "--model",
            str(tmp_path / "ma.json"),
            "--peer",
            f"127.0.0.1:{port}",
            "--identity",
            str(tmp_path / "ia"),
            "--peer-fingerprint",
            ib.fingerprint,
            "--dealer",
            f"127.0.0.1:{pda}",
            "--dealer-fingerprint",
            idl.fingerprint,
            "--out",
            str(tmp_path / "scores.csv"),
            *pc,
        ],
        [
            veil,
            "boost",
            "predict",
            "--role",
            "passive",
            "--data",
            str(tmp_path / "b.parquet"),
            "--id-column",
            "id",
            "--model",
            str(tmp_path / "mb.json"),
            "--listen",
            f"127.0.0.1:{port}",
            "--identity",
            str(tmp_path / "ib"),
            "--peer-fingerprint",
            ia.fingerprint,
            "--dealer",
            f"127.0.0.1:{pdb}",
            "--dealer-fingerprint",
            idl.fingerprint,
            *pc,
        ],
        pda,
        pdb,
    )
    assert ra[0] == 0, ra[2]
    assert rb[0] == 0, rb[2]
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert len(scores) == 150 and scores["score"].between(0, 1).all()
    assert rb[1].startswith("prediction done") and "," not in rb[1]  # passive gets no scores


def test_cli_bad_role_is_one_line_error(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame({"x": np.arange(4.0)}).to_csv(p, index=False)
    ident = PartyIdentity.create("z", tmp_path / "z")
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--role",
            "boss",
            "--data",
            str(p),
            "--listen",
            "127.0.0.1:0",
            "--identity",
            str(tmp_path / "z"),
            "--peer-fingerprint",
            ident.fingerprint,
            "--out",
            str(tmp_path / "m.json"),
        ],
    )
    assert res.exit_code != 0
    assert "role" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.json").exists()
