"""Several clients co-train one model: (a) split mode, one enclave serving several clients;
(b) federated mode, adapters tuned in each client's TEE and averaged in the server enclave.

**Split mode** (:class:`MultiClientTuneEnclave`, :func:`serve_multi_host`): one server part +
adapter + optimizer inside the enclave; every client gets its own attested session (its own
:class:`~veil.tune.enclave_server.TuneEnclave` *view* over the shared model) and its own
step counter. Host threads serve the clients interleaved; the enclave handles one frame at
a time and keeps each client's accumulated gradients apart (they are swapped in and out
around each frame), so a client's gradient accumulation is never mixed with another's.

**Federated mode** (:class:`FedAvgEnclave`, :func:`serve_federated_host`,
:class:`FederatedClientEnclave`, :func:`run_federated_client`): each round the server
enclave sends the global adapter to every client over its session; each client trains it
locally for a few steps inside its own (simulated) TEE and returns it with its example
count; the enclave averages (FedAvg, weighted by examples) and sends the new average back.

**Client attestation** (both modes, optional on the server: ``client_verifier``): instead of
a plain :class:`~veil.tee.KexFinish` the client sends :class:`ClientAttestedFinish`, whose
evidence binds ``SHA-256("veil-tune-client" || client_key || enclave_key || nonce)``. A
client whose evidence fails the server's policy (or that refuses the server's) is excluded;
the others continue.

Adapter weights cross the wire only as safetensors bytes inside the encrypted session.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from veil.comm.codec import Codec, Message
from veil.errors import (
    AttestationError,
    ChannelClosed,
    ConfigError,
    DecryptionError,
    InputError,
    ProtocolError,
    VeilError,
)
from veil.tee import (
    AttestedOffer,
    Enclave,
    EnclaveKeyExchange,
    Evidence,
    KexFinish,
    KexRequest,
    Verifier,
    client_key_exchange,
    new_nonce,
    pad_report_data,
)
from veil.tune.adapters import ServerAdapter
from veil.tune.client import TuneClient
from veil.tune.data import EncodedExample, batch_schedule, collate
from veil.tune.enclave_server import EnclaveTrainerBase, HostAction, TrainerSettings, TuneEnclave
from veil.tune.messages import Sealed
from veil.tune.split import ClientPart, ServerPart, head_loss, set_mode

__all__ = [
    "AttestedTuneClient",
    "ClientAttestedFinish",
    "ClientOutcome",
    "FedAvgEnclave",
    "FedGlobal",
    "FedUpdate",
    "FederatedClientEnclave",
    "MultiClientTuneEnclave",
    "client_report_data",
    "fedavg",
    "partition_by_topic",
    "run_federated_client",
    "serve_federated_host",
    "serve_multi_host",
]

log = logging.getLogger("veil.tune")

AAD_FED_TO_CLIENT = b"veil-tune-fed-v1:server->client"
AAD_FED_TO_SERVER = b"veil-tune-fed-v1:client->server"


# ----------------------------------------------------------------------------------- messages


class ClientAttestedFinish(Message, frozen=True, tag="tune.fed.ClientFinish"):
    """client -> enclave: the client's key exchange public key + its own TEE's evidence."""

    public_key: bytes
    evidence: Evidence


class FedGlobal(Message, frozen=True, tag="tune.fed.Global"):
    """server enclave -> client (inside the session): the global adapter of round ``round``."""

    round: int
    weights: bytes  # safetensors
    final: bool


class FedUpdate(Message, frozen=True, tag="tune.fed.Update"):
    """client -> server enclave (inside the session): the locally tuned adapter."""

    round: int
    n_examples: int
    weights: bytes  # safetensors
    loss: float


def client_report_data(client_public: bytes, enclave_public: bytes, nonce: bytes) -> bytes:
    """What a client TEE's evidence must carry: binds its key to this exchange."""
    h = hashlib.sha256(b"veil-tune-client" + bytes(client_public) + bytes(enclave_public) + bytes(nonce))
    return pad_report_data(h.digest())


