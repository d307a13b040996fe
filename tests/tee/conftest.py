from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def veil_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every tee test gets its own simulated platform key under a temporary VEIL_HOME."""
    home = tmp_path / "veil-home"
    monkeypatch.setenv("VEIL_HOME", str(home))
    return home


class FakeClock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
