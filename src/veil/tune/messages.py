"""Wire messages of split fine-tuning.

Two layers:

* **Host-visible** (plain :class:`veil.comm.Message`): the attested key exchange
  (:class:`veil.tee.KexRequest` / :class:`veil.tee.AttestedOffer` / :class:`veil.tee.KexFinish`)
  and :class:`Sealed`, an opaque SecureSession frame (``seq || AES-GCM ciphertext``). The
  untrusted server host sees only these.
* **Enclave-only** (``Inner*``): encoded with the veil codec, then encrypted into a
  :class:`Sealed` frame by the client or the enclave. Activations, masks, positions and labels
  travel only inside them.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from veil.comm.codec import Message

__all__ = [
    "INNER_REPLIES",
    "INNER_REQUESTS",
    "PROTOCOL_VERSION",
    "CheckpointDone",
    "CheckpointRequest",
    "EnclaveError",
    "EvalBatch",
    "EvalResult",
    "Finish",
    "Finished",
    "Sealed",
    "SessionInfo",
    "SessionInfoRequest",
    "StepResult",
    "TrainBatch",
]

PROTOCOL_VERSION = 1
AAD_TO_ENCLAVE = b"veil-tune-v1:client->enclave"
AAD_TO_CLIENT = b"veil-tune-v1:enclave->client"


class Sealed(Message, frozen=True, tag="tune.Sealed"):
    """An encrypted frame of the attested session; opaque to the server host."""

    frame: bytes


# ------------------------------------------------------------------ inside the session


class SessionInfoRequest(Message, frozen=True, tag="tune.InfoReq"):
    protocol_version: int = PROTOCOL_VERSION


class SessionInfo(Message, frozen=True, tag="tune.Info"):
    protocol_version: int
    step: int  # optimizer steps already applied (from the sealed checkpoint on resume)
    cut_layer: int
    total_layers: int
    hidden_size: int
    family: str
    adapter: str
    model_id: str
    context_length: int
    simulated: bool
    measurement: str
    client_grad: bool = False  # the enclave returns d loss / d activations (trainable-client mode)


class TrainBatch(Message, frozen=True, tag="tune.Train"):
    """One micro-batch of optimizer step ``step`` (``micro`` of ``n_micro``)."""

    step: int
    micro: int
    n_micro: int
    hidden: np.ndarray[Any, Any]  # (B, T, H) float32 or float16
    attention_mask: np.ndarray[Any, Any]  # (B, T) int64
    position_ids: np.ndarray[Any, Any]  # (B, T) int64
    labels: np.ndarray[Any, Any]  # (B, T) int64, -100 = ignored
    want_grad: bool = False  # trainable-client mode only: return the gradient w.r.t. ``hidden``


class StepResult(Message, frozen=True, tag="tune.StepRes"):
    step: int
    micro: int
    loss: float
    tokens: int
    applied: bool  # True when this micro-batch completed the step and the optimizer ran
    server_step: int
    # trainable-client mode only: d (loss / n_micro) / d hidden, (B, T, H) float32
    grad_hidden: np.ndarray[Any, Any] | None = None


class EvalBatch(Message, frozen=True, tag="tune.Eval"):
    """Score rows: ``candidates`` non-empty → log-probs of each candidate token at the last real
    position of each row, shape (B, C); else → per-row summed log-likelihood of ``labels`` and
    the mean loss."""

    hidden: np.ndarray[Any, Any]
    attention_mask: np.ndarray[Any, Any]
    position_ids: np.ndarray[Any, Any]
    labels: np.ndarray[Any, Any]
    candidates: list[int] = msgspec.field(default_factory=list)


class EvalResult(Message, frozen=True, tag="tune.EvalRes"):
    scores: np.ndarray[Any, Any]
    loss: float


class CheckpointRequest(Message, frozen=True, tag="tune.CkptReq"):
    pass


class CheckpointDone(Message, frozen=True, tag="tune.Ckpt"):
    step: int


class Finish(Message, frozen=True, tag="tune.Finish"):
    checkpoint: bool = True


class Finished(Message, frozen=True, tag="tune.Finished"):
    step: int


class EnclaveError(Message, frozen=True, tag="tune.Error"):
    """The enclave refused a request; its state is unchanged."""

    kind: str
    message: str
    server_step: int


INNER_REQUESTS: tuple[type[Message], ...] = (
    SessionInfoRequest,
    TrainBatch,
    EvalBatch,
    CheckpointRequest,
    Finish,
)
INNER_REPLIES: tuple[type[Message], ...] = (
    SessionInfo,
    StepResult,
    EvalResult,
    CheckpointDone,
    Finished,
    EnclaveError,
)
