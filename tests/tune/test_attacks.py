"""Embedding inversion: high recovery on plaintext shallow activations, chance on veil's views."""

from __future__ import annotations

from typing import Any

import torch

from veil.tune.attacks import LinearInversion, nearest_token, recovery_rate, run_inversion_suite

from . import parties


def _ids(n: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, parties.VOCAB, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 3 :] = 0  # some padding
    return ids, mask


def test_nearest_token_and_linear_inversion_basics() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 16, generator=g)
    tok = torch.randint(0, 50, (200,), generator=g)
    assert recovery_rate(nearest_token(emb[tok] * 3.0, emb), tok) == 1.0
    mix = torch.randn(16, 16, generator=g)
    inv = LinearInversion(emb, ridge=1e-6).fit(emb[tok] @ mix, tok)
    assert recovery_rate(inv.predict(emb[tok[:50]] @ mix), tok[:50]) == 1.0


def _tied_tiny_llama() -> Any:
    """Like SmolLM2, the LM head shares the input embedding (so logit-lens decoding applies)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=parties.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def test_recovery_is_high_on_plaintext_and_chance_on_veil_views() -> None:
    model = _tied_tiny_llama()
    res = run_inversion_suite(model, _ids(24, 16, 1), _ids(8, 16, 2), cuts=(1, 2))
    by = {(r.target, r.cut_layer, r.attack): r for r in res}
    assert len(res) == 2 * 3 * 3
    chance = res[0].chance_majority
    assert 0 < res[0].chance_uniform < chance < 0.1
    for attack in ("nearest-token", "lm-head", "learned-linear"):
        assert by[("plaintext", 1, attack)].recovery >= 0.8, (attack, by[("plaintext", 1, attack)])
    for k in (1, 2):
        for target in ("veil-ciphertext", "veil-otp"):
            for attack in ("nearest-token", "lm-head", "learned-linear"):
                assert by[(target, k, attack)].recovery <= chance + 0.05, by[(target, k, attack)]
