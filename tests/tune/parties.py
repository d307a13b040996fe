"""Tiny models, data and the two roles of split fine-tuning, importable by spawned processes."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from veil.tee import Policy, Verifier
from veil.tune.client import TrainHistory, TuneClient, train_split
from veil.tune.data import EncodedExample
from veil.tune.enclave_server import (
    TuneEnclave,
    build_tune_enclave,
    expected_measurement,
    read_checkpoint,
    serve_host,
)
from veil.tune.split import client_part

VOCAB = 96
LR = 5e-3
LORA = {"r": 4, "alpha": 8}


_RNG_LOCK = threading.RLock()  # HF init and LoRA init draw from torch's global RNG; roles run in threads
_CACHE: dict[tuple[str, int, int], Any] = {}


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 4) -> Any:
    with _RNG_LOCK:
        key = (family, seed, layers)
        if key not in _CACHE:
            _CACHE[key] = _build_tiny(family, seed, layers)
        return copy.deepcopy(_CACHE[key])


def _build_tiny(family: str, seed: int, layers: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        m = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        )
        m = GPT2LMHeadModel(cfg)
    return m.eval()


def tiny_examples(n: int = 12, seed: int = 0) -> list[EncodedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(3, VOCAB, size=int(rng.integers(4, 9))).tolist()
        c = rng.integers(3, VOCAB, size=int(rng.integers(1, 3))).tolist()
        out.append(EncodedExample(input_ids=p + c, labels=[-100] * len(p) + c, prompt_len=len(p)))
    return out


def model_id(family: str) -> str:
    return f"tiny-{family}"


def policy_for(family: str, cut: int, adapter: str = "lora", *, allow_simulated: bool = True) -> Policy:
    meas = expected_measurement(model_id=model_id(family), cut_layer=cut, adapter=adapter, lr=LR,
                                adapter_options=LORA if adapter == "lora" else {"num_virtual_tokens": 3})
    return Policy(allowed_measurements={meas}, allow_simulated=allow_simulated, trust_any_simulated_platform=True)


def make_enclave(family: str, cut: int, adapter: str = "lora", checkpoint_every: int = 0) -> TuneEnclave:
    opts = LORA if adapter == "lora" else {"num_virtual_tokens": 3}
    with _RNG_LOCK:
        return build_tune_enclave(
            tiny_model(family), cut_layer=cut, adapter=adapter, model_id=model_id(family), lr=LR,
            adapter_options=dict(opts), checkpoint_every=checkpoint_every,
        )


def server_role(
    channel: Any, family: str, cut: int, adapter: str = "lora", ckpt: str | None = None,
    checkpoint_every: int = 0,
) -> dict[str, Any]:
    tee = make_enclave(family, cut, adapter, checkpoint_every)
    path = Path(ckpt) if ckpt else None
    if path is not None:
        blob = read_checkpoint(path)
        if blob is not None:
            tee.restore(blob)
    step = serve_host(channel, tee, checkpoint_path=path)
    return {"step": step, "adapter": {k: v.numpy() for k, v in tee.adapter.adapter_state().items()}}


def client_role(
    channel: Any, family: str, cut: int, *, steps: int = 4, grad_accum: int = 1, batch_size: int = 3,
    adapter: str = "lora", stop_after: int | None = None, finish: bool = True,
) -> dict[str, Any]:
    client = TuneClient(channel, client_part(tiny_model(family), cut), Verifier(policy_for(family, cut, adapter)))
    info = client.connect()
    hist: TrainHistory = train_split(
        client.train_micro, tiny_examples(), pad_id=0, batch_size=batch_size, grad_accum=grad_accum,
        epochs=5, seed=0, max_steps=steps, start_step=info.step, bytes_sent=lambda: client.bytes_sent,
        stop_after=stop_after,
    )
    final = client.finish() if finish else hist.final_step
    return {"losses": hist.losses, "start": info.step, "final": final, "simulated": info.simulated,
            "bytes_sent": client.bytes_sent}


def reference_training(
    family: str, cut: int, *, steps: int, grad_accum: int = 1, batch_size: int = 3,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Unsplit peft LoRA training on the full model (layers cut..L-1 adapted), same schedule."""
    from peft import LoraConfig, get_peft_model

    from veil.tune.data import batch_schedule, collate

    m = copy.deepcopy(tiny_model(family))
    n = m.config.num_hidden_layers
    cfg = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"] if family == "llama" else ["c_attn"],
        layers_to_transform=list(range(cut, n)), fan_in_fan_out=family == "gpt2",
    )
    pm = get_peft_model(m, cfg)
    params = {n_: p for n_, p in pm.named_parameters() if p.requires_grad}
    if init is not None:
        with torch.no_grad():
            for k, v in init.items():
                params[k].copy_(v)
    opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.0)
    exs = tiny_examples()
    micro = batch_schedule(len(exs), batch_size=batch_size, epochs=5, seed=0)
    losses = []
    pm.train()
    for s in range(steps):
        ls = []
        for j in range(grad_accum):
            b = collate([exs[i] for i in micro[s * grad_accum + j]], 0)
            out = pm(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.attention_mask),
                     labels=torch.from_numpy(b.labels))
            (out.loss / grad_accum).backward()
            ls.append(float(out.loss.detach()))
        opt.step()
        opt.zero_grad()
        losses.append(float(np.mean(ls)))
    return losses, {k: v.detach().clone() for k, v in params.items()}
