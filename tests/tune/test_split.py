"""Model slicing: the split model reproduces the unsplit logits and LoRA gradients."""

from __future__ import annotations

import pytest
import torch

from veil.errors import ConfigError, InputError
from veil.tune.adapters import LoRAAdapter, PrefixAdapter
from veil.tune.split import causal_lm_loss, client_part, server_part, set_mode


def _models():  # type: ignore[no-untyped-def]
    from transformers import (
        GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
        Qwen2Config, Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return {
        "llama": LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **common)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=2, **common)),
        "mistral": MistralForCausalLM(MistralConfig(num_hidden_layers=3, sliding_window=4, **common)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                           eos_token_id=2)),
    }


MODELS = _models()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_split_logits_equal_unsplit_for_every_cut(family: str) -> None:
    m = MODELS[family].eval()
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (3, 10))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    am[2, 3:] = 0  # right padding
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am).logits
        for k in range(m.config.num_hidden_layers + 1):
            act = client_part(m, k)(ids, am)
            out = server_part(m, k).eval()(act.hidden_states, act.attention_mask, act.position_ids)
            assert float((out - ref).abs().max()) <= 1e-5, (family, k)
    # control: a different cut's activations do not give the same logits
    with torch.no_grad():
        wrong = server_part(m, 2).eval()(client_part(m, 1)(ids, am).hidden_states, am, act.position_ids)
    assert float((wrong - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_gradients_equal_unsplit_peft(family: str) -> None:
    from peft import LoraConfig, get_peft_model

    import copy

    m = MODELS[family]
    k, n = 1, m.config.num_hidden_layers
    targets = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    ref = get_peft_model(copy.deepcopy(m), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       layers_to_transform=list(range(k, n)),
                                                       fan_in_fan_out=family == "gpt2"))
    part = server_part(m, k)
    ad = LoRAAdapter(part, r=4, alpha=8, target_modules=targets)
    g = torch.Generator().manual_seed(5)
    ref_params = dict(ref.named_parameters())
    state = {}
    for name in ad.adapter_state():
        t = torch.randn(ad.adapter_state()[name].shape, generator=g) * 0.1
        state[name] = t
        with torch.no_grad():
            ref_params["base_model.model." + part.full_model_key(name)].copy_(t)
    ad.load_adapter_state(state)
    ids = torch.randint(3, 64, (2, 9))
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    labels = ids.clone()
    labels[am == 0] = -100
    ref(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
    act = client_part(m, k)(ids, am)
    causal_lm_loss(ad.logits(act.hidden_states, act.attention_mask, act.position_ids), labels).backward()
    named = dict(part.named_parameters())
    for name in state:
        g_split = named[name].grad
        g_ref = ref_params["base_model.model." + part.full_model_key(name)].grad
        assert g_split is not None and g_ref is not None
        assert float(g_ref.abs().max()) > 0
        assert float((g_split - g_ref).abs().max()) <= 1e-5, name


def test_prefix_adapter_changes_output_and_gets_gradients() -> None:
    m = MODELS["llama"]
    part = server_part(m, 2)
    ad = PrefixAdapter(part, num_virtual_tokens=3)
    ids = torch.randint(3, 64, (2, 6))
    act = client_part(m, 2)(ids)
    with torch.no_grad():
        plain = part(act.hidden_states, act.attention_mask, act.position_ids)
    out = ad.logits(act.hidden_states, act.attention_mask, act.position_ids)
    assert out.shape == plain.shape and float((out - plain).abs().max()) > 1e-5
    causal_lm_loss(out, ids).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in ad.trainable_parameters())
    assert all(p.grad is None for p in part.parameters())


def test_bad_cut_and_too_long_sequence_are_clear_errors() -> None:
    m = MODELS["llama"]
    with pytest.raises(ConfigError, match="cut layer"):
        client_part(m, 5)
    with pytest.raises(ConfigError, match="cut layer"):
        server_part(m, -1)
    with pytest.raises(InputError, match="longer than the model context"):
        client_part(m, 1)(torch.randint(3, 64, (1, 65)))
    with pytest.raises(ConfigError, match="cannot split"):
        client_part(torch.nn.Linear(2, 2), 1)


def test_set_mode_switches_the_whole_part_and_skips_the_walk_when_unchanged() -> None:
    model = MODELS["llama"]
    model.eval()
    part = server_part(model, 2)
    assert part.training and not part.layers["2"].training  # fresh root flag disagrees with its copies
    set_mode(part, True)
    assert all(m.training for m in part.modules())
    layer = part.layers["2"]
    layer.eval()  # a marker: an unchanged root mode must not walk the submodules again
    set_mode(part, True)
    assert not layer.training and part.training
    set_mode(part, False)
    assert not any(m.training for m in part.modules())
    set_mode(part, True)
    assert all(m.training for m in part.modules())
