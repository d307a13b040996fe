"""Federated mode: FedAvg in the server enclave over attested sessions with client TEEs."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from veil.comm import MemoryChannel
from veil.errors import InputError
from veil.tee import Policy, Verifier, load_enclave, measure
from veil.tune.adapters import make_adapter
from veil.tune.data import EncodedExample
from veil.tune.federated import (
    FedAvgEnclave,
    FederatedClientEnclave,
    fedavg,
    partition_by_topic,
    run_federated_client,
    serve_federated_host,
)
from veil.tune.split import client_part, server_part

from . import parties

SERVER_CODE, CLIENT_CODE = [b"veil-test-fedavg"], [b"veil-test-fed-client"]


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


def _verifier(code: list[bytes], app: str) -> Verifier:
    meas = measure(code, {"app": app})
    return Verifier(
        Policy(allowed_measurements={meas}, allow_simulated=True, trust_any_simulated_platform=True)
    )


def test_fedavg_is_the_example_weighted_mean() -> None:
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    counts = [10, 30, 5]
    avg = fedavg(states, counts)
    for k in ("a", "b"):
        want = sum(c * s[k].numpy().astype(np.float64) for s, c in zip(states, counts, strict=True)) / 45
        np.testing.assert_allclose(avg[k].numpy(), want, atol=1e-6, rtol=0)
    # not the unweighted mean
    assert float((avg["a"] - sum(s["a"] for s in states) / 3).abs().max()) > 1e-3
    with pytest.raises(InputError):
        fedavg(states, [1, 0, 2])
    with pytest.raises(InputError):
        fedavg([states[0], {"a": states[1]["a"]}], [1, 1])


def test_partition_by_topic_is_non_iid() -> None:
    exs = [EncodedExample(input_ids=[1, 2], labels=[-100, 2], prompt_len=1, label=i % 5) for i in range(50)]
    parts = partition_by_topic(exs, 3)
    topics = [{e.label for e in p} for p in parts]
    assert topics == [{0, 3}, {1, 4}, {2}]
    assert sum(len(p) for p in parts) == 50


def _client_enclave(app: str) -> FederatedClientEnclave:
    model = parties.tiny_model("llama")
    with parties._RNG_LOCK:
        torch.manual_seed(0)
        ad = make_adapter(server_part(model, 0), "lora", **parties.LORA)
    enc = load_enclave("simulated", code=CLIENT_CODE, config={"app": app})
    return FederatedClientEnclave(enc, client_part(model, 0), ad, lr=parties.LR)


def test_federated_rounds_average_honest_clients_and_exclude_a_bad_one() -> None:
    torch.manual_seed(0)
    init = _client_enclave("fed-client").adapter.adapter_state()
    fed = FedAvgEnclave(
        load_enclave("simulated", code=SERVER_CODE, config={"app": "fedavg"}),
        init,
        client_verifier=_verifier(CLIENT_CODE, "fed-client"),
    )
    seen_updates: list[tuple[int, str, dict[str, torch.Tensor], int]] = []
    orig = fed.accept_update

    def record(cid: str, frame: bytes) -> None:
        orig(cid, frame)
        st, n, _ = fed._updates[cid]
        seen_updates.append((fed.round, cid, st, n))

    fed.accept_update = record  # type: ignore[method-assign]
    data = {
        "c0": parties.tiny_examples(n=6, seed=1),
        "c1": parties.tiny_examples(n=12, seed=2),
        "evil": parties.tiny_examples(n=6, seed=3),
    }
    apps = {"c0": "fed-client", "c1": "fed-client", "evil": "tampered-client"}
    pairs = {c: MemoryChannel.pair(timeout=60) for c in data}
    out: dict[str, Any] = {}
    server_verifier = _verifier(SERVER_CODE, "fedavg")

    def client(cid: str) -> None:
        try:
            out[cid] = run_federated_client(
                pairs[cid][1],
                _client_enclave(apps[cid]),
                server_verifier,
                data[cid],
                local_steps=2,
                batch_size=3,
                pad_id=0,
                timeout=60,
            )
        except Exception as e:
            out[cid] = e

    def server() -> None:
        out["server"] = serve_federated_host({c: p[0] for c, p in pairs.items()}, fed, rounds=2, timeout=60)

    ts = [threading.Thread(target=f, daemon=True) for f in (server, *(lambda c=c: client(c) for c in data))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    outcomes = out["server"]
    assert outcomes["c0"].ok and outcomes["c1"].ok and outcomes["c0"].steps == 2
    assert "measurement" in str(outcomes["evil"].excluded)
    assert isinstance(out["evil"], Exception)
    assert [h["clients"] for h in fed.history] == [["c0", "c1"], ["c0", "c1"]]
    assert fed.history[0]["examples"] == [6, 12]
    # the final global adapter is the example-weighted mean of the last round's updates ...
    last = {cid: (st, n) for r, cid, st, n in seen_updates if r == 1}
    want = fedavg([last["c0"][0], last["c1"][0]], [6, 12])
    for k, v in fed.global_state.items():
        assert float((v - want[k]).abs().max()) <= 1e-6
        np.testing.assert_allclose(
            v.numpy(),
            (6 * last["c0"][0][k].double() + 12 * last["c1"][0][k].double()).numpy() / 18,
            atol=1e-6,
        )
    # ... which every honest client received (encrypted over its session) at the end
    for cid in ("c0", "c1"):
        res = out[cid]
        assert res.rounds == 2
        for k, v in fed.global_state.items():
            assert torch.equal(res.final_state[k], v)
    # training moved the adapter, and the two clients' updates differ (siloed data)
    assert max(float((fed.global_state[k] - init[k]).abs().max()) for k in init) > 1e-4
    assert max(float((last["c0"][0][k] - last["c1"][0][k]).abs().max()) for k in init) > 1e-5
