"""Adapters-only TEE mode: frozen dense layers on untrusted compute, one-time-pad masked.

This is the seed paper's first method ("TEE on both sides"). The frozen model's dense matrix
products run *outside* the TEE on untrusted compute (the host's accelerator); the adapters
(LoRA A/B or P-tuning v2 prefixes), their optimizer, and the cheap non-linear glue (norms,
rotary, attention softmax and the two activation x activation attention products, SiLU,
residual adds, the embedding lookup, the loss) stay inside the enclave object.

Every tensor that leaves the TEE for a frozen linear map ``W`` is masked with a fresh
one-time pad and unmasked inside by subtracting the pad's image through the same map, which
the TEE computed ahead of time::

    forward   host sees  x + r        returns (x + r) W^T      TEE:  y = that - r W^T (+ b)
    backward  host sees  g + s        returns (g + s) W        TEE:  dx = that - s W

``r`` / ``s`` are fresh for every row of every call (never reused), drawn from an AES-256-CTR
keystream (:class:`veil.crypto.mpc_ring.PRG`) keyed with 32 bytes from
:func:`veil.crypto.random.random_bytes` that never leave the enclave object.

Numerics: the masked path runs in float64. Pads are uniform on ``[-2^pad_bits, 2^pad_bits)``
on a grid of ``2^(pad_bits+1-53)`` (exactly representable doubles). With the default
``pad_bits=24`` the rounding error of one masked product is about
``sqrt(d_in) * 2^24 * |W| * 2^-53`` (~1e-8 for SmolLM2's layers), far below fp32 resolution,
so results equal the unmasked fp32 computation to ~1e-6 (the tests require <= 1e-4).

Hiding is *statistical* (a pad over the reals cannot be perfect): for one coordinate, the
host's view ``x + r`` for two inputs ``x, x'`` differs in total variation by at most
``|x - x'| / 2^(pad_bits+1)``; activations of |x| < 2^8 give <= 2^-17 per coordinate. Pads are
never reused, so no averaging attack applies. See docs/protocols/tune-methods.md.

With the ``simulated`` TEE backend the enclave object is an ordinary Python object: the
protocol and numerics are real, the isolation is not, and results say ``simulated``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from veil.crypto.mpc_ring import PRG
from veil.crypto.random import random_bytes
from veil.errors import ConfigError, InputError

__all__ = [
    "MaskedLinear",
    "OffloadStats",
    "PadPool",
    "UntrustedLinearHost",
    "offload_frozen_linears",
]

log = logging.getLogger("veil.tune")

_MANTISSA = 53


class PadSource:
    """Enclave-resident generator of float64 one-time pads (AES-CTR keyed from veil.crypto.random)."""

    def __init__(self, pad_bits: int = 24) -> None:
        if not 4 <= pad_bits <= 40:
            raise ConfigError(f"pad_bits must be in [4, 40], got {pad_bits}")
        self.pad_bits = pad_bits
        self._stream = PRG(random_bytes(32)).stream(0)
        self._scale = float(2.0 ** (pad_bits + 1 - _MANTISSA))
        self._offset = float(2.0**pad_bits)

    def uniform(self, rows: int, cols: int) -> torch.Tensor:
        """A fresh (rows, cols) float64 pad, uniform on the 2^53-point grid of [-A, A)."""
        u = self._stream.u64((rows, cols)) >> np.uint64(64 - _MANTISSA)
        r = u.astype(np.float64) * self._scale - self._offset
        return torch.from_numpy(r)


@dataclass
class OffloadStats:
    """Counters of one offload engine (all layers)."""

    calls: int = 0
    rows_masked: int = 0
    elements_sent: int = 0
    elements_received: int = 0
    pad_rows_online: int = 0  # rows whose pads had to be made during the step (pool empty)
    precompute_s: float = 0.0
    host_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Seen:
    layer: str
    direction: str  # "forward" | "backward"
    tensor: torch.Tensor


@dataclass
class UntrustedLinearHost:
    """The untrusted compute: holds the frozen (public) weights, sees only masked tensors.

    ``record=True`` keeps a copy of everything it receives (for tests and the attack
    evaluation: this is exactly the host's view).
    """

    record: bool = False
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: list[_Seen] = field(default_factory=list)

    def register(self, name: str, weight: torch.Tensor) -> None:
        self.weights[name] = weight.detach().to(torch.float64).contiguous()

    def _w(self, name: str) -> torch.Tensor:
        w = self.weights.get(name)
        if w is None:
            raise InputError(f"untrusted host has no frozen layer named {name!r}")
        return w

    def forward(self, name: str, masked: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.seen.append(_Seen(name, "forward", masked.detach().clone()))
        return masked @ self._w(name).T

    def backward(self, name: str, masked_grad: torch.Tensor) -> torch.Tensor:
        if self.record:
            self.seen.append(_Seen(name, "backward", masked_grad.detach().clone()))
        return masked_grad @ self._w(name)


class PadPool:
    """Pads and their images through one frozen map, precomputed inside the TEE."""

    def __init__(self, weight: torch.Tensor, source: PadSource, stats: OffloadStats) -> None:
        self.w = weight.detach().to(torch.float64)  # (out, in): the TEE's own copy of the frozen map
        self.source = source
        self.stats = stats
        self._fwd: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._bwd: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _make_fwd(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.source.uniform(n, self.w.shape[1])
        return r, r @ self.w.T

    def _make_bwd(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.source.uniform(n, self.w.shape[0])
        return s, s @ self.w

    def precompute(self, rows: int, backward: bool) -> None:
        self._fwd.append(self._make_fwd(rows))
        if backward:
            self._bwd.append(self._make_bwd(rows))

    @staticmethod
    def _take(
        pool: list[tuple[torch.Tensor, torch.Tensor]], n: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        while pool:
            r, img = pool[0]
            if r.shape[0] >= n:
                if r.shape[0] == n:
                    pool.pop(0)
                else:
                    pool[0] = (r[n:], img[n:])
                return r[:n], img[:n]
            pool.pop(0)  # too small for this call: discard (pads are never reused)
        return None

    def take_forward(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._take(self._fwd, n)
        if got is None:
            self.stats.pad_rows_online += n
            got = self._make_fwd(n)
        return got

    def take_backward(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._take(self._bwd, n)
        if got is None:
            self.stats.pad_rows_online += n
            got = self._make_bwd(n)
        return got


class _OffloadFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: MaskedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._masked_forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        layer: MaskedLinear = ctx.layer
        return layer._masked_backward(grad), None


class MaskedLinear(nn.Module):
    """A frozen linear map whose product runs on the untrusted host under a one-time pad.

    Drop-in for ``nn.Linear`` (``y = x W^T + b``) and GPT-2's ``Conv1D`` (``y = x W + b``).
    """

    def __init__(
        self,
        name: str,
        weight_out_in: torch.Tensor,
        bias: torch.Tensor | None,
        host: UntrustedLinearHost,
        source: PadSource,
        stats: OffloadStats,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_features = int(weight_out_in.shape[1])
        self.out_features = int(weight_out_in.shape[0])
        # kept (frozen) so code that inspects ``.weight`` (peft) still works; not a trainable param
        self.register_buffer("weight", weight_out_in.detach(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.host = host
        self.stats = stats
        self.pool = PadPool(weight_out_in, source, stats)
        # in this single-process simulation the host reuses the TEE's float64 copy of the public
        # frozen weights (memory); conceptually it is the host accelerator's own copy
        host.weights[name] = self.pool.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _OffloadFn.apply(x, self)  # type: ignore[no-any-return]

    def _masked_forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"{self.name}: expected last dim {self.in_features}, got {x.shape[-1]}")
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, self.in_features).to(torch.float64)
        n = x2.shape[0]
        r, img = self.pool.take_forward(n)
        masked = x2 + r
        t0 = time.perf_counter()
        z = self.host.forward(self.name, masked)  # --- crosses to the untrusted host and back
        self.stats.host_s += time.perf_counter() - t0
        y = z - img
        bias = self.bias
        if isinstance(bias, torch.Tensor):
            y = y + bias.to(torch.float64)
        self.stats.calls += 1
        self.stats.rows_masked += n
        self.stats.elements_sent += masked.numel()
        self.stats.elements_received += z.numel()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _masked_backward(self, grad: torch.Tensor) -> torch.Tensor:
        lead = grad.shape[:-1]
        g2 = grad.detach().reshape(-1, self.out_features).to(torch.float64)
        n = g2.shape[0]
        s, img = self.pool.take_backward(n)
        masked = g2 + s
        t0 = time.perf_counter()
        u = self.host.backward(self.name, masked)
        self.stats.host_s += time.perf_counter() - t0
        self.stats.calls += 1
        self.stats.rows_masked += n
        self.stats.elements_sent += masked.numel()
        self.stats.elements_received += u.numel()
        return (u - img).to(grad.dtype).reshape(*lead, self.in_features)


def _frozen_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W as (out, in), bias) of a frozen nn.Linear / GPT-2 Conv1D, else None."""
    if any(p.requires_grad for p in mod.parameters(recurse=False)):
        return None
    if isinstance(mod, nn.Linear):
        return mod.weight, mod.bias
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        w: torch.Tensor = mod.weight  # type: ignore[assignment]
        b: torch.Tensor | None = mod.bias  # type: ignore[assignment]
        return w.T, b
    return None


class OffloadEngine:
    """All masked layers of one model part + their shared pad source, host and counters."""

    def __init__(
        self, layers: dict[str, MaskedLinear], host: UntrustedLinearHost, stats: OffloadStats
    ) -> None:
        self.layers = layers
        self.host = host
        self.stats = stats

    def precompute(self, rows: int, *, backward: bool = True, skip: tuple[str, ...] = ()) -> float:
        """Make pads + images for the next ``rows`` token rows of every layer (offline phase).

        Layers whose name contains one of ``skip`` are left out (e.g. ``lm_head``, which the
        loss evaluates on a few labelled rows only: its pads are made on demand). Returns the
        seconds it took (also added to ``stats.precompute_s``).
        """
        if rows <= 0:
            raise ConfigError("rows must be positive")
        t0 = time.perf_counter()
        for name, layer in self.layers.items():
            if any(s in name for s in skip):
                continue
            layer.pool.precompute(rows, backward)
        dt = time.perf_counter() - t0
        self.stats.precompute_s += dt
        return dt


def offload_frozen_linears(
    module: nn.Module,
    host: UntrustedLinearHost | None = None,
    *,
    pad_bits: int = 24,
    skip: tuple[str, ...] = ("lora_",),
) -> OffloadEngine:
    """Replace every frozen linear map inside ``module`` with a :class:`MaskedLinear`.

    LoRA A/B (trainable, names with ``lora_``) stay inside. A peft ``lora.Linear``'s frozen
    ``base_layer`` is replaced in place, so LoRA keeps adding ``B A x`` on the plaintext input
    inside the TEE. Returns the engine (precompute pads, counters, the host's view).
    """
    host = host if host is not None else UntrustedLinearHost()
    source = PadSource(pad_bits)
    stats = OffloadStats()
    targets: list[tuple[nn.Module, str, str, torch.Tensor, torch.Tensor | None]] = []
    for pname, parent in module.named_modules():
        if any(s in pname for s in skip):
            continue
        for cname, child in parent.named_children():
            full = f"{pname}.{cname}" if pname else cname
            if any(s in full for s in skip) or isinstance(child, MaskedLinear):
                continue
            wb = _frozen_weight(child)
            if wb is not None:
                targets.append((parent, cname, full, wb[0], wb[1]))
    if not targets:
        raise ConfigError("no frozen linear layers to offload in this module")
    layers: dict[str, MaskedLinear] = {}
    for parent, cname, full, w, b in targets:
        ml = MaskedLinear(full, w, b, host, source, stats)
        setattr(parent, cname, ml)
        layers[full] = ml
    log.info("adapters-only mode: %d frozen linear maps offloaded under one-time pads", len(layers))
    return OffloadEngine(layers, host, stats)
