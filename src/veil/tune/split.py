"""Slice a Hugging Face causal LM by decoder layers into a client part and a server part.

The client part holds the token (and, for GPT-2, position) embeddings and the first ``k``
decoder layers; the server part holds layers ``k..L-1``, the final norm and the LM head.
They exchange only ``(hidden_states, attention_mask, position_ids)``: each part rebuilds the
causal/sliding-window mask and (for Llama-like models) the rotary embeddings from them with
the same transformers helpers the unsplit model uses, so ``server(client(x)) == model(x)``.

Supported families (transformers 5.x): Llama-like decoders (``llama``, ``qwen2``,
``mistral`` and other models with ``model.layers`` + ``model.rotary_emb``) and GPT-2
(``transformer.h`` + ``wpe``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from veil.errors import ConfigError, InputError

__all__ = [
    "Activations",
    "ClientPart",
    "ServerPart",
    "causal_lm_loss",
    "client_part",
    "model_family",
    "num_layers",
    "server_part",
    "set_mode",
]

log = logging.getLogger("veil.tune")

Family = Literal["llama", "gpt2"]
IGNORE_INDEX = -100


@dataclass
class Activations:
    """What the client part hands to the server part (and what crosses the wire, encrypted)."""

    hidden_states: torch.Tensor  # (B, T, H) float
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token
    position_ids: torch.Tensor  # (B, T) int64


def model_family(model: Any) -> Family:
    """``"llama"`` for Llama/Qwen2/Mistral-like decoders, ``"gpt2"`` for GPT-2; else ConfigError."""
    base = getattr(model, "model", None)
    if (
        base is not None
        and hasattr(base, "layers")
        and hasattr(base, "rotary_emb")
        and hasattr(model, "lm_head")
    ):
        return "llama"
    tr = getattr(model, "transformer", None)
    if tr is not None and hasattr(tr, "h") and hasattr(tr, "wpe") and hasattr(model, "lm_head"):
        return "gpt2"
    mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ConfigError(
        f"cannot split model of type {mt!r}: supported are Llama-like (llama, qwen2, mistral) and GPT-2 "
        "causal LMs"
    )


def _layers(model: Any) -> nn.ModuleList:
    fam = model_family(model)
    layers = model.model.layers if fam == "llama" else model.transformer.h
    return layers  # type: ignore[no-any-return]


def num_layers(model: Any) -> int:
    """Number of decoder layers of ``model``."""
    return len(_layers(model))


def _check_cut(model: Any, k: int) -> int:
    n = num_layers(model)
    if not isinstance(k, int) or k < 0 or k > n:
        raise ConfigError(f"cut layer must be an integer in [0, {n}] for this {n}-layer model, got {k!r}")
    return n


def _mask_kind(config: Any, layer_idx: int) -> str:
    if getattr(config, "model_type", "") == "mistral":
        return (
            "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return str(layer_types[layer_idx])
    return "full_attention"


def _build_masks(
    config: Any,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    kinds: set[str],
    cache: Any = None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "config": config,
        "inputs_embeds": hidden,
        "attention_mask": attention_mask,
        "cache": cache,
        "position_ids": position_ids,
    }
    out: dict[str, Any] = {}
    for kind in kinds:
        if kind == "sliding_attention":
            out[kind] = create_sliding_window_causal_mask(**kwargs)
        elif kind == "full_attention":
            out[kind] = create_causal_mask(**kwargs)
        else:
            raise ConfigError(f"unsupported attention layer type {kind!r} for split fine-tuning")
    return out


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_len: int | None) -> None:
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise InputError("attention_mask must have the same shape as input_ids")
    if max_len is not None and input_ids.shape[1] > max_len:
        raise InputError(
            f"sequence of {input_ids.shape[1]} tokens is longer than the model context ({max_len} tokens); "
            "truncate it (e.g. --max-length)"
        )


def _context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def set_mode(module: nn.Module, training: bool) -> None:
    """``module.train(training)``, skipped when the last ``set_mode`` on this module already set
    that mode and its root flag still says so: the call walks every submodule (thousands for a
    30-layer model with LoRA), a measurable fixed cost when done every step. (A fresh part's
    root flag can disagree with its copied submodules, hence the explicit marker.)"""
    if module.training == training and getattr(module, "_veil_mode", None) == training:
        return
    module.train(training)
    module._veil_mode = training  # type: ignore[assignment]


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 for every row (the unsplit model's default with right padding)."""
    b, t = attention_mask.shape
    return torch.arange(t, device=attention_mask.device).unsqueeze(0).expand(b, t).contiguous()


