"""Root CLI: help lists every group, --version, groups without args print usage; `veil keys`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from veil import __version__
from veil.cli.main import app
from veil.comm.identity import PartyIdentity

runner = CliRunner()
GROUPS = ["boost", "tune", "serve", "kms", "keys"]


def test_help_lists_every_group() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0, res.output
    for name in [*GROUPS, "demo"]:
        assert f" {name} " in res.output, f"{name} missing from:\n{res.output}"


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"veil {__version__}"


def test_no_args_prints_usage() -> None:
    res = runner.invoke(app, [])
    assert "Usage" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("group", GROUPS)
def test_group_without_args_prints_usage(group: str) -> None:
    res = runner.invoke(app, [group])
    assert "Usage" in res.output, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_console_script_runs() -> None:
    exe = Path(sys.executable).with_name("veil")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "keys" in out.stdout and "Traceback" not in out.stderr


def test_keys_init_show_trust(tmp_path: Path) -> None:
    res = runner.invoke(app, ["keys", "init", "--name", "alice", "--out", str(tmp_path / "alice")])
    assert res.exit_code == 0, res.output
    ident = PartyIdentity.load(tmp_path / "alice")
    assert f"fingerprint: {ident.fingerprint}" in res.output
    key_mode = stat.S_IMODE(os.stat(tmp_path / "alice" / "key.pem").st_mode)
    assert key_mode == 0o600
    assert b"PRIVATE KEY" not in (tmp_path / "alice" / "cert.pem").read_bytes()

    runner.invoke(app, ["keys", "init", "--name", "bob", "--out", str(tmp_path / "bob")])
    bob = PartyIdentity.load(tmp_path / "bob")
    res = runner.invoke(app, ["keys", "trust", str(tmp_path / "alice"), str(tmp_path / "bob" / "cert.pem")])
    assert res.exit_code == 0, res.output
    assert bob.fingerprint in res.output
    assert ident.peer_cert(bob.fingerprint) == bob.cert_pem

    res = runner.invoke(app, ["keys", "show", str(tmp_path / "alice")])
    assert res.exit_code == 0, res.output
    assert (
        ident.fingerprint in res.output and "trusted peers: 1" in res.output and bob.fingerprint in res.output
    )


def test_keys_errors_are_one_line(tmp_path: Path) -> None:
    runner.invoke(app, ["keys", "init", "--name", "alice", "--out", str(tmp_path / "a")])
    res = runner.invoke(app, ["keys", "init", "--name", "alice", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output and "Traceback" not in res.output

    res = runner.invoke(app, ["keys", "show", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no party identity" in res.output

    res = runner.invoke(app, ["keys", "init", "--name", "bad name!", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "invalid party name" in res.output

    runner.invoke(app, ["keys", "init", "--name", "bob", "--out", str(tmp_path / "bob")])
    res = runner.invoke(
        app, ["keys", "trust", str(tmp_path / "a"), str(tmp_path / "bob"), "--expect", "00" * 32]
    )
    assert res.exit_code == 2 and "not the expected" in res.output
    assert not (tmp_path / "a" / "peers").exists()
