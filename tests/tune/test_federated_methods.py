"""The methods-table runner end to end on a tiny model (every method trains and evaluates)."""

from __future__ import annotations

import numpy as np
import pytest

from veil.tune.data import EncodedExample
from veil.tune.methods import METHODS, MethodSettings, run_methods

from . import parties


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


LABEL_TOKENS = [[10], [11], [12], [13], [14]]


def _examples(n: int, seed: int) -> list[EncodedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = i % 5
        p = [*rng.integers(20, parties.VOCAB, size=6).tolist(), 15 + c]  # the class leaks into the prompt
        out.append(
            EncodedExample(
                input_ids=p + LABEL_TOKENS[c],
                labels=[-100] * len(p) + LABEL_TOKENS[c],
                prompt_len=len(p),
                label=c,
            )
        )
    return out


def test_every_method_runs_and_reports() -> None:
    lm = parties.tiny_model("llama")
    s = MethodSettings(
        cut=1, steps=4, batch_size=3, lr=1e-2, lora_r=4, lora_alpha=8, spf_ratio=0.1, fed_rounds=2
    )
    rows = run_methods(lm, _examples(30, 0), _examples(10, 1), LABEL_TOKENS, 0, s)
    assert list(rows) == list(METHODS)
    for name, r in rows.items():
        assert 0.0 <= r["accuracy"] <= 1.0, name
        assert r["median_step_s"] > 0, name
        assert len(r["losses"]) == (2 if name.startswith("federated") else 4), name
        assert r["tee"] in ("none", "simulated"), name
    # the adapters-only mode computes what split LoRA computes (same seed, same steps)
    np.testing.assert_allclose(rows["adapters-only-otp"]["losses"], rows["split-lora"]["losses"], atol=1e-4)
    assert rows["adapters-only-otp"]["offload"]["server"]["calls"] > 0
    assert rows["adapters-only-otp"]["offline_pad_s_per_step"] > 0
    assert rows["federated-3"]["topics"] == [[0, 3], [1, 4], [2]]
    assert all(c["excluded"] is None for c in rows["federated-3"]["clients"].values())
