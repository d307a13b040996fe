"""Federated mode with the server enclave and a client TEE as two processes over gRPC/mTLS."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from veil.tee import Policy, Verifier, load_enclave, measure

SERVER = ([b"veil-test-fedavg"], {"app": "fedavg"})
CLIENT = ([b"veil-test-fed-client"], {"app": "fed-client"})


def _verifier(code: list[bytes], cfg: dict[str, Any]) -> Verifier:
    return Verifier(
        Policy(
            allowed_measurements={measure(code, cfg)}, allow_simulated=True, trust_any_simulated_platform=True
        )
    )


def _client_tee(cut: int) -> Any:
    from veil.tune.adapters import make_adapter
    from veil.tune.federated import FederatedClientEnclave
    from veil.tune.split import client_part, server_part

    from . import parties

    model = parties.tiny_model("llama")
    torch.manual_seed(0)
    ad = make_adapter(server_part(model, cut), "lora", **parties.LORA)
    return FederatedClientEnclave(
        load_enclave("simulated", code=CLIENT[0], config=CLIENT[1]),
        client_part(model, cut),
        ad,
        lr=parties.LR,
    )


def fed_server(channel: Any, home: str) -> dict[str, Any]:
    os.environ["VEIL_HOME"] = home
    from veil.tune.federated import FedAvgEnclave, serve_federated_host

    init = _client_tee(1).adapter.adapter_state()
    fed = FedAvgEnclave(
        load_enclave("simulated", code=SERVER[0], config=SERVER[1]), init, client_verifier=_verifier(*CLIENT)
    )
    out = serve_federated_host({"c0": channel}, fed, rounds=2, timeout=120)
    moved = max(float((fed.global_state[k] - init[k]).abs().max()) for k in init)
    return {
        "ok": out["c0"].ok,
        "rounds": len(fed.history),
        "moved": moved,
        "global": {k: v.numpy() for k, v in fed.global_state.items()},
    }


def fed_client(channel: Any, home: str) -> dict[str, Any]:
    os.environ["VEIL_HOME"] = home
    from veil.tune.federated import run_federated_client

    from . import parties

    res = run_federated_client(
        channel,
        _client_tee(1),
        _verifier(*SERVER),
        parties.tiny_examples(n=6),
        local_steps=2,
        batch_size=3,
        pad_id=0,
        timeout=120,
    )
    return {"rounds": res.rounds, "final": {k: v.numpy() for k, v in res.final_state.items()}}


@pytest.mark.slow
def test_federated_over_grpc_processes(run_parties: Any, tmp_path: Any) -> None:
    srv, cli = run_parties(
        fed_server,
        fed_client,
        transport="grpc",
        timeout=300,
        args_a=(str(tmp_path),),
        args_b=(str(tmp_path),),
    )
    assert srv["ok"] and srv["rounds"] == 2 and cli["rounds"] == 2
    assert srv["moved"] > 1e-4
    assert set(cli["final"]) == set(srv["global"])
    for k, v in srv["global"].items():
        assert (cli["final"][k] == v).all()
