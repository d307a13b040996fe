"""Trainable adapters on the server part (they live only inside the enclave).

* ``lora``: peft LoRA injected into the server part's linear layers
  (:func:`peft.inject_adapter_in_model`), the base weights frozen.
* ``ptuning``: P-tuning v2 = trainable per-layer key/value prefixes. peft's prefix tuning only
  works through ``PeftModelForCausalLM`` on a whole model, so veil implements the prefixes
  itself for the sliced server part: the prefixes are placed in a transformers
  ``DynamicCache`` (exactly how peft feeds them) and the attention mask is extended by the
  prefix length.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import DynamicCache

from veil.errors import ConfigError, InputError
from veil.tune.split import ClientPart, ServerPart

__all__ = [
    "AdapterKind",
    "LoRAAdapter",
    "PrefixAdapter",
    "SPFLoRAAdapter",
    "ServerAdapter",
    "add_client_lora",
    "apply_sparse_deltas",
    "make_adapter",
    "spf_units",
]

log = logging.getLogger("veil.tune")

AdapterKind = Literal["lora", "ptuning", "spf"]

DEFAULT_LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


class ServerAdapter(Protocol):
    """A trainable adapter bound to one server part."""

    kind: str
    part: ServerPart

    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def logits(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor: ...

    def final_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor: ...

    def adapter_state(self) -> dict[str, torch.Tensor]: ...

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def export_adapter(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def export_merged(self) -> dict[str, torch.Tensor]: ...


def _load_named(params: dict[str, nn.Parameter], state: dict[str, torch.Tensor], what: str) -> None:
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise InputError(f"{what} state does not match this adapter (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, p in params.items():
            t = state[name]
            if t.shape != p.shape:
                raise InputError(
                    f"{what} tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))


def lora_config(family: str, *, r: int, alpha: int, dropout: float, targets: list[str]) -> LoraConfig:
    """peft LoRA settings for one part of a ``family`` model (GPT-2's Conv1D is fan-in/fan-out)."""
    if r <= 0:
        raise ConfigError(f"LoRA rank must be positive, got {r}")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=family == "gpt2",
        bias="none",
    )


class LoRAAdapter:
    """peft LoRA on the server part."""

    kind = "lora"

    def __init__(
        self,
        part: ServerPart,
        *,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
    ) -> None:
        self.part = part
        targets = target_modules or DEFAULT_LORA_TARGETS[part.family]
        self.config = lora_config(part.family, r=r, alpha=alpha, dropout=dropout, targets=targets)
        part.requires_grad_(False)
        if len(part.layers) == 0:
            raise ConfigError(
                "the server part has no decoder layers to adapt (cut layer == number of layers)"
            )
        inject_adapter_in_model(self.config, part.layers)
        self._params: dict[str, nn.Parameter] = {}
        for name, p in part.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                self._params[name] = p
        if not self._params:
            raise ConfigError(f"no LoRA target modules {targets} found in the server part")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._params.values())

    def logits(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.part(hidden, attention_mask, position_ids)  # type: ignore[no-any-return]

    def final_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Hidden states after the final norm (apply ``part.lm_head`` only where needed)."""
        return self.part.hidden(hidden, attention_mask, position_ids)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._params.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        _load_named(self._params, state, "LoRA")

    def export_adapter(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Adapter weights under peft's names for the unsplit model + an ``adapter_config``."""
        out: dict[str, torch.Tensor] = {}
        for name, p in self._params.items():
            key = self.part.full_model_key(name).replace(".default", "")
            out["base_model.model." + key] = p.detach().clone().contiguous()
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.config.r,
            "lora_alpha": self.config.lora_alpha,
            "lora_dropout": self.config.lora_dropout,
            "target_modules": sorted(self.config.target_modules or []),
            "fan_in_fan_out": self.config.fan_in_fan_out,
            "layers_to_transform": self.part.layer_indices(),
            "bias": "none",
        }
        return out, cfg

    def export_merged(self) -> dict[str, torch.Tensor]:
        """Server-part weights with LoRA merged in, under the unsplit model's names."""
        from peft.tuners.lora import LoraLayer

        out: dict[str, torch.Tensor] = {}
        merged_prefixes: set[str] = set()
        for mname, mod in self.part.named_modules():
            if isinstance(mod, LoraLayer):
                lmod: Any = mod
                base: Any = lmod.get_base_layer()
                with torch.no_grad():
                    w = base.weight.detach() + lmod.get_delta_weight("default").detach()
                out[self.part.full_model_key(f"{mname}.weight")] = w.clone().contiguous()
                if getattr(base, "bias", None) is not None:
                    out[self.part.full_model_key(f"{mname}.bias")] = base.bias.detach().clone()
                merged_prefixes.add(mname + ".")
        for key, t in self.part.state_dict().items():
            if "lora_" in key or "spf_" in key or any(key.startswith(p) for p in merged_prefixes):
                continue
            if key.startswith("rotary_emb."):
                continue
            out[self.part.full_model_key(key)] = t.detach().clone().contiguous()
        return out


