"""Embedding-inversion attacks on shallow activations, and what they recover from veil.

The attacker wants the client's private tokens back from what it observes. Three inversions
(as in "Embed Parrot"-style attacks), each mapping one token row ``h`` (hidden size H) to a
token guess:

* ``nearest-token``: argmax over the vocabulary of cos(h, E_v) (E = input embedding matrix);
* ``lm-head``: "logit lens" decoding, argmax of ``lm_head(final_norm(h))``;
* ``learned-linear``: a ridge-regression map M fitted on *public* text (pairs of observed
  rows and the embeddings of their tokens), then nearest-token on ``h M``. The attacker fits
  it on exactly the kind of observation it attacks (plaintext, or masked tensors).

Targets:

* ``plaintext``: the residual stream after ``k`` decoder layers (what a split-learning server
  without TEE would hold) for cut layers ``k`` = 1, 2, 5, 10;
* ``veil-ciphertext``: what veil's untrusted server host sees in split mode: the session frame
  carrying those activations. The attacker gets the best possible parse: the ciphertext bytes
  at exactly the offsets where the plaintext float32 activations sit (AES-GCM is a stream
  cipher, so positions are preserved), read as float32 (non-finite values set to 0);
* ``veil-otp``: what the untrusted host sees in adapters-only mode: the one-time-pad masked
  input of the first frozen matrix product after the cut (``input_layernorm(h_k) + r``).

Recovery rate = fraction of token positions guessed right. Chance levels: ``1/V`` and the
frequency of the most common token (what a constant guess gets).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from veil.errors import ConfigError, InputError

__all__ = [
    "InversionResult",
    "LinearInversion",
    "capture_cut_activations",
    "ciphertext_view",
    "lm_head_decode",
    "nearest_token",
    "otp_view",
    "recovery_rate",
    "run_inversion_suite",
]

log = logging.getLogger("veil.tune")

ATTACKS = ("nearest-token", "lm-head", "learned-linear")


def nearest_token(hidden: torch.Tensor, embedding: torch.Tensor, *, chunk: int = 2048) -> torch.Tensor:
    """Token id whose input embedding has the highest cosine similarity to each row."""
    h = F.normalize(hidden.reshape(-1, hidden.shape[-1]).float(), dim=-1)
    e = F.normalize(embedding.float(), dim=-1)
    out = [(h[i : i + chunk] @ e.T).argmax(dim=-1) for i in range(0, h.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def lm_head_decode(hidden: torch.Tensor, norm: Any, lm_head: Any, *, chunk: int = 512) -> torch.Tensor:
    """Argmax of the LM head applied to the final norm of each row (logit lens)."""
    h = hidden.reshape(-1, hidden.shape[-1]).float()
    with torch.no_grad():
        out = [lm_head(norm(h[i : i + chunk])).argmax(dim=-1) for i in range(0, h.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class LinearInversion:
    """Ridge map from observed rows to input embeddings, fitted on public text."""

    def __init__(self, embedding: torch.Tensor, *, ridge: float = 1e-2) -> None:
        self.embedding = embedding.detach().double()
        self.ridge = ridge
        self.m: torch.Tensor | None = None
        self.mu: torch.Tensor | None = None
        self.sd: torch.Tensor | None = None

    def fit(self, rows: torch.Tensor, tokens: torch.Tensor) -> LinearInversion:
        x = rows.reshape(-1, rows.shape[-1]).double()
        if x.shape[0] != tokens.numel() or x.shape[0] == 0:
            raise InputError("LinearInversion.fit needs one token per observed row")
        self.mu = x.mean(dim=0)
        self.sd = x.std(dim=0).clamp(min=1e-12)
        z = (x - self.mu) / self.sd
        y = self.embedding[tokens.reshape(-1)]
        a = z.T @ z + self.ridge * x.shape[0] * torch.eye(z.shape[1], dtype=torch.float64)
        self.m = torch.linalg.solve(a, z.T @ y)
        return self

    def predict(self, rows: torch.Tensor) -> torch.Tensor:
        if self.m is None or self.mu is None or self.sd is None:
            raise ConfigError("LinearInversion must be fitted first")
        z = (rows.reshape(-1, rows.shape[-1]).double() - self.mu) / self.sd
        return nearest_token(z @ self.m, self.embedding)


def recovery_rate(pred: torch.Tensor, true: torch.Tensor) -> float:
    if pred.numel() != true.numel() or true.numel() == 0:
        raise InputError("prediction and truth must have the same non-zero size")
    return float((pred.reshape(-1) == true.reshape(-1)).float().mean())


# ------------------------------------------------------------------------------ observations


def capture_cut_activations(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cuts: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Residual stream after ``k`` decoder layers for every ``k`` in ``cuts`` (one pass)."""
    from veil.tune.split import client_part, num_layers

    n = num_layers(model)
    if not cuts or min(cuts) < 1 or max(cuts) > n:
        raise ConfigError(f"cut layers must be in [1, {n}]")
    cp = client_part(model, max(cuts), copy_modules=False)
    got: dict[int, torch.Tensor] = {}
    hooks = []
    for k in cuts:

        def hook(_m: Any, _inp: Any, out: Any, k: int = k) -> None:
            got[k] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        hooks.append(cp.layers[str(k - 1)].register_forward_hook(hook))
    try:
        with torch.no_grad():
            cp(input_ids, attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return got


def otp_view(model: Any, hidden: torch.Tensor, cut: int) -> torch.Tensor:
    """What the untrusted host receives, in adapters-only mode, for the first frozen matrix
    product after the cut (layer ``cut``'s q_proj input, one-time-pad masked)."""
    from veil.tune.otp import MaskedLinear, OffloadStats, PadSource, UntrustedLinearHost
    from veil.tune.split import model_family

    if model_family(model) != "llama":
        raise ConfigError("otp_view is implemented for Llama-like models")
    layer = model.model.layers[cut]
    host = UntrustedLinearHost(record=True)
    q = layer.self_attn.q_proj
    ml = MaskedLinear(f"layers.{cut}.self_attn.q_proj", q.weight, q.bias, host, PadSource(), OffloadStats())
    with torch.no_grad():
        ml(layer.input_layernorm(hidden))
    return host.seen[0].tensor.float()


def ciphertext_view(hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The session frame that carries ``hidden`` in split mode, read by the host as float32
    at the plaintext activations' own offsets (best-case parse); shape of ``hidden``."""
    from veil.comm.codec import Codec
    from veil.crypto.random import random_bytes
    from veil.crypto.session import SecureSession
    from veil.tune.messages import AAD_TO_ENCLAVE, TrainBatch

    h = np.ascontiguousarray(hidden.detach().float().numpy())
    b, t = h.shape[:2]
    msg = TrainBatch(
        step=0,
        micro=0,
        n_micro=1,
        hidden=h,
        attention_mask=attention_mask.numpy().astype(np.int64),
        position_ids=np.tile(np.arange(t, dtype=np.int64), (b, 1)),
        labels=labels.numpy().astype(np.int64),
    )
    plain = Codec().encode(msg)
    off = plain.find(h.tobytes())
    if off < 0:
        raise InputError("activations not found contiguously in the encoded frame")
    sess = SecureSession.from_shared_secret(random_bytes(32), initiator=True)
    frame = sess.encrypt(plain, AAD_TO_ENCLAVE)
    header = len(frame) - len(plain) - 16  # seq prefix; the 16-byte GCM tag is at the end
    raw = frame[header + off : header + off + h.nbytes]
    vals = np.frombuffer(raw, dtype="<f4").astype(np.float32).copy()
    vals[~np.isfinite(vals)] = 0.0
    return torch.from_numpy(vals.reshape(h.shape))


# ------------------------------------------------------------------------------- the suite


@dataclass
class InversionResult:
    target: str  # plaintext | veil-ciphertext | veil-otp
    cut_layer: int
    attack: str
    recovery: float
    tokens: int
    chance_uniform: float
    chance_majority: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, h.shape[-1])[mask.reshape(-1).bool()]


def run_inversion_suite(
    model: Any,
    public: tuple[torch.Tensor, torch.Tensor],
    private: tuple[torch.Tensor, torch.Tensor],
    *,
    cuts: Sequence[int] = (1, 2, 5, 10),
    targets: Sequence[str] = ("plaintext", "veil-ciphertext", "veil-otp"),
    ridge: float = 1e-2,
) -> list[InversionResult]:
    """All attacks x targets x cut layers. ``public`` / ``private`` = (input_ids, attention_mask);
    the learned inversion is fitted on ``public`` only and evaluated on ``private``."""
    from veil.tune.split import model_family

    fam = model_family(model)
    emb = (model.model.embed_tokens if fam == "llama" else model.transformer.wte).weight.detach()
    norm = model.model.norm if fam == "llama" else model.transformer.ln_f
    vocab = int(emb.shape[0])
    pub_ids, pub_mask = public
    prv_ids, prv_mask = private
    true = _rows(prv_ids.unsqueeze(-1), prv_mask).reshape(-1)
    pub_true = _rows(pub_ids.unsqueeze(-1), pub_mask).reshape(-1)
    counts = Counter(true.tolist())
    majority = counts.most_common(1)[0][1] / true.numel()
    pub_act = capture_cut_activations(model, pub_ids, pub_mask, cuts)
    prv_act = capture_cut_activations(model, prv_ids, prv_mask, cuts)
    labels = prv_ids.clone()
    results: list[InversionResult] = []
    for k in cuts:
        for target in targets:
            if target == "plaintext":
                obs_pub, obs_prv = pub_act[k], prv_act[k]
            elif target == "veil-ciphertext":
                obs_pub = ciphertext_view(pub_act[k], pub_mask, pub_ids.clone())
                obs_prv = ciphertext_view(prv_act[k], prv_mask, labels)
            elif target == "veil-otp":
                if fam != "llama":
                    continue
                obs_pub = otp_view(model, pub_act[k], k).reshape((*pub_act[k].shape[:2], -1))
                obs_prv = otp_view(model, prv_act[k], k).reshape((*prv_act[k].shape[:2], -1))
            else:
                raise ConfigError(f"unknown attack target {target!r}")
            rp, rv = _rows(obs_pub, pub_mask), _rows(obs_prv, prv_mask)
            preds = {
                "nearest-token": nearest_token(rv, emb),
                "lm-head": lm_head_decode(rv, norm, model.lm_head),
                "learned-linear": LinearInversion(emb, ridge=ridge).fit(rp, pub_true).predict(rv),
            }
            for attack in ATTACKS:
                rate = recovery_rate(preds[attack], true)
                results.append(
                    InversionResult(target, k, attack, rate, int(true.numel()), 1.0 / vocab, majority)
                )
                log.info("inversion %s cut=%d %s: %.3f", target, k, attack, rate)
    return results
