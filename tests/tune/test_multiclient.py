"""Split mode with several clients: own attested sessions, exclusion, isolated accumulation."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from veil.comm import MemoryChannel
from veil.tee import Policy, Verifier, load_enclave, measure
from veil.tune.client import TuneClient, train_split
from veil.tune.data import collate
from veil.tune.federated import AttestedTuneClient, MultiClientTuneEnclave, serve_multi_host
from veil.tune.split import causal_lm_loss, client_part

from . import parties

CUT = 2
CLIENT_CODE = [b"veil-test-client-tee"]


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


def _multi(client_verifier: Verifier | None = None) -> MultiClientTuneEnclave:
    tee = parties.make_enclave("llama", CUT)
    return MultiClientTuneEnclave(
        tee.enclave,
        tee.part,
        tee.adapter,
        model_id=parties.model_id("llama"),
        lr=parties.LR,
        client_verifier=client_verifier,
    )


def _client_policy() -> Verifier:
    meas = measure(CLIENT_CODE, {"app": "client"})
    return Verifier(
        Policy(allowed_measurements={meas}, allow_simulated=True, trust_any_simulated_platform=True)
    )


def _threads(fns: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def wrap(name: str, fn: Any) -> None:
        try:
            out[name] = fn()
        except BaseException as e:
            out[name] = e

    ts = [threading.Thread(target=wrap, args=(n, f), daemon=True) for n, f in fns.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    return out


def _client(ch: Any, *, app: str | None, server_policy: Policy | None = None, seed: int = 0) -> Any:
    cp = client_part(parties.tiny_model("llama"), CUT)
    ver = Verifier(server_policy or parties.policy_for("llama", CUT))
    if app is None:
        c: TuneClient = TuneClient(ch, cp, ver)
    else:
        c = AttestedTuneClient(ch, cp, ver, load_enclave("simulated", code=CLIENT_CODE, config={"app": app}))
    info = c.connect()
    hist = train_split(
        c.train_micro,
        parties.tiny_examples(seed=seed),
        pad_id=0,
        batch_size=3,
        epochs=2,
        max_steps=3,
        start_step=info.step,
    )
    c.finish()
    return hist.losses


def test_three_clients_one_fails_attestation_others_continue() -> None:
    multi = _multi(_client_policy())
    pairs = {c: MemoryChannel.pair(timeout=60) for c in ("a", "b", "evil", "plain")}
    fns: dict[str, Any] = {
        "server": lambda: serve_multi_host({c: p[0] for c, p in pairs.items()}, multi, timeout=60),
        "a": lambda: _client(pairs["a"][1], app="client", seed=1),
        "b": lambda: _client(pairs["b"][1], app="client", seed=2),
        "evil": lambda: _client(pairs["evil"][1], app="not-the-client"),  # wrong measurement
        "plain": lambda: _client(pairs["plain"][1], app=None),  # no TEE evidence at all
    }
    res = _threads(fns)
    out = res["server"]
    assert out["a"].ok and out["b"].ok
    assert out["a"].steps == out["b"].steps == 3
    assert multi.total_steps == 6
    assert "measurement" in str(out["evil"].excluded)
    assert "requires client attestation" in str(out["plain"].excluded)
    assert len(res["a"]) == len(res["b"]) == 3
    assert isinstance(res["evil"], Exception) and isinstance(res["plain"], Exception)


def test_client_refusing_the_enclave_is_dropped_others_continue() -> None:
    multi = _multi()
    pairs = {c: MemoryChannel.pair(timeout=60) for c in ("a", "refuser")}
    wrong = Policy(allowed_measurements={"00" * 32}, allow_simulated=True, trust_any_simulated_platform=True)
    res = _threads(
        {
            "server": lambda: serve_multi_host({c: p[0] for c, p in pairs.items()}, multi, timeout=60),
            "a": lambda: _client(pairs["a"][1], app=None),
            "refuser": lambda: _client(pairs["refuser"][1], app=None, server_policy=wrong),
        }
    )
    assert res["server"]["a"].ok and res["server"]["a"].steps == 3
    assert res["server"]["refuser"].excluded is not None
    assert multi.total_steps == 3


def test_interleaved_gradient_accumulation_is_kept_per_client() -> None:
    """A's micro-batch 0, then B's whole step (2 micro-batches), then A's micro-batch 1: B's
    step uses only B's gradients and A's step only A's (no cross-client gradient mixing)."""
    multi = _multi()
    exs = parties.tiny_examples(n=12)
    batches = {
        "a": [collate(exs[0:3], 0), collate(exs[3:6], 0)],
        "b": [collate(exs[6:9], 0), collate(exs[9:12], 0)],
    }
    pairs = {c: MemoryChannel.pair(timeout=60) for c in ("a", "b")}
    a_half, b_done = threading.Event(), threading.Event()

    def client(cid: str) -> float:
        c = TuneClient(
            pairs[cid][1],
            client_part(parties.tiny_model("llama"), CUT),
            Verifier(parties.policy_for("llama", CUT)),
        )
        c.connect()
        if cid == "a":
            c.train_micro(batches["a"][0], 0, 0, 2)
            a_half.set()
            assert b_done.wait(60)
            c.train_micro(batches["a"][1], 0, 1, 2)
        else:
            assert a_half.wait(60)
            c.train_micro(batches["b"][0], 0, 0, 2)
            c.train_micro(batches["b"][1], 0, 1, 2)
            b_done.set()
        return float(c.finish(checkpoint=False))

    res = _threads(
        {
            "server": lambda: serve_multi_host({c: p[0] for c, p in pairs.items()}, multi, timeout=60),
            "a": lambda: client("a"),
            "b": lambda: client("b"),
        }
    )
    assert res["a"] == 1.0 and res["b"] == 1.0, res
    # reference: A's micro-batch 0 gradient (at the initial weights) is kept aside, B's step uses
    # only B's gradients, then A's step uses A's two micro-batch gradients
    ref = parties.make_enclave("llama", CUT)
    cp = client_part(parties.tiny_model("llama"), CUT)
    params = ref.adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=parties.LR, weight_decay=0.0)
    ref.part.train()

    def backward(b: Any) -> None:
        with torch.no_grad():
            act = cp(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask))
        logits = ref.adapter.logits(act.hidden_states, act.attention_mask, act.position_ids)
        (causal_lm_loss(logits, torch.from_numpy(b.labels)) / 2).backward()

    backward(batches["a"][0])
    a_grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    opt.zero_grad()
    backward(batches["b"][0])
    backward(batches["b"][1])
    opt.step()
    opt.zero_grad()
    backward(batches["a"][1])
    for p, g in zip(params, a_grads, strict=True):
        p.grad += g  # type: ignore[operator]
    opt.step()
    got = multi.adapter.adapter_state()
    want = ref.adapter.adapter_state()
    assert max(float((got[k] - want[k]).abs().max()) for k in got) <= 1e-6
    moved = parties.make_enclave("llama", CUT).adapter.adapter_state()
    assert max(float((got[k] - moved[k]).abs().max()) for k in got) > 1e-4
