"""Encrypted export of the enclave's adapter (peft layout) and merged weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from veil.crypto.aead import X25519KeyPair
from veil.errors import DecryptionError
from veil.tune.export import generate_owner_keys, load_owner_private, load_owner_public, write_export_dir
from veil.tune.split import client_part

from . import parties


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


def _trained_enclave(family: str, cut: int):  # type: ignore[no-untyped-def]
    tee = parties.make_enclave(family, cut)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tee.adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return tee


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_export_loads_into_peft_and_matches_split_logits(tmp_path: Path, family: str) -> None:
    from peft import PeftModel

    cut = 1
    tee = _trained_enclave(family, cut)
    pub = generate_owner_keys(tmp_path / "owner")
    assert load_owner_public(tmp_path / "owner") == pub
    blob = tee.export(pub, merged=False)
    assert b"lora_A" not in blob  # encrypted
    meta = write_export_dir(blob, load_owner_private(tmp_path / "owner"), tmp_path / "out")
    assert meta["simulated"] is True and meta["kind"] == "adapter"
    base = parties.tiny_model(family)
    pm = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    ids = torch.randint(3, parties.VOCAB, (2, 7))
    am = torch.ones_like(ids)
    ref = pm(input_ids=ids, attention_mask=am).logits
    act = client_part(parties.tiny_model(family), cut)(ids, am)
    tee.part.eval()
    with torch.no_grad():
        got = tee.adapter.logits(act.hidden_states, act.attention_mask, act.position_ids)
    assert float((ref - got).abs().max()) <= 1e-5
    # the adapter actually changes the output (control)
    with torch.no_grad():
        plain = parties.tiny_model(family)(input_ids=ids, attention_mask=am).logits
    assert float((plain - got).abs().max()) > 1e-3


def test_merged_export_equals_peft_merge(tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    tee = _trained_enclave("llama", 2)
    owner = X25519KeyPair.generate()
    write_export_dir(tee.export(owner.public_bytes, merged=False), owner, tmp_path / "adapter")
    write_export_dir(tee.export(owner.public_bytes, merged=True), owner, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    ref = PeftModel.from_pretrained(parties.tiny_model("llama"), str(tmp_path / "adapter")).merge_and_unload()
    ref_sd = ref.state_dict()
    assert "model.layers.2.self_attn.q_proj.weight" in merged and "lm_head.weight" in merged
    assert not any(k.startswith("model.layers.0.") or k.startswith("model.layers.1.") for k in merged)
    for k, v in merged.items():
        assert torch.allclose(v, ref_sd[k], atol=1e-6), k


def test_export_is_only_readable_by_the_owner(tmp_path: Path) -> None:
    tee = _trained_enclave("llama", 1)
    owner, other = X25519KeyPair.generate(), X25519KeyPair.generate()
    blob = tee.export(owner.public_bytes)
    with pytest.raises(DecryptionError):
        write_export_dir(blob, other, tmp_path / "x")
    tampered = bytearray(blob)
    tampered[60] ^= 1
    with pytest.raises(DecryptionError):
        write_export_dir(bytes(tampered), owner, tmp_path / "y")
