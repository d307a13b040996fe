"""Server side of split fine-tuning: the enclave object and the untrusted host loop around it.

* :class:`TuneEnclave` is what runs *inside* the TEE: the server part, the adapter, the
  optimizer, the step counter and the session key. It takes and returns opaque bytes only.
* :func:`serve_host` is the untrusted host process: it owns the network channel and the disk,
  forwards :class:`~veil.tune.messages.Sealed` frames to the enclave object and writes the
  sealed checkpoints it hands out. It never sees activations, labels or adapter weights.

With the ``simulated`` TEE backend (the default here) the "enclave" is an ordinary object in
the same process: the protocol is the same but there is no hardware protection, and every log
line and result says ``simulated``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Required, TypedDict, Unpack

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from veil.atomic import atomic_write_bytes
from veil.comm.codec import Codec, Message
from veil.errors import (
    ChannelClosed,
    DecryptionError,
    IntegrityError,
    PeerError,
    ProtocolError,
    ResourceLimitError,
    VeilError,
)
from veil.limits import SessionLimiter
from veil.tee import AttestedOffer, Enclave, EnclaveKeyExchange, KexFinish, KexRequest
from veil.tune.adapters import ServerAdapter
from veil.tune.messages import (
    AAD_TO_CLIENT,
    AAD_TO_ENCLAVE,
    INNER_REQUESTS,
    PROTOCOL_VERSION,
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
from veil.tune.split import (
    IGNORE_INDEX,
    ServerPart,
    head_last_logprobs,
    head_loss,
    head_sequence_logprobs,
    set_mode,
)

__all__ = [
    "EnclaveTrainerBase",
    "HostAction",
    "TrainerSettings",
    "TuneEnclave",
    "read_checkpoint",
    "serve_host",
    "write_checkpoint",
]

log = logging.getLogger("veil.tune")

CKPT_AAD = b"veil-tune-checkpoint-v1"


@dataclass
class HostAction:
    """What the enclave hands back to the host for one frame."""

    reply: bytes  # Sealed frame for the client
    sealed_checkpoint: bytes | None = None  # opaque blob for the host to store
    done: bool = False


class EnclaveTrainerBase:
    """What every tune enclave object holds: the TEE, the server part, its adapter and the
    AdamW settings (shared by :class:`TuneEnclave` and the multi-client enclave)."""

    def __init__(
        self,
        enclave: Enclave,
        part: ServerPart,
        adapter: ServerAdapter,
        *,
        model_id: str,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        self.enclave = enclave
        self.part = part
        self.adapter = adapter
        self.model_id = model_id
        self.lr = lr
        self.weight_decay = weight_decay

    def new_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the adapter's trainable parameters."""
        return torch.optim.AdamW(
            self.adapter.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay
        )


class TrainerSettings(TypedDict, total=False):
    """Keyword settings of :class:`EnclaveTrainerBase` (``model_id`` required)."""

    model_id: Required[str]
    lr: float
    weight_decay: float