class ClientPart(nn.Module):
    """Embeddings + decoder layers ``0..k-1`` (frozen; runs at the data owner)."""

    def __init__(self, model: Any, k: int, *, copy_modules: bool = True) -> None:
        super().__init__()
        n = _check_cut(model, k)
        self.family: Family = model_family(model)
        self.config: Any = model.config
        self.cut_layer = k
        self.total_layers = n
        self.context_length = _context_length(model.config)
        cp = copy.deepcopy if copy_modules else (lambda m: m)
        if self.family == "llama":
            base = model.model
            self.embed_tokens = cp(base.embed_tokens)
            self.rotary_emb = cp(base.rotary_emb)
            self.layers = nn.ModuleDict({str(i): cp(base.layers[i]) for i in range(k)})
        else:
            tr = model.transformer
            self.embed_tokens = cp(tr.wte)
            self.wpe = cp(tr.wpe)
            self.drop = cp(tr.drop)
            self.layers = nn.ModuleDict({str(i): cp(tr.h[i]) for i in range(k)})
        self.requires_grad_(False)
        self.eval()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Activations:  # type: ignore[override]
        _check_inputs(input_ids, attention_mask, self.context_length)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(torch.long)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        hidden = self.embed_tokens(input_ids)
        if self.family == "gpt2":
            hidden = self.drop(hidden + self.wpe(position_ids))
        if self.cut_layer > 0:
            kinds = {_mask_kind(self.config, i) for i in range(self.cut_layer)}
            masks = _build_masks(self.config, hidden, attention_mask, position_ids, kinds)
            if self.family == "llama":
                pe = self.rotary_emb(hidden, position_ids=position_ids)
                for i in range(self.cut_layer):
                    hidden = self.layers[str(i)](
                        hidden,
                        attention_mask=masks[_mask_kind(self.config, i)],
                        position_embeddings=pe,
                        position_ids=position_ids,
                        cache=None,
                        use_cache=False,
                    )
            else:
                for i in range(self.cut_layer):
                    hidden = self.layers[str(i)](
                        hidden,
                        None,
                        masks["full_attention"],
                        None,
                        use_cache=False,
                        position_ids=position_ids,
                    )
        return Activations(hidden, attention_mask, position_ids)


