"""Helpers for the demo and example tests: run a command in a private VEIL_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cmd(argv: list[str], home: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with a private simulated platform key / EPC registry; never hangs."""
    env = {**os.environ, "VEIL_HOME": str(home), "VEIL_SIM_EPC_DIR": str(home / "epc"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "120"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def veil_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "veil", *args]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "veil-home"
    h.mkdir(mode=0o700)
    return h