class TuneEnclave(EnclaveTrainerBase):
    """Enclave-resident trainer: server part + adapter + AdamW + step counter + session."""

    def __init__(
        self,
        enclave: Enclave,
        part: ServerPart,
        adapter: ServerAdapter,
        *,
        checkpoint_every: int = 0,
        max_grad_norm: float | None = None,
        client_grad: bool = False,
        **settings: Unpack[TrainerSettings],
    ) -> None:
        super().__init__(enclave, part, adapter, **settings)
        self.client_grad = client_grad  # measured: a client can tell gradients will come back
        self.checkpoint_every = checkpoint_every
        self.max_grad_norm = max_grad_norm
        self._optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        self._micro = 0
        self._kx = EnclaveKeyExchange(enclave)
        self._session: Any = None
        self._codec = Codec()
        cfg = part.config
        self.hidden_size = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)))
        self.vocab_size = int(cfg.vocab_size)
        self.context_length = int(
            getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", 0)) or 0
        )
        if enclave.simulated:
            log.warning("tune enclave runs on a SIMULATED TEE (%s): no hardware protection", enclave.backend)

    # ------------------------------------------------------------------ key exchange
    def offer(self, nonce: bytes) -> AttestedOffer:
        return self._kx.offer(nonce)

    def finish_key_exchange(self, client_public: bytes) -> None:
        self._session = self._kx.finish(client_public)
        self._micro = 0
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the adapter's parameters (created on first use: an SPF adapter scored by
        gradient magnitude selects its weights on the first training micro-batch)."""
        if self._optimizer is None:
            self._optimizer = self.new_optimizer()
        return self._optimizer

    def _needs_calibration(self) -> bool:
        ad = self.adapter
        return bool(getattr(ad, "score", None) == "grad" and not getattr(ad, "_deltas", True))

    # ------------------------------------------------------------------ frames
    def handle(self, frame: bytes) -> HostAction:
        """Decrypt one client frame, act on it, return the encrypted reply.

        Raises :class:`DecryptionError` (state untouched) on a tampered, replayed, reordered or
        foreign frame; the host must then drop the connection.
        """
        if self._session is None:
            raise ProtocolError("no attested session yet: key exchange must come first")
        plaintext = self._session.decrypt(frame, AAD_TO_ENCLAVE)
        try:
            req: Message = self._codec.decode(plaintext, INNER_REQUESTS)
        except VeilError as e:
            return self._reply(EnclaveError(kind="ProtocolError", message=str(e), server_step=self.step))
        sealed: bytes | None = None
        done = False
        try:
            if isinstance(req, SessionInfoRequest):
                reply: Message = self._info(req)
            elif isinstance(req, TrainBatch):
                reply = self._train(req)
                if (
                    isinstance(reply, StepResult)
                    and reply.applied
                    and self.checkpoint_every > 0
                    and self.step % self.checkpoint_every == 0
                ):
                    sealed = self.sealed_state()
            elif isinstance(req, EvalBatch):
                reply = self._eval(req)
            elif isinstance(req, CheckpointRequest):
                sealed = self.sealed_state()
                reply = CheckpointDone(step=self.step)
            elif isinstance(req, Finish):
                if req.checkpoint:
                    sealed = self.sealed_state()
                reply = Finished(step=self.step)
                done = True
            else:  # pragma: no cover - decode restricts the types
                raise ProtocolError(f"unexpected request {type(req).__name__}")
        except VeilError as e:
            self._drop_partial_step()
            reply = EnclaveError(kind=type(e).__name__, message=str(e), server_step=self.step)
        return HostAction(reply=self._encrypt(reply), sealed_checkpoint=sealed, done=done)

    def _encrypt(self, msg: Message) -> bytes:
        return bytes(self._session.encrypt(self._codec.encode(msg), AAD_TO_CLIENT))

    def _reply(self, msg: Message) -> HostAction:
        return HostAction(reply=self._encrypt(msg))

    def _drop_partial_step(self) -> None:
        if self._micro:
            log.info("dropping %d accumulated micro-batch(es) of step %d", self._micro, self.step)
        self._micro = 0
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)

    def _info(self, req: SessionInfoRequest) -> SessionInfo:
        if req.protocol_version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {req.protocol_version} not supported ({PROTOCOL_VERSION})")
        return SessionInfo(
            protocol_version=PROTOCOL_VERSION,
            step=self.step,
            cut_layer=self.part.cut_layer,
            total_layers=self.part.total_layers,
            hidden_size=self.hidden_size,
            family=self.part.family,
            adapter=self.adapter.kind,
            model_id=self.model_id,
            context_length=self.context_length,
            simulated=bool(self.enclave.simulated),
            measurement=self.enclave.measurement,
            client_grad=self.client_grad,
        )

    def _tensors(
        self, hidden: Any, mask: Any, pos: Any, labels: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        arrs = {"hidden": hidden, "attention_mask": mask, "position_ids": pos, "labels": labels}
        for name, a in arrs.items():
            if not isinstance(a, np.ndarray):
                raise ProtocolError(f"{name} must be an array")
        if hidden.ndim != 3 or hidden.shape[2] != self.hidden_size:
            raise ProtocolError(
                f"hidden states must have shape (B, T, {self.hidden_size}), got {hidden.shape}"
            )
        if hidden.dtype not in (np.float32, np.float16):
            raise ProtocolError(f"hidden states must be float32/float16, got {hidden.dtype}")
        b, t = hidden.shape[:2]
        if b == 0 or t == 0:
            raise ProtocolError("empty batch")
        _check_shared_limits(b, t)  # hardening (issue 9): VEIL_LIMIT_* resource limits
        if self.context_length and t > self.context_length:
            raise ProtocolError(f"sequence of {t} tokens exceeds the model context ({self.context_length})")
        for name in ("attention_mask", "position_ids", "labels"):
            a = arrs[name]
            if a.shape != (b, t) or a.dtype.kind not in "iu":
                raise ProtocolError(f"{name} must be an integer array of shape ({b}, {t})")
        if not np.isin(mask, (0, 1)).all():
            raise ProtocolError("attention_mask must contain only 0 and 1")
        if pos.min() < 0 or (self.context_length and pos.max() >= self.context_length):
            raise ProtocolError("position ids out of range")
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.vocab_size))
        if bad.any():
            raise ProtocolError("labels out of the vocabulary range")
        h = torch.from_numpy(np.array(hidden, dtype=np.float32))
        if not torch.isfinite(h).all():
            raise ProtocolError("hidden states contain NaN/inf")
        dtype = next(self.part.parameters()).dtype
        return (
            h.to(dtype),
            torch.from_numpy(np.array(mask, dtype=np.int64)),
            torch.from_numpy(np.array(pos, dtype=np.int64)),
            torch.from_numpy(np.array(labels, dtype=np.int64)),
        )

    def _train(self, req: TrainBatch) -> StepResult:
        if req.step != self.step:
            raise ProtocolError(
                f"step {req.step} does not match the enclave's step {self.step}"
                + (" (already applied; never applied twice)" if req.step < self.step else "")
            )
        if req.n_micro <= 0 or not 0 <= req.micro < req.n_micro:
            raise ProtocolError(f"bad micro-batch index {req.micro}/{req.n_micro}")
        if req.micro != self._micro:
            raise ProtocolError(f"expected micro-batch {self._micro} of step {self.step}, got {req.micro}")
        if req.want_grad and not self.client_grad:
            raise ProtocolError(
                "this enclave returns no gradients (frozen client part: they would leak the labels); "
                "start it with a trainable client part to use that mode"
            )
        h, mask, pos, labels = self._tensors(req.hidden, req.attention_mask, req.position_ids, req.labels)
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            raise ProtocolError("micro-batch has no labelled tokens")
        if req.want_grad:
            h.requires_grad_(True)
        if self._needs_calibration():
            calibrate: Any = getattr(self.adapter, "calibrate")  # noqa: B009
            calibrate(h, mask, pos, labels)
            log.info("SPF weights selected by gradient magnitude on the first micro-batch")
        set_mode(self.part, True)
        loss = head_loss(self.adapter.final_hidden(h, mask, pos), self.part.lm_head, labels)
        (loss / req.n_micro).backward()
        grad = None
        if req.want_grad:
            if h.grad is None:  # pragma: no cover - the server part always depends on its input
                raise ProtocolError("no gradient reached the activations")
            grad = h.grad.detach().float().numpy().astype(np.float32, copy=False)
        applied = False
        if req.micro == req.n_micro - 1:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.adapter.trainable_parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._micro = 0
            applied = True
        else:
            self._micro += 1
        return StepResult(
            step=req.step,
            micro=req.micro,
            loss=float(loss.detach()),
            tokens=int(mask.sum()),
            applied=applied,
            server_step=self.step,
            grad_hidden=grad,
        )

    def _eval(self, req: EvalBatch) -> EvalResult:
        h, mask, pos, labels = self._tensors(req.hidden, req.attention_mask, req.position_ids, req.labels)
        set_mode(self.part, False)
        with torch.no_grad():
            fh = self.adapter.final_hidden(h, mask, pos)
            if req.candidates:
                cand = torch.tensor(req.candidates, dtype=torch.long)
                if cand.min() < 0 or cand.max() >= self.vocab_size:
                    raise ProtocolError("candidate token ids out of the vocabulary range")
                scores = head_last_logprobs(fh, self.part.lm_head, mask, cand)
                loss = float("nan")
            else:
                if not (labels[:, 1:] != IGNORE_INDEX).any():
                    raise ProtocolError("evaluation batch has no labelled tokens")
                scores = head_sequence_logprobs(fh, self.part.lm_head, labels)
                loss = float(head_loss(fh, self.part.lm_head, labels))
        return EvalResult(scores=scores.numpy().astype(np.float32), loss=loss)

    # ------------------------------------------------------------------ sealed state
    def state_bytes(self) -> bytes:
        """Adapter + optimizer + step counter as safetensors bytes (enclave-internal)."""
        tensors: dict[str, torch.Tensor] = {}
        for k, v in self.adapter.adapter_state().items():
            tensors[f"adapter/{k}"] = v.contiguous()
        params = self.adapter.trainable_parameters() if not self._needs_calibration() else []
        for i, p in enumerate(params):
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"opt/{i}/{key}"] = st[key].detach().clone().contiguous()
            if "step" in st:
                tensors[f"opt/{i}/step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
        meta = {
            "format": "veil-tune-state-v1",
            "step": str(self.step),
            "adapter": self.adapter.kind,
            "model_id": self.model_id,
            "lr": repr(self.lr),
        }
        return bytes(st_save(tensors, metadata=meta))

    def sealed_state(self) -> bytes:
        blob = self.enclave.seal(self.state_bytes(), aad=self._ckpt_aad())
        log.info(
            "sealed checkpoint at step %d (%d bytes%s)",
            self.step,
            len(blob),
            ", SIMULATED TEE" if self.enclave.simulated else "",
        )
        return blob

    def _ckpt_aad(self) -> bytes:
        return CKPT_AAD + b"|" + self.adapter.kind.encode() + b"|" + self.model_id.encode()

    def restore(self, sealed: bytes) -> int:
        """Unseal a checkpoint into this enclave; returns the restored step counter."""
        try:
            raw = self.enclave.unseal(sealed, aad=self._ckpt_aad())
        except DecryptionError as e:
            raise IntegrityError(f"checkpoint does not unseal in this enclave: {e}") from e
        self.load_state_bytes(raw)
        return self.step

    def load_state_bytes(self, raw: bytes) -> None:
        try:
            tensors = st_load(raw)
        except Exception as e:  # safetensors raises its own error types
            raise IntegrityError(f"checkpoint state is malformed: {e}") from e
        adapter_state = {k[len("adapter/") :]: v for k, v in tensors.items() if k.startswith("adapter/")}
        self.adapter.load_adapter_state(adapter_state)
        params = self.adapter.trainable_parameters()
        self._optimizer = self.new_optimizer()
        for i, p in enumerate(params):
            if f"opt/{i}/exp_avg" in tensors:
                self._optimizer.state[p] = {
                    "step": torch.tensor(float(tensors[f"opt/{i}/step"][0])),
                    "exp_avg": tensors[f"opt/{i}/exp_avg"].clone(),
                    "exp_avg_sq": tensors[f"opt/{i}/exp_avg_sq"].clone(),
                }
        meta = _safetensors_metadata(raw)
        if meta.get("adapter") != self.adapter.kind or meta.get("model_id") != self.model_id:
            raise IntegrityError("checkpoint was written for another adapter or model")
        self.step = int(meta.get("step", "0"))
        self._micro = 0

    # ------------------------------------------------------------------ export
    def export(self, owner_public: bytes, *, merged: bool = False) -> bytes:
        """Adapter-only or merged weights, encrypted inside the enclave to the model owner's key."""
        from veil.tune.export import encrypt_to_owner, export_payload

        if merged:
            tensors = self.adapter.export_merged()
            meta: dict[str, Any] = {"kind": "merged"}
        else:
            tensors, cfg = self.adapter.export_adapter()
            meta = {"kind": "adapter", "adapter_config": cfg}
        meta.update(
            {
                "adapter": self.adapter.kind,
                "model_id": self.model_id,
                "cut_layer": self.part.cut_layer,
                "step": self.step,
                "tee_backend": self.enclave.backend,
                "simulated": bool(self.enclave.simulated),
                "measurement": self.enclave.measurement,
            }
        )
        return encrypt_to_owner(export_payload(tensors, meta), owner_public)


