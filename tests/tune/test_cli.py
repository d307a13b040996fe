"""`veil tune` commands that need no model download or network."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from veil.cli.main import app

from . import parties

runner = CliRunner()


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


def test_owner_keygen_and_decrypt_export(tmp_path: Path) -> None:
    r = runner.invoke(app, ["tune", "owner-keygen", "--out", str(tmp_path / "owner")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "owner" / "owner.x25519").stat().st_mode & 0o077 == 0
    from veil.tune.export import load_owner_public

    tee = parties.make_enclave("llama", 1)
    (tmp_path / "x.enc").write_bytes(tee.export(load_owner_public(tmp_path / "owner")))
    r = runner.invoke(app, ["tune", "decrypt-export", "--owner-key", str(tmp_path / "owner"),
                            "--in", str(tmp_path / "x.enc"), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "SIMULATED" in r.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_bad_input_is_one_line_and_nonzero_exit(tmp_path: Path) -> None:
    r = runner.invoke(app, ["tune", "client", "--server", "127.0.0.1:1"])
    assert r.exit_code == 2 and "error: --identity" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["tune", "decrypt-export", "--owner-key", str(tmp_path), "--in", str(tmp_path / "no"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["tune", "measurement", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a local directory" in r.output
