"""Adapters-only TEE mode: one-time-pad offload of the frozen dense layers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from veil.tee import Verifier
from veil.testing import run_parties
from veil.tune.adapters import make_adapter
from veil.tune.client import TuneClient, train_split
from veil.tune.data import collate
from veil.tune.enclave_server import serve_host
from veil.tune.otp import UntrustedLinearHost, offload_frozen_linears
from veil.tune.split import causal_lm_loss, client_part, server_part

from . import parties


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


def _batch(seed: int = 0) -> Any:
    return collate(parties.tiny_examples(n=4, seed=seed), 0)


def _server_pair(family: str, cut: int, adapter: str = "lora") -> tuple[Any, Any, Any]:
    """The model and two identically initialised adapters on two copies of its server part."""
    model = parties.tiny_model(family)
    opts: dict[str, Any] = dict(parties.LORA) if adapter == "lora" else {"num_virtual_tokens": 3}
    ads = []
    for _ in range(2):
        part = server_part(model, cut)
        torch.manual_seed(1)
        ads.append(make_adapter(part, adapter, **opts))
    return model, ads[0], ads[1]


@pytest.mark.parametrize(("family", "adapter"), [("llama", "lora"), ("gpt2", "lora"), ("llama", "ptuning")])
def test_masked_equals_unmasked_forward_and_adapter_gradients(family: str, adapter: str) -> None:
    model, plain, masked = _server_pair(family, 1, adapter)
    host = UntrustedLinearHost(record=True)
    eng = offload_frozen_linears(masked.part, host)
    assert len(eng.layers) > 0
    b = _batch()
    act = client_part(model, 1)(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask))
    labels = torch.from_numpy(b.labels)
    outs = []
    for ad in (plain, masked):
        logits = ad.logits(act.hidden_states, act.attention_mask, act.position_ids)
        causal_lm_loss(logits, labels).backward()
        outs.append((logits.detach(), [p.grad.clone() for p in ad.trainable_parameters()]))
    (l0, g0), (l1, g1) = outs
    assert float((l0 - l1).abs().max()) <= 1e-4
    assert len(g0) == len(g1) > 0
    for a, c in zip(g0, g1, strict=True):
        assert float((a - c).abs().max()) <= 1e-4
    assert any(float(g.abs().max()) > 0 for g in g1)
    # the host did the dense work, forward and backward, and saw only masked tensors
    dirs = {s.direction for s in host.seen}
    assert dirs == {"forward", "backward"}
    assert eng.stats.calls == len(host.seen)
    for s in host.seen:
        assert float(s.tensor.abs().max()) > 2**20  # pads of magnitude 2^24, inputs are O(1)


def test_client_part_offload_equals_plain() -> None:
    model = parties.tiny_model("llama")
    plain = client_part(model, 2)
    masked = client_part(model, 2)
    host = UntrustedLinearHost(record=True)
    offload_frozen_linears(masked, host)
    b = _batch(3)
    with torch.no_grad():
        a0 = plain(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask))
        a1 = masked(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask))
    assert float((a0.hidden_states - a1.hidden_states).abs().max()) <= 1e-4
    assert host.seen and all(s.direction == "forward" for s in host.seen)


def _host_view(hidden: torch.Tensor, pad_bits: int) -> np.ndarray:
    """What the untrusted host receives for the first masked layer when the TEE holds ``hidden``."""
    _, _, ad = _server_pair("llama", 1)
    host = UntrustedLinearHost(record=True)
    offload_frozen_linears(ad.part, host, pad_bits=pad_bits)
    mask = torch.ones(hidden.shape[:2], dtype=torch.long)
    pos = torch.arange(hidden.shape[1]).unsqueeze(0).expand(hidden.shape[0], -1)
    with torch.no_grad():
        ad.logits(hidden, mask, pos)
    first = host.seen[0]
    return first.tensor.numpy().ravel()


def test_untrusted_view_has_the_same_distribution_for_different_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(32, 16, 32, generator=g)
    x2 = torch.randn(32, 16, 32, generator=g) * 30 + 50  # very different data (also after the RMSNorm)
    v1, v2 = _host_view(x1, 24), _host_view(x2, 24)
    assert v1.size == v2.size == 32 * 16 * 32
    p = ks_2samp(v1, v2).pvalue
    assert p > 1e-4, p  # null holds: fails by chance with prob. 1e-4
    # both look like the pad alone: uniform on [-2^24, 2^24)
    a = 2.0**24
    assert ks_2samp(v1 / a, np.random.default_rng(1).uniform(-1, 1, v1.size)).pvalue > 1e-4
    # the test has power: with a tiny pad the two views are told apart at once
    w1, w2 = _host_view(x1, 4), _host_view(x2, 4)
    assert ks_2samp(w1, w2).pvalue < 1e-4  # same threshold as the null test above; observed p ~ 1e-6


def test_pads_are_fresh_per_call() -> None:
    _, _, ad = _server_pair("llama", 1)
    host = UntrustedLinearHost(record=True)
    offload_frozen_linears(ad.part, host)
    x = torch.zeros(2, 5, 32)
    mask = torch.ones(2, 5, dtype=torch.long)
    pos = torch.arange(5).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ad.logits(x, mask, pos)
        n = len(host.seen)
        ad.logits(x, mask, pos)
    a, b = host.seen[0].tensor, host.seen[n].tensor
    assert host.seen[0].layer == host.seen[n].layer
    assert not torch.equal(a, b)  # same input, fresh pad


def test_precomputed_pads_are_used_online() -> None:
    _, _, ad = _server_pair("llama", 1)
    eng = offload_frozen_linears(ad.part, UntrustedLinearHost())
    b = _batch()
    rows = b.input_ids.size
    eng.precompute(rows)
    h = torch.randn(*b.input_ids.shape, 32)
    logits = ad.logits(
        h, torch.from_numpy(b.attention_mask), torch.arange(b.input_ids.shape[1]).expand(4, -1)
    )
    causal_lm_loss(logits, torch.from_numpy(b.labels)).backward()
    assert eng.stats.pad_rows_online == 0
    assert eng.stats.precompute_s > 0
    ad.logits(h, torch.from_numpy(b.attention_mask), torch.arange(b.input_ids.shape[1]).expand(4, -1))
    assert eng.stats.pad_rows_online > 0  # pool exhausted: pads made online, never reused


def _otp_server(ch: Any) -> dict[str, Any]:
    tee = parties.make_enclave("llama", 2)
    host = UntrustedLinearHost(record=True)
    offload_frozen_linears(tee.part, host)
    step = serve_host(ch, tee)
    return {"step": step, "seen": len(host.seen)}


def _otp_client(ch: Any, offload: bool) -> list[float]:
    cp = client_part(parties.tiny_model("llama"), 2)
    if offload:
        offload_frozen_linears(cp, UntrustedLinearHost())
    c = TuneClient(ch, cp, Verifier(parties.policy_for("llama", 2)))
    c.connect()
    hist = train_split(c.train_micro, parties.tiny_examples(), pad_id=0, batch_size=3, epochs=2, max_steps=3)
    c.finish()
    return hist.losses


def test_adapters_only_mode_over_the_protocol_matches_split_training() -> None:
    srv, masked_losses = run_parties(
        _otp_server, lambda ch: _otp_client(ch, True), transport="memory", timeout=120
    )
    assert srv["step"] == 3 and srv["seen"] > 0
    plain = run_parties(
        lambda ch: serve_host(ch, parties.make_enclave("llama", 2)),
        lambda ch: _otp_client(ch, False),
        transport="memory",
        timeout=120,
    )[1]
    np.testing.assert_allclose(masked_losses, plain, atol=1e-4, rtol=0)
