"""The methods table: every way veil can fine-tune, on one task, with the same budget.

Rows (same model, data order, seed, LoRA hyper-parameters and number of optimizer steps):

* ``centralized-lora``: peft LoRA on layers ``k..L-1`` of the unsplit model, one process, no TEE;
* ``split-lora``: client layers ``0..k-1``, enclave server (simulated TEE) with LoRA, attested
  AES-GCM session over a :class:`~veil.comm.MemoryChannel` (real codec + encryption, threads);
* ``split-lora+spf``: the same with LoRA + SPF (sparse heads / FFN neurons of the server part);
* ``split-ptuning``: the same with P-tuning v2 prefixes;
* ``adapters-only-otp``: split LoRA where both sides' frozen dense layers run on the untrusted
  host under one-time pads (:mod:`veil.tune.otp`); the pads are precomputed before each step
  (reported separately as offline time) and the online step time is reported;
* ``federated-3``: 3 clients with non-IID BBC topics, each tuning LoRA in its own simulated
  TEE, FedAvg in the server enclave; ``rounds x local_steps = steps`` for each client.

Plus the embedding-inversion attack table (:mod:`veil.tune.attacks`).
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from veil.errors import ConfigError
from veil.tune.client import TuneClient, evaluate_classification, train_split
from veil.tune.data import Batch, EncodedExample
from veil.tune.messages import EvalResult, StepResult

__all__ = ["MethodSettings", "run_attacks", "run_methods"]

log = logging.getLogger("veil.tune")

MODEL_ID = "smollm2-135m-instruct"
METHODS = (
    "centralized-lora",
    "split-lora",
    "split-lora+spf",
    "split-ptuning",
    "adapters-only-otp",
    "federated-3",
)


@dataclass
class MethodSettings:
    cut: int = 2
    steps: int = 8
    batch_size: int = 2
    lr: float = 2e-3
    ptuning_lr: float = 1e-2
    lora_r: int = 8
    lora_alpha: int = 16
    spf_ratio: float = 0.01
    spf_score: str = "l1"
    prefix_tokens: int = 8
    fed_clients: int = 3
    fed_rounds: int = 2
    seed: int = 0


def _median_step(seconds: Sequence[float]) -> float:
    tail = list(seconds[1:]) or list(seconds)
    return float(statistics.median(tail)) if tail else float("nan")


def _lora_opts(s: MethodSettings) -> dict[str, Any]:
    return {"r": s.lora_r, "alpha": s.lora_alpha}


# -------------------------------------------------------------------------------- centralized


def _centralized(
    lm: Any, enc: list[EncodedExample], test: list[EncodedExample], labels: Any, pad: int, s: MethodSettings
) -> dict[str, Any]:
    from veil.tune.local import LocalLoRATrainer

    n = int(lm.config.num_hidden_layers)
    torch.manual_seed(s.seed)
    tr = LocalLoRATrainer(
        copy.deepcopy(lm), r=s.lora_r, alpha=s.lora_alpha, lr=s.lr, layers=list(range(s.cut, n))
    )
    hist = train_split(
        tr.train_micro, enc, pad_id=pad, batch_size=s.batch_size, seed=s.seed, epochs=10, max_steps=s.steps
    )
    acc = evaluate_classification(tr.score, test, labels, pad_id=pad)
    return {
        "losses": hist.losses,
        "median_step_s": _median_step([x.seconds for x in hist.steps]),
        "accuracy": acc,
        "tee": "none",
    }


# ------------------------------------------------------------------------------------- split


def _split(
    lm: Any,
    enc: list[EncodedExample],
    test: list[EncodedExample],
    labels: Any,
    pad: int,
    s: MethodSettings,
    adapter: str,
    *,
    otp: bool = False,
) -> dict[str, Any]:
    from veil.comm import MemoryChannel
    from veil.tee import Policy, Verifier
    from veil.tune.enclave_server import build_tune_enclave, expected_measurement, serve_host
    from veil.tune.split import client_part

    if adapter == "lora":
        opts: dict[str, Any] = _lora_opts(s)
    elif adapter == "spf":
        opts = {**_lora_opts(s), "ratio": s.spf_ratio, "score": s.spf_score}
    elif adapter == "ptuning":
        opts = {"num_virtual_tokens": s.prefix_tokens}
    else:
        raise ConfigError(f"unknown adapter {adapter!r}")
    lr = s.ptuning_lr if adapter == "ptuning" else s.lr
    tee = build_tune_enclave(
        copy.deepcopy(lm),
        cut_layer=s.cut,
        adapter=adapter,
        model_id=MODEL_ID,
        lr=lr,
        adapter_options=opts,
        seed=s.seed,
    )
    policy = Policy(
        allowed_measurements={
            expected_measurement(
                model_id=MODEL_ID, cut_layer=s.cut, adapter=adapter, lr=lr, adapter_options=opts
            )
        },
        allow_simulated=True,
        trust_any_simulated_platform=True,
    )
    cp = client_part(lm, s.cut)
    engines: list[Any] = []
    if otp:
        from veil.tune.otp import UntrustedLinearHost, offload_frozen_linears

        engines = [
            offload_frozen_linears(tee.part, UntrustedLinearHost()),
            offload_frozen_linears(cp, UntrustedLinearHost()),
        ]
    ch_srv, ch_cli = MemoryChannel.pair(timeout=3600)
    result: dict[str, Any] = {}

    def server() -> None:
        try:
            result["step"] = serve_host(ch_srv, tee, idle_timeout=3600)
        except Exception as e:  # reported below
            result["error"] = e

    th = threading.Thread(target=server, daemon=True)
    th.start()
    c = TuneClient(ch_cli, cp, Verifier(policy), timeout=3600)
    info = c.connect()
    offline: list[float] = []

    def step(batch: Batch, st: int, micro: int, n_micro: int) -> StepResult:
        if engines:  # offline phase of adapters-only mode: pads + their images for this step
            rows = int(batch.input_ids.size)
            t0 = time.perf_counter()
            for e in engines:
                e.precompute(rows, backward=e is engines[0], skip=("lm_head",))
            offline.append(time.perf_counter() - t0)
        return c.train_micro(batch, st, micro, n_micro)

    b0 = c.bytes_sent
    hist = train_split(
        step,
        enc,
        pad_id=pad,
        batch_size=s.batch_size,
        seed=s.seed,
        epochs=10,
        max_steps=s.steps,
        bytes_sent=lambda: c.bytes_sent,
    )
    train_bytes = c.bytes_sent - b0
    score: Callable[[Batch, Sequence[int]], EvalResult] = c.score
    acc = evaluate_classification(score, test, labels, pad_id=pad)
    c.finish(checkpoint=False)
    ch_cli.close()
    th.join(60)
    if "error" in result:
        raise result["error"]
    online = [x.seconds - (offline[i] if i < len(offline) else 0.0) for i, x in enumerate(hist.steps)]
    out: dict[str, Any] = {
        "losses": hist.losses,
        "median_step_s": _median_step(online),
        "accuracy": acc,
        "bytes_per_step": train_bytes / max(1, len(hist.steps)),
        "tee": "simulated" if info.simulated else "hardware",
    }
    if engines:
        out["offline_pad_s_per_step"] = _median_step(offline)
        out["offload"] = {"server": engines[0].stats.to_dict(), "client": engines[1].stats.to_dict()}
    return out


# --------------------------------------------------------------------------------- federated


def _local_score(embed: Any, adapter: Any) -> Callable[[Batch, Sequence[int]], EvalResult]:
    from veil.tune.split import head_last_logprobs

    def score(batch: Batch, candidates: Sequence[int]) -> EvalResult:
        adapter.part.eval()
        with torch.no_grad():
            act = embed(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
            fh = adapter.final_hidden(act.hidden_states, act.attention_mask, act.position_ids)
            sc = head_last_logprobs(
                fh, adapter.part.lm_head, act.attention_mask, torch.tensor(list(candidates))
            )
        return EvalResult(scores=sc.numpy().astype(np.float32), loss=float("nan"))

    return score


def _federated(
    lm: Any, enc: list[EncodedExample], test: list[EncodedExample], labels: Any, pad: int, s: MethodSettings
) -> dict[str, Any]:
    from veil.comm import MemoryChannel
    from veil.tee import Policy, Verifier, load_enclave, measure
    from veil.tune.adapters import make_adapter
    from veil.tune.federated import (
        FedAvgEnclave,
        FederatedClientEnclave,
        partition_by_topic,
        run_federated_client,
        serve_federated_host,
    )
    from veil.tune.split import client_part, server_part

    if s.steps % s.fed_rounds:
        raise ConfigError("steps must be a multiple of the federated rounds")
    local_steps = s.steps // s.fed_rounds
    srv_code, cli_code = [b"veil-tune-fedavg-enclave"], [b"veil-tune-fed-client-enclave"]
    srv_cfg, cli_cfg = {"app": "fedavg", "model_id": MODEL_ID}, {"app": "fed-client", "model_id": MODEL_ID}

    def verifier(code: list[bytes], cfg: dict[str, Any]) -> Verifier:
        return Verifier(
            Policy(
                allowed_measurements={measure(code, cfg)},
                allow_simulated=True,
                trust_any_simulated_platform=True,
            )
        )

    def client_tee() -> FederatedClientEnclave:
        torch.manual_seed(s.seed)  # same LoRA initialisation everywhere (weights, not a secret)
        ad = make_adapter(server_part(lm, s.cut), "lora", **_lora_opts(s))
        return FederatedClientEnclave(
            load_enclave("simulated", code=cli_code, config=cli_cfg), client_part(lm, s.cut), ad, lr=s.lr
        )

    parts = partition_by_topic(enc, s.fed_clients)
    clients = [client_tee() for _ in parts]
    fed = FedAvgEnclave(
        load_enclave("simulated", code=srv_code, config=srv_cfg),
        clients[0].adapter.adapter_state(),
        client_verifier=verifier(cli_code, cli_cfg),
    )
    pairs = [MemoryChannel.pair(timeout=3600) for _ in parts]
    res: dict[str, Any] = {}

    def run_client(i: int) -> None:
        try:
            res[f"c{i}"] = run_federated_client(
                pairs[i][1],
                clients[i],
                verifier(srv_code, srv_cfg),
                parts[i],
                local_steps=local_steps,
                batch_size=s.batch_size,
                pad_id=pad,
                seed=s.seed + i,
                timeout=3600,
            )
        except Exception as e:  # reported below
            res[f"c{i}"] = e

    ts = [threading.Thread(target=run_client, args=(i,), daemon=True) for i in range(len(parts))]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    outcomes = serve_federated_host(
        {f"c{i}": p[0] for i, p in enumerate(pairs)}, fed, rounds=s.fed_rounds, timeout=3600
    )
    for t in ts:
        t.join(600)
    wall = time.perf_counter() - t0
    for v in res.values():
        if isinstance(v, Exception):
            raise v
    acc = evaluate_classification(
        _local_score(clients[0].embed, clients[0].adapter), test, labels, pad_id=pad
    )
    n_steps = s.fed_clients * s.steps
    return {
        "losses": [float(np.mean([r.losses[j] for r in res.values()])) for j in range(s.fed_rounds)],
        "median_step_s": wall
        / n_steps
        * s.fed_clients,  # wall per step of one client (clients run in parallel)
        "accuracy": acc,
        "tee": "simulated",
        "clients": {
            c: {"examples": len(parts[int(c[1:])]), "excluded": o.excluded} for c, o in outcomes.items()
        },
        "topics": [sorted({int(e.label or 0) for e in p}) for p in parts],
        "rounds": s.fed_rounds,
        "local_steps": local_steps,
        "note": "clients train concurrently (threads, same CPU); step time = wall / (rounds x local steps)",
    }


# ------------------------------------------------------------------------------------ driver


def run_methods(
    lm: Any,
    enc: list[EncodedExample],
    test: list[EncodedExample],
    labels: Any,
    pad: int,
    settings: MethodSettings,
    *,
    methods: Sequence[str] = METHODS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Train and evaluate every method in ``methods``; one dict of results per method."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ConfigError(f"unknown methods {sorted(unknown)}; known: {list(METHODS)}")
    s = settings
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "centralized-lora": lambda: _centralized(lm, enc, test, labels, pad, s),
        "split-lora": lambda: _split(lm, enc, test, labels, pad, s, "lora"),
        "split-lora+spf": lambda: _split(lm, enc, test, labels, pad, s, "spf"),
        "split-ptuning": lambda: _split(lm, enc, test, labels, pad, s, "ptuning"),
        "adapters-only-otp": lambda: _split(lm, enc, test, labels, pad, s, "lora", otp=True),
        "federated-3": lambda: _federated(lm, enc, test, labels, pad, s),
    }
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        if progress is not None:
            progress(m)
        t0 = time.perf_counter()
        out[m] = runners[m]()
        out[m]["wall_s"] = time.perf_counter() - t0
        log.info("%s: accuracy %.3f, median step %.2f s", m, out[m]["accuracy"], out[m]["median_step_s"])
    return out


def run_attacks(
    lm: Any,
    tokenizer: Any,
    public_texts: Sequence[str],
    private_texts: Sequence[str],
    *,
    max_tokens: int,
    cuts: Sequence[int] = (1, 2, 5, 10),
) -> list[dict[str, Any]]:
    """Embedding-inversion table on tokenised public / private texts (see veil.tune.attacks)."""
    from veil.tune.attacks import run_inversion_suite

    def tok(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [list(tokenizer(t, add_special_tokens=False).input_ids)[:max_tokens] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    res = run_inversion_suite(lm, tok(public_texts), tok(private_texts), cuts=cuts)
    return [r.to_dict() for r in res]