class ServerPart(nn.Module):
    """Decoder layers ``k..L-1`` + final norm + LM head (runs inside the server enclave).

    Submodule names keep the absolute layer index (``layers.<i>.self_attn.q_proj``) so adapter
    weights map one-to-one onto the unsplit model.
    """

    def __init__(self, model: Any, k: int, *, copy_modules: bool = True) -> None:
        super().__init__()
        n = _check_cut(model, k)
        self.family: Family = model_family(model)
        self.config: Any = model.config
        self.cut_layer = k
        self.total_layers = n
        cp = copy.deepcopy if copy_modules else (lambda m: m)
        if self.family == "llama":
            base = model.model
            self.rotary_emb = cp(base.rotary_emb)
            self.layers = nn.ModuleDict({str(i): cp(base.layers[i]) for i in range(k, n)})
            self.norm = cp(base.norm)
        else:
            tr = model.transformer
            self.layers = nn.ModuleDict({str(i): cp(tr.h[i]) for i in range(k, n)})
            self.norm = cp(tr.ln_f)
        self.lm_head = cp(model.lm_head)

    def layer_indices(self) -> list[int]:
        return list(range(self.cut_layer, self.total_layers))

    def hidden(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
        mask_attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the server layers + final norm; ``cache`` carries P-tuning v2 prefixes.

        ``mask_attention`` is the 2-D mask over (prefix + tokens) when a prefix cache is used.
        """
        am = attention_mask if mask_attention is None else mask_attention
        idx = self.layer_indices()
        kinds = {_mask_kind(self.config, i) for i in idx}
        masks = _build_masks(self.config, hidden_states, am, position_ids, kinds, cache=cache)
        h = hidden_states
        if self.family == "llama":
            pe = self.rotary_emb(h, position_ids=position_ids)
            for i in idx:
                h = self.layers[str(i)](
                    h,
                    attention_mask=masks[_mask_kind(self.config, i)],
                    position_embeddings=pe,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=cache is not None,
                )
        else:
            for i in idx:
                h = self.layers[str(i)](
                    h,
                    cache,
                    masks["full_attention"],
                    None,
                    use_cache=cache is not None,
                    position_ids=position_ids,
                )
        return self.norm(h)  # type: ignore[no-any-return]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
        mask_attention: torch.Tensor | None = None,
    ) -> torch.Tensor:  # type: ignore[override]
        h = self.hidden(
            hidden_states, attention_mask, position_ids, cache=cache, mask_attention=mask_attention
        )
        return self.lm_head(h)  # type: ignore[no-any-return]

    def full_model_key(self, key: str) -> str:
        """Map a state-dict key of this part to the unsplit model's key."""
        if key.startswith("layers."):
            rest = key[len("layers.") :]
            return ("model.layers." if self.family == "llama" else "transformer.h.") + rest
        if key.startswith("norm."):
            return ("model.norm." if self.family == "llama" else "transformer.ln_f.") + key[len("norm.") :]
        if key.startswith("rotary_emb."):
            return "model." + key
        return key


def client_part(model: Any, k: int, *, copy_modules: bool = True) -> ClientPart:
    """Embeddings and the first ``k`` decoder layers of ``model`` (frozen)."""
    return ClientPart(model, k, copy_modules=copy_modules)


def server_part(model: Any, k: int, *, copy_modules: bool = True) -> ServerPart:
    """Decoder layers ``k..L-1``, final norm and LM head of ``model``."""
    part = ServerPart(model, k, copy_modules=copy_modules)
    log.debug("server part: layers %d..%d of %s", k, part.total_layers - 1, part.family)
    return part


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (same as transformers' ForCausalLMLoss)."""
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="mean")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of next-token log-probabilities of the labelled tokens (labels != -100)."""
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    tgt = labels[:, 1:]
    valid = tgt != IGNORE_INDEX
    picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(dim=-1)


def head_loss(final_hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """:func:`causal_lm_loss` computing the LM head only at labelled positions (much cheaper when
    only the completion is labelled; same value)."""
    tgt = labels[:, 1:].to(final_hidden.device)
    sel = tgt != IGNORE_INDEX
    logits = lm_head(final_hidden[:, :-1][sel]).float()
    return F.cross_entropy(logits, tgt[sel], reduction="mean")


def head_sequence_logprobs(
    final_hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor
) -> torch.Tensor:
    """:func:`sequence_logprobs` with the LM head only at labelled positions."""
    tgt = labels[:, 1:].to(final_hidden.device)
    sel = tgt != IGNORE_INDEX
    logp = torch.log_softmax(lm_head(final_hidden[:, :-1][sel]).float(), dim=-1)
    picked = logp.gather(-1, tgt[sel].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0], device=final_hidden.device).unsqueeze(1).expand_as(tgt)[sel]
    return torch.zeros(labels.shape[0], dtype=picked.dtype).index_add(0, rows, picked)


def head_last_logprobs(
    final_hidden: torch.Tensor, lm_head: nn.Module, attention_mask: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """Log-probs of ``candidates`` at each row's last real token (LM head on those rows only)."""
    last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
    rows = final_hidden[torch.arange(final_hidden.shape[0]), last]
    return torch.log_softmax(lm_head(rows).float(), dim=-1)[:, candidates]
