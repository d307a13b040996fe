"""SPF (sparsified parameter fine-tuning) + LoRA on the server part."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from veil.errors import ConfigError
from veil.tune.adapters import SPFLoRAAdapter, apply_sparse_deltas
from veil.tune.split import client_part, head_loss, server_part

from . import parties


def _setup(ratio: float = 0.25, score: str = "l1", cut: int = 1) -> tuple[Any, Any, SPFLoRAAdapter, Any]:
    m = parties.tiny_model("llama")
    part = server_part(m, cut)
    torch.manual_seed(0)
    ad = SPFLoRAAdapter(part, r=4, alpha=8, ratio=ratio, score=score)
    return m, part, ad, client_part(m, cut)


def _batch(cp: Any) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, parties.VOCAB, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return cp(ids), labels


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_spf_selects_exactly_the_configured_fraction(ratio: float) -> None:
    _, part, ad, _ = _setup(ratio)
    n_ffn = len(ad.units["ffn"])
    n_head = len(ad.units["head"])
    assert n_ffn == 3 * 64 and n_head == 3 * 4  # 3 server layers x (64 neurons, 4 heads)
    assert len(ad.selected["ffn"]) == round(ratio * n_ffn)
    assert len(ad.selected["head"]) == round(ratio * n_head)
    # the highest-L1 units are the ones selected
    scores = [float(part.get_submodule(f"layers.{i}.mlp.gate_proj").weight[j].abs().mean()) for i, j in
              [(i, j) for i in (1, 2, 3) for j in range(64)]]
    assert len(scores) == n_ffn
    n_params = sum(p.numel() for p in ad.trainable_parameters() if p.dim() == 2) - sum(
        p.numel() for p in ad.lora.trainable_parameters())
    h, inter, hd = 32, 64, 8
    assert n_params == len(ad.selected["ffn"]) * 3 * h + len(ad.selected["head"]) * 2 * hd * h


def test_only_selected_weights_change_and_training_helps() -> None:
    _, part, ad, cp = _setup(0.25)
    act, labels = _batch(cp)
    names = sorted(ad._deltas)
    base_before = {n: part.get_submodule(n).weight.detach().clone() for n in names}
    opt = torch.optim.AdamW(ad.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = head_loss(ad.final_hidden(act.hidden_states, act.attention_mask, act.position_ids),
                         part.lm_head, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for n in names:
        lin: Any = part.get_submodule(n)
        lin = lin.get_base_layer() if hasattr(lin, "get_base_layer") else lin
        assert torch.equal(lin.weight, base_before[n])  # base weight itself untouched
        eff = lin.weight.index_add(lin.spf_dim, lin.spf_index, lin.spf_delta).detach()
        changed = (eff != base_before[n]).any(dim=1 - lin.spf_dim).nonzero().flatten().tolist()
        assert changed and set(changed) <= set(lin.spf_index.tolist())
    # a module with no selected unit has no delta at all
    all_ffn = {f"layers.{i}.mlp.{p}" for i in (1, 2, 3) for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(names) & all_ffn


def test_sparse_delta_export_import_round_trip() -> None:
    m, part, ad, cp = _setup(0.25, cut=2)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in ad.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tensors, cfg = ad.export_adapter()
    dims = cfg["veil_spf"]["dims"]
    assert any(k.startswith("spf::") for k in tensors) and all(isinstance(v, int) for v in dims.values())
    # 1) merged export == base + LoRA merge + sparse deltas applied by the owner
    merged = ad.export_merged()
    from peft import LoraConfig, get_peft_model

    ref = get_peft_model(parties.tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 layers_to_transform=[2, 3]))
    sd = {k: v for k, v in tensors.items() if not k.startswith("spf::")}
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(ref, {k.replace("base_model.model.", "", 0): v for k, v in sd.items()})
    full = apply_sparse_deltas(ref.merge_and_unload().state_dict(), tensors, dims)
    for k, v in merged.items():
        assert torch.allclose(v, full[k], atol=1e-6), k
    # 2) the owner's model with the imported deltas reproduces the enclave's logits
    owner = parties.tiny_model("llama")
    owner.load_state_dict(full)
    ids = torch.randint(3, parties.VOCAB, (2, 8))
    act = cp(ids)
    with torch.no_grad():
        want = ad.logits(act.hidden_states, act.attention_mask, act.position_ids)
        got = owner(input_ids=ids).logits
    assert float((want - got).abs().max()) <= 1e-5
    # 3) adapter_state -> load_adapter_state round-trips into a fresh adapter
    fresh = SPFLoRAAdapter(server_part(m, 2), r=4, alpha=8, ratio=0.25)
    fresh.load_adapter_state(ad.adapter_state())
    with torch.no_grad():
        again = fresh.logits(act.hidden_states, act.attention_mask, act.position_ids)
    assert float((want - again).abs().max()) == 0.0


def test_gradient_scored_selection_needs_calibration() -> None:
    _, part, ad, cp = _setup(0.25, score="grad")
    with pytest.raises(ConfigError, match="calibrate"):
        ad.trainable_parameters()
    act, labels = _batch(cp)
    ad.calibrate(act.hidden_states, act.attention_mask, act.position_ids, labels)
    assert len(ad.selected["ffn"]) == round(0.25 * len(ad.units["ffn"]))
    _, _, l1, _ = _setup(0.25, score="l1")
    assert ad.selected != l1.selected  # a different rule gives a different selection
    with pytest.raises(ConfigError):
        SPFLoRAAdapter(server_part(parties.tiny_model("llama"), 1), ratio=0.0)


def test_spf_over_the_protocol_with_gradient_calibration_in_the_enclave(run_parties: Any) -> None:
    from veil.tune.enclave_server import build_tune_enclave, serve_host

    opts = {"r": 4, "alpha": 8, "ratio": 0.2, "score": "grad"}
    holder: dict[str, Any] = {}

    def server(ch: Any) -> int:
        with parties._RNG_LOCK:
            tee = build_tune_enclave(parties.tiny_model("llama"), cut_layer=1, adapter="spf", model_id="tiny-llama",
                                     lr=parties.LR, adapter_options=opts)
        holder["tee"] = tee
        return serve_host(ch, tee)

    def client(ch: Any) -> list[float]:
        from veil.tee import Policy, Verifier
        from veil.tune.client import TuneClient, train_split
        from veil.tune.enclave_server import expected_measurement

        meas = expected_measurement(model_id="tiny-llama", cut_layer=1, adapter="spf", lr=parties.LR,
                                    adapter_options=opts)
        c = TuneClient(ch, client_part(parties.tiny_model("llama"), 1),
                       Verifier(Policy(allowed_measurements={meas}, allow_simulated=True,
                                       trust_any_simulated_platform=True)))
        c.connect()
        h = train_split(c.train_micro, parties.tiny_examples(), pad_id=0, batch_size=12, max_steps=4, epochs=4)
        c.finish(checkpoint=False)
        return h.losses

    step, losses = run_parties(server, client, transport="memory", timeout=120)
    tee = holder["tee"]
    assert step == 4 and losses[-1] < losses[0]
    assert len(tee.adapter.selected["ffn"]) == round(0.2 * len(tee.adapter.units["ffn"]))
    assert any(float(p.abs().max()) > 0 for n, p in tee.adapter._deltas.items())
    # the sealed state carries the sparse selection and restores into a fresh enclave
    blob = tee.sealed_state()
    with parties._RNG_LOCK:
        fresh = build_tune_enclave(parties.tiny_model("llama"), cut_layer=1, adapter="spf", model_id="tiny-llama",
                                   lr=parties.LR, adapter_options=opts)
    assert fresh.restore(blob) == 4
    for k, v in tee.adapter.adapter_state().items():
        assert torch.equal(v, fresh.adapter.adapter_state()[k]), k