def _check_shared_limits(batch: int, tokens: int) -> None:
    """Shared resource limits (veil.limits, env VEIL_LIMIT_*): batch rows and sequence length."""
    from veil.errors import ResourceLimitError
    from veil.limits import check_sequence_length, get_limits

    lim = get_limits()
    check_sequence_length(tokens, limits=lim)
    if batch > lim.max_batch_size:
        raise ResourceLimitError(
            f"batch of {batch} rows exceeds the limit of {lim.max_batch_size} (VEIL_LIMIT_MAX_BATCH_SIZE)"
        )


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    if len(raw) < 8:
        raise IntegrityError("checkpoint state is truncated")
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise IntegrityError("checkpoint state header is malformed") from e
    meta = header.get("__metadata__", {})
    return {str(k): str(v) for k, v in meta.items()}


# ---------------------------------------------------------------------- host side


def write_checkpoint(path: Path, blob: bytes) -> None:
    """Atomically replace ``path`` with ``blob`` (the host stores only sealed bytes)."""
    atomic_write_bytes(path, blob, mode=0o600)


def read_checkpoint(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


HostObserver = Callable[[str, Message], None]


def serve_host(
    channel: Any,
    tee: TuneEnclave,
    *,
    checkpoint_path: Path | None = None,
    observe: HostObserver | None = None,
    idle_timeout: float | None = None,
    sessions: SessionLimiter | None = None,
    client_id: str | None = None,
) -> int:
    """The untrusted host loop for one client connection; returns the enclave's final step.

    ``observe(direction, message)`` sees every message the host handles (for audits/tests).
    A frame the enclave rejects (tamper/replay) aborts the connection with a clear reason.
    Hardening (issue 9): at most ``VEIL_LIMIT_MAX_CONCURRENT_SESSIONS_PER_CLIENT`` sessions per
    client (``client_id``, else the channel's pinned peer fingerprint) run at once in this
    process (``sessions``: another :class:`SessionLimiter`); one more is aborted with the
    ResourceLimitError's message before the key exchange.
    """
    client = client_id or str(getattr(channel, "peer_fingerprint", "") or "anonymous")
    limiter = sessions if sessions is not None else _host_sessions()
    try:
        limiter.acquire(client)
    except ResourceLimitError as e:
        channel.abort(str(e))
        raise
    try:
        return _serve_session(channel, tee, checkpoint_path, observe, idle_timeout)
    finally:
        limiter.release(client)


@lru_cache(maxsize=1)
def _host_sessions() -> SessionLimiter:
    """This process's limiter of tune sessions per client (from veil.limits)."""
    return SessionLimiter()


def _serve_session(
    channel: Any,
    tee: TuneEnclave,
    checkpoint_path: Path | None,
    observe: HostObserver | None,
    idle_timeout: float | None,
) -> int:
    def seen(direction: str, msg: Any) -> Any:
        if observe is not None:
            observe(direction, msg)
        return msg

    req = seen("in", channel.recv(KexRequest, timeout=idle_timeout))
    offer = tee.offer(req.nonce)
    channel.send(seen("out", offer))
    try:
        fin = seen("in", channel.recv(KexFinish, timeout=idle_timeout))
    except PeerError as e:
        log.warning("client refused the enclave: %s", e)
        raise
    tee.finish_key_exchange(fin.public_key)
    while True:
        try:
            msg = seen("in", channel.recv(Sealed, timeout=idle_timeout))
        except ChannelClosed:
            log.info("client closed the connection at enclave step %d", tee.step)
            return tee.step
        try:
            action = tee.handle(msg.frame)
        except DecryptionError as e:
            channel.abort(f"frame rejected by the enclave: {e}")
            raise
        if action.sealed_checkpoint is not None and checkpoint_path is not None:
            write_checkpoint(checkpoint_path, action.sealed_checkpoint)
        channel.send(seen("out", Sealed(frame=action.reply)))
        if action.done:
            return tee.step


# ---------------------------------------------------------------------- construction


def enclave_code() -> list[Path | bytes]:
    """The code measured into the tune enclave: the veil.tune package sources."""
    return [Path(__file__).resolve().parent]


def enclave_config(
    *,
    model_id: str,
    cut_layer: int,
    adapter: str,
    lr: float,
    adapter_options: dict[str, Any] | None = None,
    client_grad: bool = False,
) -> dict[str, Any]:
    """The configuration measured into the enclave (client and server compute it the same way).

    ``client_grad`` (the enclave returns gradients w.r.t. the activations, for a trainable client
    part) is measured only when on, so frozen-client measurements are unchanged."""
    cfg: dict[str, Any] = {
        "app": "veil-tune-server",
        "protocol": PROTOCOL_VERSION,
        "model_id": model_id,
        "cut_layer": cut_layer,
        "adapter": adapter,
        "adapter_options": dict(sorted((adapter_options or {}).items())),
        "lr": lr,
    }
    if client_grad:
        cfg["client_grad"] = True
    return cfg


def expected_measurement(**config: Any) -> str:
    """What a client should pin in its Policy for this server configuration (the keyword
    arguments of :func:`enclave_config`)."""
    from veil.tee import measure

    return measure(enclave_code(), enclave_config(**config))


def build_tune_enclave(
    model: Any,
    *,
    cut_layer: int,
    adapter: str = "lora",
    model_id: str,
    lr: float = 1e-3,
    adapter_options: dict[str, Any] | None = None,
    tee_backend: str = "simulated",
    tee_options: dict[str, Any] | None = None,
    checkpoint_every: int = 0,
    seed: int | None = 0,
    client_grad: bool = False,
) -> TuneEnclave:
    """Load the TEE, slice ``model`` and build the adapter inside it.

    ``client_grad`` enables the trainable-client mode: the enclave returns the gradient w.r.t.
    the activations (which leaks information about the labels to the client, who owns them)."""
    from veil.tee import load_enclave
    from veil.tune.adapters import make_adapter
    from veil.tune.split import server_part

    cfg = enclave_config(
        model_id=model_id,
        cut_layer=cut_layer,
        adapter=adapter,
        lr=lr,
        adapter_options=adapter_options,
        client_grad=client_grad,
    )
    enclave = load_enclave(tee_backend, code=enclave_code(), config=cfg, **(tee_options or {}))
    if seed is not None:
        torch.manual_seed(seed)  # adapter initialisation (model weights, not a secret)
    part = server_part(model, cut_layer)
    ad = make_adapter(part, adapter, **(adapter_options or {}))
    return TuneEnclave(
        enclave,
        part,
        ad,
        model_id=model_id,
        lr=lr,
        checkpoint_every=checkpoint_every,
        client_grad=client_grad,
    )
