"""Bad flags and missing files: every one exits non-zero with one clear line and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _veil(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "veil", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "VEIL_HOME": str(cwd / "veil-home"), "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def ident(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ident")
    r = _veil("keys", "init", "--name", "alice", "--out", str(d / "alice"), cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "alice"


def _cases(tmp: Path, ident: Path) -> list[tuple[str, list[str]]]:
    garbage = tmp / "garbage.veil"
    garbage.write_bytes(b"this is not a veil package" * 10)
    text_csv = tmp / "text.csv"
    text_csv.write_text("id,label,f1\na,1,hello\nb,0,world\n")
    return [
        ("unknown root flag", ["--bogus"]),
        ("unknown sub-command", ["boost", "fly"]),
        ("missing required option", ["boost", "train", "--role", "active"]),
        ("bad role", ["boost", "train", "--role", "wizard", "--data", str(text_csv), "--identity", str(ident),
                      "--peer-fingerprint", "00" * 32, "--listen", "127.0.0.1:0"]),
        ("missing data file", ["boost", "train", "--role", "active", "--data", str(tmp / "nope.csv"),
                               "--identity", str(ident), "--peer-fingerprint", "00" * 32,
                               "--listen", "127.0.0.1:0", "--label-column", "label"]),
        ("missing identity dir", ["keys", "show", str(tmp / "no-such-identity")]),
        ("missing peer certificate", ["keys", "trust", str(ident), str(tmp / "missing.pem")]),
        ("missing model to package", ["serve", "package", str(tmp / "missing.onnx"), "--out", str(tmp / "m.veil")]),
        ("corrupt package", ["serve", "inspect", str(garbage)]),
        ("non-loopback load target", ["serve", "load", "--url", "http://192.0.2.1:8080", "--model", "m",
                                      "--duration", "1"]),
        ("unknown demo act", ["demo", "--act", "9"]),
        ("bad integer", ["tune", "server", "--cut-layer", "many"]),
        ("missing tune data file", ["tune", "client", "--server", "127.0.0.1:1", "--data", str(tmp / "no.jsonl"),
                                    "--identity", str(ident), "--peer", "00" * 32]),
    ]


def test_a_dozen_bad_invocations_fail_cleanly(tmp_path: Path, ident: Path) -> None:
    cases = _cases(tmp_path, ident)
    assert len(cases) >= 12
    failures = []
    for name, args in cases:
        r = _veil(*args, cwd=tmp_path)
        out = r.stdout + r.stderr
        problems = []
        if r.returncode == 0:
            problems.append("exit code 0")
        if "Traceback" in out:
            problems.append("traceback printed")
        if not out.strip():
            problems.append("no message")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}\n{out[-800:]}")
    assert not failures, "\n\n".join(failures)


def test_every_group_help_has_examples() -> None:
    for group in ["boost", "tune", "serve", "kms", "keys"]:
        r = subprocess.run([sys.executable, "-m", "veil", group, "--help"], capture_output=True, text=True,
                           timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stdout + r.stderr
        assert "Usage" in r.stdout
