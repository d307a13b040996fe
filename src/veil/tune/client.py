"""Client (data owner) side of split fine-tuning.

The client runs the embedding and the first ``k`` frozen layers, verifies the server enclave's
attestation *before anything else*, and then sends activations, masks, positions and labels
only inside the attested :class:`~veil.crypto.session.SecureSession`. Because the client part
is frozen, no gradient ever comes back (gradients w.r.t. activations would leak labels).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from veil.comm.codec import Codec, Message
from veil.errors import AttestationError, ConfigError, InputError, ProtocolError
from veil.tee import AttestedOffer, KexFinish, KexRequest, Verifier, client_key_exchange, new_nonce
from veil.tune.data import Batch, EncodedExample, batch_schedule, collate
from veil.tune.messages import (
    AAD_TO_CLIENT,
    AAD_TO_ENCLAVE,
    INNER_REPLIES,
    CheckpointDone,
    CheckpointRequest,
    EnclaveError,
    EvalBatch,
    EvalResult,
    Finish,
    Finished,
    Sealed,
    SessionInfo,
    SessionInfoRequest,
    StepResult,
    TrainBatch,
)
from veil.tune.split import Activations, ClientPart, set_mode

__all__ = ["StepRecord", "TrainHistory", "TuneClient", "evaluate_classification", "train_split"]

log = logging.getLogger("veil.tune")


class EnclaveRefused(ProtocolError):
    """The enclave refused a request (its state is unchanged)."""


class TuneClient:
    """One attested connection to a tune enclave server."""

    def __init__(
        self,
        channel: Any,
        part: ClientPart,
        verifier: Verifier,
        *,
        wire_dtype: str = "float32",
        timeout: float | None = None,
        client_optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """``client_optimizer`` (over the client part's trainable parameters, e.g. from
        :func:`veil.tune.adapters.add_client_lora`) turns on the trainable-client mode: the
        enclave must have been built with ``client_grad=True``; it returns the gradient w.r.t.
        the activations and the client steps its own optimizer with the enclave's."""
        if wire_dtype not in ("float32", "float16"):
            raise ConfigError("wire_dtype must be float32 or float16")
        if client_optimizer is not None and not any(p.requires_grad for p in part.parameters()):
            raise ConfigError("a client optimizer needs trainable parameters in the client part")
        self.client_optimizer = client_optimizer
        self.channel = channel
        self.part = part
        self.verifier = verifier
        self.wire_dtype = np.dtype(wire_dtype)
        self.timeout = timeout
        self._codec = Codec()
        self._session: Any = None
        self.info: SessionInfo | None = None

    # ------------------------------------------------------------------ handshake
    def connect(self) -> SessionInfo:
        """Attested key exchange; refuses (AttestationError) without sending any data."""
        nonce = new_nonce()
        self.channel.send(KexRequest(nonce=nonce))
        offer = self.channel.recv(AttestedOffer, timeout=self.timeout)
        try:
            client_public, session = client_key_exchange(offer, self.verifier, nonce)
        except AttestationError as e:
            log.error("refusing the server enclave: %s", e)
            self.channel.abort("client refused the enclave attestation")
            raise
        self.channel.send(KexFinish(public_key=client_public))
        self._session = session
        info = self._call(SessionInfoRequest(), SessionInfo)
        if info.cut_layer != self.part.cut_layer or info.total_layers != self.part.total_layers:
            raise ConfigError(
                f"server cuts the model at layer {info.cut_layer}/{info.total_layers} but this client part "
                f"is cut at {self.part.cut_layer}/{self.part.total_layers}"
            )
        if self.client_optimizer is not None and not info.client_grad:
            raise ConfigError("the client part is trainable but this enclave returns no gradients")
        self.info = info
        label = "SIMULATED TEE" if info.simulated else "TEE"
        log.info("connected to %s enclave %s at step %d", label, info.measurement[:16], info.step)
        return info

    def _call(self, req: Message, expect: type[Any]) -> Any:
        if self._session is None:
            raise ProtocolError("not connected: call connect() first")
        frame = self._session.encrypt(self._codec.encode(req), AAD_TO_ENCLAVE)
        self.channel.send(Sealed(frame=frame))
        reply = self.channel.recv(Sealed, timeout=self.timeout)
        msg: Message = self._codec.decode(self._session.decrypt(reply.frame, AAD_TO_CLIENT), INNER_REPLIES)
        if isinstance(msg, EnclaveError):
            raise EnclaveRefused(f"enclave refused {type(req).__name__}: {msg.kind}: {msg.message}")
        if not isinstance(msg, expect):
            raise ProtocolError(f"expected {expect.__name__} from the enclave, got {type(msg).__name__}")
        return msg

    # ------------------------------------------------------------------ work
    def activations(self, batch: Batch) -> Activations:
        set_mode(self.part, False)
        with torch.no_grad():
            return self.part(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))

    def _arrays(
        self, act: Activations
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        return (
            act.hidden_states.detach().float().numpy().astype(self.wire_dtype, copy=False),
            act.attention_mask.numpy().astype(np.int64, copy=False),
            act.position_ids.numpy().astype(np.int64, copy=False),
        )

    def train_micro(self, batch: Batch, step: int, micro: int = 0, n_micro: int = 1) -> StepResult:
        trainable = self.client_optimizer is not None
        if trainable:
            set_mode(self.part, True)
            act = self.part(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
        else:
            act = self.activations(batch)
        h, m, p = self._arrays(act)
        req = TrainBatch(
            step=step,
            micro=micro,
            n_micro=n_micro,
            hidden=h,
            attention_mask=m,
            position_ids=p,
            labels=batch.labels,
            want_grad=trainable,
        )
        res: StepResult = self._call(req, StepResult)
        if self.client_optimizer is not None:
            g = res.grad_hidden
            if not isinstance(g, np.ndarray) or g.shape != tuple(act.hidden_states.shape):
                raise ProtocolError("the enclave returned no or a mis-shaped activation gradient")
            act.hidden_states.backward(torch.from_numpy(np.asarray(g, dtype=np.float32)))
            if res.applied:
                self.client_optimizer.step()
                self.client_optimizer.zero_grad(set_to_none=True)
        return res

    def score(self, batch: Batch, candidates: Sequence[int] = ()) -> EvalResult:
        h, m, p = self._arrays(self.activations(batch))
        res: EvalResult = self._call(
            EvalBatch(
                hidden=h, attention_mask=m, position_ids=p, labels=batch.labels, candidates=list(candidates)
            ),
            EvalResult,
        )
        return res

    def checkpoint(self) -> int:
        res: CheckpointDone = self._call(CheckpointRequest(), CheckpointDone)
        return res.step

    def finish(self, checkpoint: bool = True) -> int:
        res: Finished = self._call(Finish(checkpoint=checkpoint), Finished)
        return res.step

    @property
    def bytes_sent(self) -> int:
        return int(self.channel.stats.bytes_sent)

    @property
    def bytes_received(self) -> int:
        return int(self.channel.stats.bytes_received)


# ---------------------------------------------------------------------- training driver


@dataclass
class StepRecord:
    step: int
    loss: float
    tokens: int
    seconds: float
    bytes_sent: int


@dataclass
class TrainHistory:
    start_step: int = 0
    final_step: int = 0
    steps: list[StepRecord] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]


StepTrainer = Callable[[Batch, int, int, int], StepResult]
ProgressFn = Callable[[StepRecord, int], None]


def train_split(
    train_step: StepTrainer,
    examples: Sequence[EncodedExample],
    *,
    pad_id: int,
    batch_size: int,
    grad_accum: int = 1,
    epochs: int = 1,
    seed: int = 0,
    max_steps: int | None = None,
    start_step: int = 0,
    bytes_sent: Callable[[], int] | None = None,
    on_step: ProgressFn | None = None,
    eval_every: int = 0,
    eval_fn: Callable[[int], float] | None = None,
    stop_after: int | None = None,
) -> TrainHistory:
    """Run optimizer steps ``start_step..`` over a deterministic micro-batch schedule.

    ``train_step(batch, step, micro, n_micro)`` is :meth:`TuneClient.train_micro` (or a local
    equivalent). The schedule depends only on ``seed``, so a resumed run re-sends exactly the
    micro-batches of the enclave's next step. ``stop_after`` stops after that many steps of
    this call (used to simulate a crash).
    """
    if grad_accum <= 0:
        raise ConfigError("grad_accum must be positive")
    if not examples:
        raise InputError("no training examples")
    micro = batch_schedule(len(examples), batch_size=batch_size, epochs=epochs, seed=seed)
    n_steps = len(micro) // grad_accum
    if max_steps is not None:
        n_steps = min(n_steps, max_steps)
    if n_steps == 0:
        raise InputError(f"{len(examples)} examples give no full step of {batch_size}x{grad_accum}")
    hist = TrainHistory(start_step=start_step, final_step=start_step)
    done_here = 0
    for s in range(start_step, n_steps):
        if stop_after is not None and done_here >= stop_after:
            break
        t0 = time.perf_counter()
        b0 = bytes_sent() if bytes_sent else 0
        losses: list[float] = []
        tokens = 0
        for m in range(grad_accum):
            batch = collate([examples[i] for i in micro[s * grad_accum + m]], pad_id)
            res = train_step(batch, s, m, grad_accum)
            losses.append(res.loss)
            tokens += res.tokens
        rec = StepRecord(
            step=s,
            loss=float(np.mean(losses)),
            tokens=tokens,
            seconds=time.perf_counter() - t0,
            bytes_sent=(bytes_sent() - b0) if bytes_sent else 0,
        )
        hist.steps.append(rec)
        hist.final_step = s + 1
        done_here += 1
        if on_step is not None:
            on_step(rec, n_steps)
        if eval_fn is not None and eval_every > 0 and (s + 1) % eval_every == 0:
            hist.evals.append((s + 1, eval_fn(s + 1)))
    return hist


def evaluate_classification(
    score: Callable[[Batch, Sequence[int]], EvalResult],
    examples: Sequence[EncodedExample],
    label_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
) -> float:
    """Accuracy = argmax over the label continuations' log-likelihood.

    Single-token labels: one forward per prompt, scoring the candidate tokens at the last
    prompt position. Multi-token labels: one sequence per (example, label), summed log-probs.
    """
    if not examples:
        raise InputError("no evaluation examples")
    if any(e.label is None for e in examples):
        raise InputError("classification accuracy needs labelled examples")
    correct = 0
    if all(len(t) == 1 for t in label_ids):
        cands = [t[0] for t in label_ids]
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            prompts = [
                EncodedExample(
                    input_ids=e.input_ids[: e.prompt_len],
                    labels=[-100] * e.prompt_len,
                    prompt_len=e.prompt_len,
                    label=e.label,
                )
                for e in chunk
            ]
            res = score(collate(prompts, pad_id), cands)
            pred = np.asarray(res.scores).argmax(axis=1)
            correct += sum(int(p == e.label) for p, e in zip(pred, chunk, strict=True))
    else:
        for e in examples:
            p = e.input_ids[: e.prompt_len]
            rows = [
                EncodedExample(input_ids=p + list(t), labels=[-100] * len(p) + list(t), prompt_len=len(p))
                for t in label_ids
            ]
            res = score(collate(rows, pad_id), [])
            correct += int(int(np.asarray(res.scores).argmax()) == e.label)
    return correct / len(examples)
