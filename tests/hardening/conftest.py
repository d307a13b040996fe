"""Shared settings of the hardening campaigns (fuzz sizes, deadlines)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

#: examples per fuzz test: small in `make test`, `make fuzz` sets VEIL_FUZZ_EXAMPLES=5000
FUZZ_EXAMPLES = int(os.environ.get("VEIL_FUZZ_EXAMPLES", "200"))

settings.register_profile(
    "veil-fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=2000,  # ms per example: a decoder that hangs fails the test instead of hanging it
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


def fuzz_settings(scale: float = 1.0, deadline_ms: int = 2000) -> settings:
    """Per-test settings: ``scale`` shrinks the count for expensive targets."""
    return settings(
        settings.get_profile("veil-fuzz"),
        max_examples=max(10, int(FUZZ_EXAMPLES * scale)),
        deadline=deadline_ms,
    )


def pytest_sessionfinish(session: object, exitstatus: int) -> None:
    """Write the campaign counts where benchmarks/hardening.py asked for them."""
    path = os.environ.get("VEIL_HARDENING_REPORT")
    if not path:
        return
    import json

    from .campaign import snapshot

    with open(path, "w", encoding="utf-8") as fh:
        json.dump(snapshot(), fh, indent=1, sort_keys=True)


@pytest.fixture(autouse=True, scope="session")
def _hardening_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private simulated platform key / EPC registry for the whole hardening session."""
    base = tmp_path_factory.mktemp("hardening-home")
    saved = {k: os.environ.get(k) for k in ("VEIL_HOME", "VEIL_SIM_EPC_DIR")}
    os.environ["VEIL_HOME"] = str(base / "home")
    os.environ["VEIL_SIM_EPC_DIR"] = str(base / "epc")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
