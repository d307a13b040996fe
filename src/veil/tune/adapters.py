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
from typing import Any, Literal, Protocol

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from transformers import DynamicCache

from veil.errors import ConfigError, InputError
from veil.tune.split import ServerPart

__all__ = ["AdapterKind", "LoRAAdapter", "PrefixAdapter", "ServerAdapter", "make_adapter"]

log = logging.getLogger("veil.tune")

AdapterKind = Literal["lora", "ptuning"]

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
        if r <= 0:
            raise ConfigError(f"LoRA rank must be positive, got {r}")
        self.part = part
        targets = target_modules or DEFAULT_LORA_TARGETS[part.family]
        self.config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            fan_in_fan_out=part.family == "gpt2",
            bias="none",
        )
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
            if "lora_" in key or any(key.startswith(p) for p in merged_prefixes):
                continue
            if key.startswith("rotary_emb."):
                continue
            out[self.part.full_model_key(key)] = t.detach().clone().contiguous()
        return out


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


def make_adapter(part: ServerPart, kind: str, **options: Any) -> ServerAdapter:
    """Build the adapter ``kind`` ("lora" | "ptuning") on ``part``."""
    if kind == "lora":
        return LoRAAdapter(part, **options)
    if kind == "ptuning":
        return PrefixAdapter(part, **options)
    raise ConfigError(f"unknown adapter {kind!r}: choose lora or ptuning")