def add_client_lora(
    part: ClientPart,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> list[nn.Parameter]:
    """Trainable-client mode: peft LoRA on the client part's layers ``0..k-1`` (base weights
    stay frozen); returns the LoRA parameters for the client's own optimizer. Names map onto the
    unsplit model like the server part's (``layers.<i>...``)."""
    targets = target_modules or DEFAULT_LORA_TARGETS[part.family]
    cfg = lora_config(part.family, r=r, alpha=alpha, dropout=dropout, targets=targets)
    if len(part.layers) == 0:
        raise ConfigError("the client part has no decoder layers to adapt (cut layer 0)")
    inject_adapter_in_model(cfg, part.layers)
    params = [p for n, p in part.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ConfigError(f"no LoRA target modules {targets} found in the client part")
    return params


def _attn_geometry(part: ServerPart) -> tuple[int, int]:
    cfg = part.config
    n_heads = int(getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", 0)))
    hidden = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // n_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    return n_kv, head_dim


class PrefixAdapter:
    """P-tuning v2: trainable key/value prefixes for every server layer (veil's own implementation)."""

    kind = "ptuning"

    def __init__(self, part: ServerPart, *, num_virtual_tokens: int = 8, init_std: float = 0.02) -> None:
        if num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
        self.part = part
        self.num_virtual_tokens = num_virtual_tokens
        part.requires_grad_(False)
        n_kv, head_dim = _attn_geometry(part)
        dtype = next(part.parameters()).dtype
        self.prefix = nn.ParameterDict()
        for i in part.layer_indices():
            for kv in ("key", "value"):
                t = torch.randn(n_kv, num_virtual_tokens, head_dim, dtype=dtype) * init_std
                self.prefix[f"{i}_{kv}"] = nn.Parameter(t)
        self._shape = (n_kv, num_virtual_tokens, head_dim)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.prefix.values())

    def _cache(self, batch: int) -> DynamicCache:
        cache = DynamicCache(config=self.part.config)
        p = self.num_virtual_tokens
        n_kv, _, head_dim = self._shape
        ref = next(iter(self.prefix.values()))
        for i in range(self.part.total_layers):
            if i < self.part.cut_layer:  # client layers never run here; keep the cache lengths uniform
                z = torch.zeros(batch, n_kv, p, head_dim, dtype=ref.dtype)
                cache.update(z, z, i)
            else:
                k = self.prefix[f"{i}_key"].unsqueeze(0).expand(batch, -1, -1, -1)
                v = self.prefix[f"{i}_value"].unsqueeze(0).expand(batch, -1, -1, -1)
                cache.update(k, v, i)
        return cache

    def logits(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.part.lm_head(self.final_hidden(hidden, attention_mask, position_ids))  # type: ignore[no-any-return]

    def final_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        b = hidden.shape[0]
        ones = torch.ones(b, self.num_virtual_tokens, dtype=attention_mask.dtype)
        mask = torch.cat([ones, attention_mask], dim=1)
        return self.part.hidden(
            hidden, attention_mask, position_ids, cache=self._cache(b), mask_attention=mask
        )

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {f"prefix.{k}": v.detach().clone() for k, v in self.prefix.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        _load_named({f"prefix.{k}": v for k, v in self.prefix.items()}, state, "P-tuning v2")

    def export_adapter(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        out = {
            f"prefix.layers.{k.replace('_', '.')}": v.detach().clone().contiguous()
            for k, v in self.prefix.items()
        }
        cfg = {
            "peft_type": "VEIL_PTUNING_V2",
            "num_virtual_tokens": self.num_virtual_tokens,
            "layers": self.part.layer_indices(),
            "layout": "per layer: key/value (num_kv_heads, num_virtual_tokens, head_dim), post-rotary",
        }
        return out, cfg

    def export_merged(self) -> dict[str, torch.Tensor]:
        raise ConfigError(
            "P-tuning v2 prefixes cannot be merged into the weights; export with --adapter-only"
        )


# ------------------------------------------------------------------------------------- SPF


@dataclass(frozen=True)
class SparseUnit:
    """One trainable slice of a base weight: ``rows`` (dim 0) or ``cols`` (dim 1) ``index``."""

    module: str  # name of the nn.Linear inside the server part (base layer, not the LoRA wrapper)
    dim: int
    index: tuple[int, ...]


def _linear(part: ServerPart, name: str) -> nn.Linear:
    mod: Any = part.get_submodule(name)
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    if not isinstance(base, nn.Linear):
        raise ConfigError(f"SPF needs nn.Linear weights, {name} is {type(base).__name__}")
    return base


def _spf_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    m: Any = self
    w = m.weight.index_add(int(m.spf_dim), m.spf_index, m.spf_delta)
    return F.linear(x, w, m.bias)


def spf_units(part: ServerPart) -> dict[str, list[tuple[int, list[tuple[str, int, list[int]]]]]]:
    """The SPF candidate units of a Llama-like server part, by kind.

    * ``"ffn"``: intermediate neuron ``j`` of layer ``i`` = row ``j`` of ``gate_proj`` and
      ``up_proj`` + column ``j`` of ``down_proj``;
    * ``"head"``: attention head ``h`` of layer ``i`` = rows ``h*d..(h+1)*d`` of ``q_proj`` +
      the same columns of ``o_proj`` (k/v are shared between heads under GQA and not included).

    Each entry: ``(layer, [(module name, dim, indices), ...])``.
    """
    if part.family != "llama":
        raise ConfigError("SPF is implemented for Llama-like models (q/o_proj, gate/up/down_proj)")
    cfg = part.config
    n_heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    inter = int(cfg.intermediate_size)
    ffn: list[tuple[int, list[tuple[str, int, list[int]]]]] = []
    heads: list[tuple[int, list[tuple[str, int, list[int]]]]] = []
    for i in part.layer_indices():
        pre = f"layers.{i}"
        for j in range(inter):
            ffn.append(
                (
                    i,
                    [
                        (f"{pre}.mlp.gate_proj", 0, [j]),
                        (f"{pre}.mlp.up_proj", 0, [j]),
                        (f"{pre}.mlp.down_proj", 1, [j]),
                    ],
                )
            )
        for h in range(n_heads):
            idx = list(range(h * head_dim, (h + 1) * head_dim))
            heads.append((i, [(f"{pre}.self_attn.q_proj", 0, idx), (f"{pre}.self_attn.o_proj", 1, idx)]))
    return {"ffn": ffn, "head": heads}


def _unit_scores(
    units: dict[str, list[tuple[int, list[tuple[str, int, list[int]]]]]],
    magnitude: dict[str, torch.Tensor],
) -> dict[str, list[float]]:
    """Mean of ``magnitude[name]`` (same shape as the weight) over each unit's slices."""
    sums: dict[tuple[str, int], list[float]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for name, m in magnitude.items():
        for dim in (0, 1):
            sums[(name, dim)] = m.sum(dim=1 - dim).tolist()  # one value per row (dim 0) / column (dim 1)
            sizes[(name, dim)] = int(m.shape[1 - dim])
    out: dict[str, list[float]] = {}
    for kind, us in units.items():
        sc = []
        for _, u in us:
            tot, cnt = 0.0, 0
            for name, dim, idx in u:
                s = sums[(name, dim)]
                tot += sum(s[i] for i in idx)
                cnt += sizes[(name, dim)] * len(idx)
            sc.append(tot / max(cnt, 1))
        out[kind] = sc
    return out


class SPFLoRAAdapter:
    """LoRA + SPF: LoRA as :class:`LoRAAdapter`, plus a sparse subset of the server part's base
    weights (whole attention heads and FFN neurons, ranked by importance) trained as sparse
    deltas. Rule (docs/protocols/spf.md): per kind (``ffn`` neurons, attention heads),
    exactly ``round(ratio * n_units)`` units with the highest score are selected; score =
    mean |w| over the unit's weights (``score="l1"``) or mean |w * dL/dw| on a calibration
    batch (``score="grad"``, first-order Taylor importance; call :meth:`calibrate`)."""

    kind = "spf"

    def __init__(
        self,
        part: ServerPart,
        *,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        ratio: float = 0.01,
        score: str = "l1",
    ) -> None:
        if not 0 < ratio <= 1:
            raise ConfigError(f"SPF ratio must be in (0, 1], got {ratio}")
        if score not in ("l1", "grad"):
            raise ConfigError(f"SPF score must be l1 or grad, got {score!r}")
        self.part = part
        self.ratio = ratio
        self.score = score
        self.lora = LoRAAdapter(part, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules)
        self.units = spf_units(part)
        self.selected: dict[str, list[int]] = {}
        self._deltas: dict[str, nn.Parameter] = {}
        if score == "l1":
            names = {n for v in self.units.values() for _, u in v for n, _, _ in u}
            mags = {n: _linear(part, n).weight.detach().abs() for n in names}
            self._select(_unit_scores(self.units, mags))

    # -- selection
    def n_selected(self, kind: str) -> int:
        return round(self.ratio * len(self.units[kind]))

    def calibrate(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """Gradient-magnitude selection on one calibration batch (``score="grad"``)."""
        from veil.tune.split import head_loss

        if self._deltas:
            raise ConfigError("SPF units are already selected")
        lins = {n for v in self.units.values() for _, u in v for n, _, _ in u}
        ws = {n: _linear(self.part, n).weight for n in lins}
        for w in ws.values():
            w.requires_grad_(True)
        try:
            loss = head_loss(
                self.lora.final_hidden(hidden, attention_mask, position_ids), self.part.lm_head, labels
            )
            grads = torch.autograd.grad(loss, list(ws.values()))
        finally:
            for w in ws.values():
                w.requires_grad_(False)
        g = {n: (ws[n].detach() * gr).abs() for n, gr in zip(ws, grads, strict=True)}
        self._select(_unit_scores(self.units, g))

    def _select(self, scores: dict[str, list[float]]) -> None:
        per_linear: dict[tuple[str, int], list[int]] = {}
        for kind, units in self.units.items():
            n = self.n_selected(kind)
            order = sorted(range(len(units)), key=lambda u: (-scores[kind][u], u))[:n]
            self.selected[kind] = sorted(order)
            for u in order:
                for name, dim, idx in units[u][1]:
                    per_linear.setdefault((name, dim), []).extend(idx)
        for (name, dim), idx in sorted(per_linear.items()):
            lin = _linear(self.part, name)
            index = torch.tensor(sorted(set(idx)), dtype=torch.long)
            shape = list(lin.weight.shape)
            shape[dim] = len(index)
            delta = nn.Parameter(torch.zeros(shape, dtype=lin.weight.dtype))
            lin.register_parameter("spf_delta", delta)
            lin.register_buffer("spf_index", index, persistent=False)
            lin.spf_dim = dim  # type: ignore[assignment]
            lin.forward = types.MethodType(_spf_forward, lin)  # type: ignore[method-assign]
            self._deltas[name] = delta

    def _check_selected(self) -> None:
        if not self._deltas and self.n_selected("ffn") + self.n_selected("head") > 0:
            raise ConfigError("SPF units are not selected yet: call calibrate() first (score='grad')")

    # -- adapter protocol
    def trainable_parameters(self) -> list[nn.Parameter]:
        self._check_selected()
        return self.lora.trainable_parameters() + [self._deltas[k] for k in sorted(self._deltas)]

    def logits(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.lora.logits(hidden, attention_mask, position_ids)

    def final_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.lora.final_hidden(hidden, attention_mask, position_ids)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        out = self.lora.adapter_state()
        for name in sorted(self._deltas):
            lin: Any = _linear(self.part, name)
            out[f"spf.{name}.delta"] = self._deltas[name].detach().clone()
            out[f"spf.{name}.index"] = lin.spf_index.clone()
            out[f"spf.{name}.dim"] = torch.tensor([int(lin.spf_dim)])
        return out

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lora.load_adapter_state({k: v for k, v in state.items() if not k.startswith("spf.")})
        names = sorted({k[len("spf.") : k.rindex(".")] for k in state if k.startswith("spf.")})
        if not self._deltas:  # grad-scored adapter restored from a checkpoint: rebuild the selection
            for name in names:
                lin = _linear(self.part, name)
                dim = int(state[f"spf.{name}.dim"][0])
                index = state[f"spf.{name}.index"].to(torch.long)
                delta = nn.Parameter(torch.zeros_like(state[f"spf.{name}.delta"]))
                lin.register_parameter("spf_delta", delta)
                lin.register_buffer("spf_index", index, persistent=False)
                lin.spf_dim = dim  # type: ignore[assignment]
                lin.forward = types.MethodType(_spf_forward, lin)  # type: ignore[method-assign]
                self._deltas[name] = delta
        if set(names) != set(self._deltas):
            raise InputError("SPF state selects other weights than this adapter")
        with torch.no_grad():
            for name in names:
                lin2: Any = _linear(self.part, name)
                if not torch.equal(lin2.spf_index, state[f"spf.{name}.index"].to(torch.long)):
                    raise InputError(f"SPF state for {name} has a different index set")
                self._deltas[name].copy_(state[f"spf.{name}.delta"])

    def export_adapter(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """LoRA in peft layout + sparse deltas ``<full weight name>.spf_delta`` / ``.spf_index``."""
        out, cfg = self.lora.export_adapter()
        dims: dict[str, int] = {}
        for name in sorted(self._deltas):
            lin: Any = _linear(self.part, name)
            key = self.part.full_model_key(f"{name}.weight")
            out[f"spf::{key}::delta"] = self._deltas[name].detach().clone().contiguous()
            out[f"spf::{key}::index"] = lin.spf_index.clone()
            dims[key] = int(lin.spf_dim)
        cfg = dict(cfg)
        cfg["veil_spf"] = {"ratio": self.ratio, "score": self.score, "dims": dims, "selected": self.selected}
        return out, cfg

    def export_merged(self) -> dict[str, torch.Tensor]:
        merged = self.lora.export_merged()
        for name in sorted(self._deltas):
            lin: Any = _linear(self.part, name)
            key = self.part.full_model_key(f"{name}.weight")
            with torch.no_grad():
                merged[key] = merged[key].index_add(
                    int(lin.spf_dim), lin.spf_index, self._deltas[name].detach()
                )
        return merged


def apply_sparse_deltas(
    state_dict: dict[str, torch.Tensor], export: dict[str, torch.Tensor], dims: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Add exported SPF deltas to a full model ``state_dict`` (returns a new dict)."""
    out = dict(state_dict)
    for key, dim in dims.items():
        if key not in out:
            raise InputError(f"SPF delta for {key} has no matching weight in the model")
        out[key] = out[key].index_add(
            dim, export[f"spf::{key}::index"].to(torch.long), export[f"spf::{key}::delta"]
        )
    return out


def make_adapter(part: ServerPart, kind: str, **options: Any) -> ServerAdapter:
    """Build the adapter ``kind`` ("lora" | "ptuning" | "spf" = LoRA + SPF) on ``part``."""
    if kind == "lora":
        return LoRAAdapter(part, **options)
    if kind == "ptuning":
        return PrefixAdapter(part, **options)
    if kind == "spf":
        return SPFLoRAAdapter(part, **options)
    raise ConfigError(f"unknown adapter {kind!r}: choose lora, ptuning or spf")