def _verify_client(
    verifier: Verifier | None, fin: KexFinish | ClientAttestedFinish, offer: AttestedOffer, nonce: bytes
) -> None:
    """Server-side check of a client's own attestation (no-op without a client verifier)."""
    if verifier is None:
        return
    if not isinstance(fin, ClientAttestedFinish):
        raise AttestationError("client sent no TEE evidence but the server requires client attestation")
    verifier.verify(fin.evidence, report_data=client_report_data(fin.public_key, offer.public_key, nonce))


def _tensors_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    return bytes(st_save({k: v.detach().contiguous().cpu() for k, v in state.items()}))


def _bytes_to_tensors(raw: bytes, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes and check names, shapes and finiteness against ``like``."""
    try:
        out = dict(st_load(bytes(raw)))
    except Exception as e:  # safetensors raises its own error types
        raise ProtocolError(f"adapter weights are not valid safetensors: {e}") from e
    if set(out) != set(like):
        raise ProtocolError("adapter weights do not have the expected tensor names")
    for k, t in out.items():
        if tuple(t.shape) != tuple(like[k].shape):
            raise ProtocolError(
                f"adapter tensor {k} has shape {tuple(t.shape)}, expected {tuple(like[k].shape)}"
            )
        if not torch.isfinite(t).all():
            raise ProtocolError(f"adapter tensor {k} contains NaN/inf")
    return out


# ------------------------------------------------------------------------------ FedAvg, data


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of adapter states: ``sum_i w_i * state_i / sum_i w_i`` (float64 accumulation)."""
    if not states or len(states) != len(weights):
        raise InputError("fedavg needs one weight per state and at least one state")
    if any(w <= 0 for w in weights):
        raise InputError("fedavg weights (example counts) must be positive")
    keys = set(states[0])
    if any(set(s) != keys for s in states):
        raise InputError("fedavg: adapter states have different tensor names")
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for k in sorted(keys):
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[k].to(torch.float64) * (float(w) / total)
        out[k] = acc.to(states[0][k].dtype)
    return out


def partition_by_topic(
    examples: Sequence[EncodedExample], n_clients: int, *, n_classes: int | None = None
) -> list[list[EncodedExample]]:
    """Non-IID split: class ``c`` goes wholly to client ``c % n_clients`` (e.g. 3 clients over
    BBC's 5 topics: {business, sports}, {entertainment, tech}, {politics})."""
    if n_clients <= 0:
        raise ConfigError("n_clients must be positive")
    if any(e.label is None for e in examples):
        raise InputError("partition_by_topic needs labelled examples")
    classes = sorted({int(e.label) for e in examples if e.label is not None})
    nc = n_classes if n_classes is not None else (max(classes) + 1 if classes else 0)
    if nc < n_clients:
        raise ConfigError(f"{nc} topics cannot give {n_clients} clients a topic each")
    parts: list[list[EncodedExample]] = [[] for _ in range(n_clients)]
    for e in examples:
        parts[int(e.label or 0) % n_clients].append(e)
    if any(not p for p in parts):
        raise InputError("a client got no examples; use fewer clients")
    return parts


# ------------------------------------------------------------------------ (a) split, N clients


@dataclass
class ClientOutcome:
    """How one client's connection ended on the server host."""

    client_id: str
    steps: int = 0
    excluded: str | None = None  # reason, when the client was excluded

    @property
    def ok(self) -> bool:
        return self.excluded is None


class MultiClientTuneEnclave(EnclaveTrainerBase):
    """One server part + adapter + optimizer shared by several attested client sessions."""

    def __init__(
        self,
        enclave: Enclave,
        part: ServerPart,
        adapter: ServerAdapter,
        *,
        client_verifier: Verifier | None = None,
        **settings: Unpack[TrainerSettings],
    ) -> None:
        super().__init__(enclave, part, adapter, **settings)
        self.client_verifier = client_verifier
        self.optimizer = self.new_optimizer()
        self.views: dict[str, TuneEnclave] = {}
        self._grads: dict[str, list[torch.Tensor | None]] = {}
        self._lock = threading.RLock()
        self._pending: dict[str, tuple[AttestedOffer, bytes]] = {}

    @property
    def total_steps(self) -> int:
        return sum(v.step for v in self.views.values())

    def _view(self, client_id: str) -> TuneEnclave:
        v = self.views.get(client_id)
        if v is None:
            v = TuneEnclave(
                self.enclave,
                self.part,
                self.adapter,
                model_id=self.model_id,
                lr=self.lr,
                weight_decay=self.weight_decay,
            )
            v._optimizer = self.optimizer  # one optimizer for the shared adapter
            self.views[client_id] = v
            self._grads[client_id] = [None] * len(self.adapter.trainable_parameters())
        return v

    def offer(self, client_id: str, nonce: bytes) -> AttestedOffer:
        with self._lock:
            offer = self._view(client_id).offer(nonce)
            self._pending[client_id] = (offer, bytes(nonce))
            return offer

    def finish_key_exchange(self, client_id: str, fin: KexFinish | ClientAttestedFinish) -> None:
        """Check the client's own evidence (when required), then derive its session."""
        with self._lock:
            pending = self._pending.pop(client_id, None)
            if pending is None:
                raise ProtocolError(f"client {client_id}: key exchange finish without an offer")
            _verify_client(self.client_verifier, fin, pending[0], pending[1])
            self._swapped(client_id, lambda: self._view(client_id).finish_key_exchange(fin.public_key))

    def _swapped(self, client_id: str, fn: Callable[[], Any]) -> Any:
        params = self.adapter.trainable_parameters()
        saved = self._grads[client_id]
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        try:
            return fn()
        finally:
            self._grads[client_id] = [p.grad for p in params]
            for p in params:
                p.grad = None

    def handle(self, client_id: str, frame: bytes) -> HostAction:
        """One frame of one client, with that client's gradient buffers swapped in."""
        with self._lock:
            if client_id not in self.views:
                raise ProtocolError(f"unknown client {client_id!r}")
            view = self.views[client_id]
            action: HostAction = self._swapped(client_id, lambda: view.handle(frame))
            return action

    def drop(self, client_id: str) -> None:
        with self._lock:
            self.views.pop(client_id, None)
            self._grads.pop(client_id, None)
            self._pending.pop(client_id, None)


def _serve_one(channel: Any, tee: MultiClientTuneEnclave, cid: str, timeout: float | None) -> ClientOutcome:
    out = ClientOutcome(cid)
    try:
        req = channel.recv(KexRequest, timeout=timeout)
        channel.send(tee.offer(cid, req.nonce))
        fin = channel.recv((KexFinish, ClientAttestedFinish), timeout=timeout)
        try:
            tee.finish_key_exchange(cid, fin)
        except AttestationError as e:
            channel.abort(f"client attestation refused: {e}")
            raise
        while True:
            try:
                msg = channel.recv(Sealed, timeout=timeout)
            except ChannelClosed:
                break
            try:
                action = tee.handle(cid, msg.frame)
            except DecryptionError as e:
                channel.abort(f"frame rejected by the enclave: {e}")
                raise
            channel.send(Sealed(frame=action.reply))
            if action.done:
                break
    except VeilError as e:
        out.excluded = f"{type(e).__name__}: {e}"
        log.warning("client %s excluded: %s", cid, out.excluded)
        tee.drop(cid)
    v = tee.views.get(cid)
    out.steps = v.step if v is not None else 0
    return out


def serve_multi_host(
    channels: Mapping[str, Any], tee: MultiClientTuneEnclave, *, timeout: float = 120.0
) -> dict[str, ClientOutcome]:
    """Untrusted host: serve every client connection in its own thread (interleaved steps).

    A client that fails attestation, refuses the enclave, or sends a rejected frame is
    excluded; the others continue. Returns one :class:`ClientOutcome` per client.
    """
    if not channels:
        raise ConfigError("no client connections")
    results: dict[str, ClientOutcome] = {}

    def run(cid: str, ch: Any) -> None:
        results[cid] = _serve_one(ch, tee, cid, timeout)

    threads = [threading.Thread(target=run, args=(c, ch), daemon=True) for c, ch in channels.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout * 4
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for cid in channels:
        if cid not in results:
            results[cid] = ClientOutcome(cid, excluded="timed out")
    return results


class AttestedTuneClient(TuneClient):
    """A split fine-tuning client that also attests its own TEE to the server enclave."""

    def __init__(
        self, channel: Any, part: ClientPart, verifier: Verifier, own_enclave: Enclave, **kw: Any
    ) -> None:
        super().__init__(channel, part, verifier, **kw)
        self.own_enclave = own_enclave

    def connect(self) -> Any:
        from veil.tune.messages import SessionInfo, SessionInfoRequest

        nonce = new_nonce()
        self.channel.send(KexRequest(nonce=nonce))
        offer = self.channel.recv(AttestedOffer, timeout=self.timeout)
        try:
            client_public, session = client_key_exchange(offer, self.verifier, nonce)
        except AttestationError:
            self.channel.abort("client refused the enclave attestation")
            raise
        ev = self.own_enclave.attest(client_report_data(client_public, offer.public_key, nonce))
        self.channel.send(ClientAttestedFinish(public_key=client_public, evidence=ev))
        self._session = session
        info = self._call(SessionInfoRequest(), SessionInfo)
        self.info = info
        return info


# ------------------------------------------------------------------------- (b) federated mode


class FedAvgEnclave:
    """Server enclave of federated mode: the global adapter, one session per client, FedAvg."""

    def __init__(
        self,
        enclave: Enclave,
        initial: Mapping[str, torch.Tensor],
        *,
        client_verifier: Verifier | None = None,
    ) -> None:
        if not initial:
            raise ConfigError("the global adapter is empty")
        self.enclave = enclave
        self.global_state = {k: v.detach().clone() for k, v in initial.items()}
        self.client_verifier = client_verifier
        self.round = 0
        self._codec = Codec()
        self._kx: dict[str, EnclaveKeyExchange] = {}
        self._offers: dict[str, tuple[AttestedOffer, bytes]] = {}
        self._sessions: dict[str, Any] = {}
        self._updates: dict[str, tuple[dict[str, torch.Tensor], int, float]] = {}
        self.history: list[dict[str, Any]] = []
        if enclave.simulated:
            log.warning("FedAvg enclave runs on a SIMULATED TEE: no hardware protection")

    def offer(self, cid: str, nonce: bytes) -> AttestedOffer:
        kx = EnclaveKeyExchange(self.enclave)
        offer = kx.offer(nonce)
        self._kx[cid] = kx
        self._offers[cid] = (offer, bytes(nonce))
        return offer

    def finish_key_exchange(self, cid: str, fin: KexFinish | ClientAttestedFinish) -> None:
        kx = self._kx.pop(cid, None)
        pending = self._offers.pop(cid, None)
        if kx is None or pending is None:
            raise ProtocolError(f"client {cid}: key exchange finish without an offer")
        _verify_client(self.client_verifier, fin, pending[0], pending[1])
        self._sessions[cid] = kx.finish(fin.public_key)

    @property
    def clients(self) -> list[str]:
        return sorted(self._sessions)

    def drop(self, cid: str) -> None:
        self._sessions.pop(cid, None)
        self._updates.pop(cid, None)

    def global_frame(self, cid: str, *, final: bool = False) -> bytes:
        """The current global adapter, encrypted to client ``cid``."""
        msg = FedGlobal(round=self.round, weights=_tensors_to_bytes(self.global_state), final=final)
        return bytes(self._sessions[cid].encrypt(self._codec.encode(msg), AAD_FED_TO_CLIENT))

    def accept_update(self, cid: str, frame: bytes) -> None:
        """Decrypt and validate one client's update for the current round."""
        sess = self._sessions.get(cid)
        if sess is None:
            raise ProtocolError(f"no session with client {cid!r}")
        upd = self._codec.decode(sess.decrypt(frame, AAD_FED_TO_SERVER), FedUpdate)
        if upd.round != self.round:
            raise ProtocolError(f"client {cid}: update for round {upd.round}, expected {self.round}")
        if upd.n_examples <= 0:
            raise ProtocolError(f"client {cid}: example count must be positive")
        self._updates[cid] = (_bytes_to_tensors(upd.weights, self.global_state), upd.n_examples, upd.loss)

    def aggregate(self) -> dict[str, Any]:
        """FedAvg of this round's updates (weighted by examples); starts the next round."""
        if not self._updates:
            raise ProtocolError(f"round {self.round}: no client updates to average")
        cids = sorted(self._updates)
        states = [self._updates[c][0] for c in cids]
        counts = [self._updates[c][1] for c in cids]
        self.global_state = fedavg(states, counts)
        rec = {
            "round": self.round,
            "clients": cids,
            "examples": counts,
            "client_loss": {c: self._updates[c][2] for c in cids},
        }
        self.history.append(rec)
        self._updates.clear()
        self.round += 1
        return rec


def serve_federated_host(
    channels: Mapping[str, Any], fed: FedAvgEnclave, *, rounds: int, timeout: float = 300.0
) -> dict[str, ClientOutcome]:
    """Untrusted host of federated mode: handshakes, then ``rounds`` rounds of FedAvg.

    A client that fails attestation or times out / errs during a round is excluded from then
    on; the round is averaged over the others.
    """
    if rounds <= 0:
        raise ConfigError("rounds must be positive")
    outcomes = {cid: ClientOutcome(cid) for cid in channels}

    def exclude(cid: str, e: BaseException) -> None:
        outcomes[cid].excluded = f"{type(e).__name__}: {e}"
        log.warning("federated client %s excluded: %s", cid, outcomes[cid].excluded)
        fed.drop(cid)

    for cid, ch in channels.items():  # attested handshakes
        try:
            req = ch.recv(KexRequest, timeout=timeout)
            ch.send(fed.offer(cid, req.nonce))
            fin = ch.recv((KexFinish, ClientAttestedFinish), timeout=timeout)
            try:
                fed.finish_key_exchange(cid, fin)
            except AttestationError as e:
                ch.abort(f"client attestation refused: {e}")
                raise
        except VeilError as e:
            exclude(cid, e)
    for r in range(rounds + 1):
        final = r == rounds
        active = fed.clients
        if not active:
            raise ProtocolError("every federated client was excluded")
        for cid in active:
            try:
                channels[cid].send(Sealed(frame=fed.global_frame(cid, final=final)))
            except VeilError as e:
                exclude(cid, e)
        if final:
            break
        for cid in fed.clients:
            try:
                msg = channels[cid].recv(Sealed, timeout=timeout)
                fed.accept_update(cid, msg.frame)
                outcomes[cid].steps += 1
            except VeilError as e:
                try:
                    channels[cid].abort(f"update rejected: {e}")
                except VeilError:
                    pass
                exclude(cid, e)
        fed.aggregate()
    return outcomes


class FederatedClientEnclave:
    """A client's own TEE in federated mode: frozen model + LoRA adapter + optimizer.

    ``adapter.part`` is a :class:`ServerPart` cut at ``k`` with the adapter on it, ``embed``
    the matching frozen :class:`ClientPart` cut at ``k`` (``k = 0``: embeddings only, LoRA on
    every layer). Both live in the enclave object; with ``veil.tune.otp.offload_frozen_linears``
    on both parts the frozen layers run outside under one-time pads (adapters-only mode).
    """

    def __init__(
        self,
        enclave: Enclave,
        embed: ClientPart,
        adapter: ServerAdapter,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        if embed.cut_layer != adapter.part.cut_layer:
            raise ConfigError(
                "the embedding/frozen part and the adapted part of a federated client must be cut at the "
                f"same layer (got {embed.cut_layer} and {adapter.part.cut_layer})"
            )
        self.enclave = enclave
        self.embed = embed
        self.adapter = adapter
        self.lr = lr
        self.weight_decay = weight_decay

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.adapter.load_adapter_state(dict(state))

    def local_train(
        self, examples: Sequence[EncodedExample], *, steps: int, batch_size: int, pad_id: int, seed: int
    ) -> float:
        """``steps`` AdamW steps from the loaded global adapter (fresh optimizer each round)."""
        opt = torch.optim.AdamW(
            self.adapter.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        sched = batch_schedule(len(examples), batch_size=batch_size, epochs=steps * batch_size + 1, seed=seed)
        losses: list[float] = []
        set_mode(self.adapter.part, True)
        for s in range(steps):
            b = collate([examples[i] for i in sched[s]], pad_id)
            with torch.no_grad():
                act = self.embed(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask))
            fh = self.adapter.final_hidden(act.hidden_states, act.attention_mask, act.position_ids)
            loss = head_loss(fh, self.adapter.part.lm_head, torch.from_numpy(b.labels))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return float(np.mean(losses)) if losses else float("nan")


@dataclass
class FederatedClientResult:
    rounds: int = 0
    losses: list[float] = field(default_factory=list)
    final_state: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def run_federated_client(
    channel: Any,
    client: FederatedClientEnclave,
    verifier: Verifier,
    examples: Sequence[EncodedExample],
    *,
    local_steps: int,
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    timeout: float = 300.0,
) -> FederatedClientResult:
    """Client role: attest both ways, then per round load the global adapter, train locally,
    send the update; ends with the final average (loaded into ``client.adapter``)."""
    if not examples:
        raise InputError("a federated client needs training examples")
    codec = Codec()
    nonce = new_nonce()
    channel.send(KexRequest(nonce=nonce))
    offer = channel.recv(AttestedOffer, timeout=timeout)
    try:
        client_public, session = client_key_exchange(offer, verifier, nonce)
    except AttestationError:
        channel.abort("client refused the server enclave attestation")
        raise
    ev = client.enclave.attest(client_report_data(client_public, offer.public_key, nonce))
    channel.send(ClientAttestedFinish(public_key=client_public, evidence=ev))
    res = FederatedClientResult()
    like = client.adapter.adapter_state()
    t0 = time.perf_counter()
    while True:
        msg = channel.recv(Sealed, timeout=timeout)  # PeerError if the server excluded us
        glob = codec.decode(session.decrypt(msg.frame, AAD_FED_TO_CLIENT), FedGlobal)
        state = _bytes_to_tensors(glob.weights, like)
        client.load(state)
        if glob.final:
            res.final_state = {k: v.clone() for k, v in state.items()}
            break
        loss = client.local_train(
            examples, steps=local_steps, batch_size=batch_size, pad_id=pad_id, seed=seed + 7919 * glob.round
        )
        upd = FedUpdate(
            round=glob.round,
            n_examples=len(examples),
            weights=_tensors_to_bytes(client.adapter.adapter_state()),
            loss=loss,
        )
        channel.send(Sealed(frame=session.encrypt(codec.encode(upd), AAD_FED_TO_SERVER)))
        res.rounds += 1
        res.losses.append(loss)
    res.seconds = time.perf_counter() - t0
    return res
