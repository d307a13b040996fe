"""Trainable-client mode: LoRA on the client layers, the enclave returns d loss / d activations."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from veil.comm import MemoryChannel
from veil.errors import ConfigError
from veil.tee import Policy, Verifier
from veil.tune.adapters import add_client_lora
from veil.tune.client import EnclaveRefused, TuneClient, train_split
from veil.tune.data import collate
from veil.tune.enclave_server import build_tune_enclave, expected_measurement, serve_host
from veil.tune.messages import TrainBatch
from veil.tune.split import client_part

from . import parties


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


def _policy(family: str, cut: int, client_grad: bool) -> Policy:
    meas = expected_measurement(
        model_id=parties.model_id(family),
        cut_layer=cut,
        adapter="lora",
        lr=parties.LR,
        adapter_options=parties.LORA,
        client_grad=client_grad,
    )
    return Policy(allowed_measurements={meas}, allow_simulated=True, trust_any_simulated_platform=True)


def _serve(tee: Any) -> tuple[Any, threading.Thread, dict[str, Any]]:
    srv, cli = MemoryChannel.pair(timeout=60)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["step"] = serve_host(srv, tee, idle_timeout=60)
        except Exception as e:  # reported by the test
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return cli, th, out


@pytest.mark.parametrize(("family", "cut", "accum"), [("llama", 2, 1), ("llama", 1, 2), ("gpt2", 2, 2)])
def test_trainable_client_equals_unsplit_peft_on_all_layers(family: str, cut: int, accum: int) -> None:
    steps = 4
    tee = build_tune_enclave(
        parties.tiny_model(family),
        cut_layer=cut,
        model_id=parties.model_id(family),
        lr=parties.LR,
        adapter_options=dict(parties.LORA),
        client_grad=True,
    )
    cp = client_part(parties.tiny_model(family), cut)
    torch.manual_seed(7)
    cparams = add_client_lora(cp, r=parties.LORA["r"], alpha=parties.LORA["alpha"])
    with torch.no_grad():  # LoRA B starts at 0: give the client adapter a non-trivial start
        for p in cparams:
            p.add_(0.05 * torch.randn_like(p))
    prefix = "model." if family == "llama" else "transformer."

    def client_key(k: str) -> str:
        return "base_model.model." + prefix + ("h." + k[len("layers.") :] if family == "gpt2" else k)

    init = {client_key(n): p.detach().clone() for n, p in cp.named_parameters() if "lora_" in n}
    init.update(
        {"base_model.model." + tee.part.full_model_key(k): v for k, v in tee.adapter.adapter_state().items()}
    )
    copt = torch.optim.AdamW(cparams, lr=parties.LR, weight_decay=0.0)
    ch, th, out = _serve(tee)
    c = TuneClient(ch, cp, Verifier(_policy(family, cut, True)), client_optimizer=copt)
    info = c.connect()
    assert info.client_grad is True
    hist = train_split(
        c.train_micro,
        parties.tiny_examples(),
        pad_id=0,
        batch_size=3,
        grad_accum=accum,
        epochs=5,
        seed=0,
        max_steps=steps,
    )
    c.finish(checkpoint=False)
    ch.close()
    th.join(30)
    assert "error" not in out and out["step"] == steps
    ref_losses, ref_weights = parties.reference_training(family, 0, steps=steps, grad_accum=accum, init=init)
    np.testing.assert_allclose(hist.losses, ref_losses, atol=1e-5, rtol=0)
    got = {client_key(n): p.detach() for n, p in cp.named_parameters() if "lora_" in n}
    got.update(
        {"base_model.model." + tee.part.full_model_key(k): v for k, v in tee.adapter.adapter_state().items()}
    )
    assert set(got) == set(ref_weights) and any(k.startswith(client_key("layers.0")) for k in got)
    for k, v in got.items():
        assert float((v - ref_weights[k]).abs().max()) <= 1e-5, k
    # the client layers really trained (the test can fail)
    assert any(
        float((got[k] - init[k]).abs().max()) > 1e-4 for k in init if k.startswith(client_key("layers.0."))
    )


def test_frozen_enclave_returns_no_gradient_and_refuses_the_trainable_mode() -> None:
    family, cut = "llama", 2
    tee = parties.make_enclave(family, cut)  # client_grad off (the default)
    ch, th, _ = _serve(tee)
    c = TuneClient(
        ch, client_part(parties.tiny_model(family), cut), Verifier(parties.policy_for(family, cut))
    )
    assert c.connect().client_grad is False
    batch = collate(parties.tiny_examples()[:3], 0)
    res = c.train_micro(batch, 0)
    assert res.grad_hidden is None and res.applied  # frozen mode: nothing flows back but the loss
    h, m, p = c._arrays(c.activations(batch))
    with pytest.raises(EnclaveRefused, match="returns no gradients"):
        c._call(
            TrainBatch(
                step=1,
                micro=0,
                n_micro=1,
                hidden=h,
                attention_mask=m,
                position_ids=p,
                labels=batch.labels,
                want_grad=True,
            ),
            object,
        )
    c.finish(checkpoint=False)
    ch.close()
    th.join(30)
    # a trainable client refuses an enclave that would not send gradients
    tee2 = parties.make_enclave(family, cut)
    ch2, th2, _ = _serve(tee2)
    cp = client_part(parties.tiny_model(family), cut)
    opt = torch.optim.AdamW(add_client_lora(cp, r=2, alpha=4), lr=1e-3)
    with pytest.raises(ConfigError, match="returns no gradients"):
        TuneClient(ch2, cp, Verifier(parties.policy_for(family, cut)), client_optimizer=opt).connect()
    ch2.close()
    th2.join(30)
    with pytest.raises(ConfigError, match="trainable parameters"):
        TuneClient(
            ch2,
            client_part(parties.tiny_model(family), cut),
            Verifier(parties.policy_for(family, cut)),
            client_optimizer=opt,
        )


def test_client_grad_is_measured() -> None:
    kw: dict[str, Any] = {"model_id": "m", "cut_layer": 2, "adapter": "lora", "lr": 1e-3}
    assert expected_measurement(**kw) != expected_measurement(**kw, client_grad=True)
    assert expected_measurement(**kw) == expected_measurement(**kw, client_grad=False)
