"""Split fine-tuning protocol: equivalence with unsplit peft, processes over gRPC, security."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from veil.comm import MemoryChannel, codec
from veil.errors import AttestationError, DecryptionError, PeerError
from veil.tee import Policy, Verifier
from veil.tune.client import TuneClient, train_split
from veil.tune.data import collate
from veil.tune.enclave_server import serve_host
from veil.tune.messages import Sealed
from veil.tune.split import client_part

from . import parties


@pytest.fixture(autouse=True)
def _veil_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_HOME", str(tmp_path_factory.getbasetemp() / "veil-home"))


def _initial_reference_state(family: str, cut: int) -> dict[str, torch.Tensor]:
    tee = parties.make_enclave(family, cut)
    return {
        "base_model.model." + tee.part.full_model_key(k): v for k, v in tee.adapter.adapter_state().items()
    }


@pytest.mark.parametrize(("family", "cut", "accum"), [("llama", 1, 1), ("llama", 2, 2), ("gpt2", 1, 2)])
def test_split_training_equals_unsplit_peft(run_parties: Any, family: str, cut: int, accum: int) -> None:
    steps = 4
    server, client = run_parties(
        parties.server_role, parties.client_role, transport="memory", timeout=120,
        args_a=(family, cut), args_b=(family, cut), 
    ) if accum == 1 else run_parties(
        lambda ch: parties.server_role(ch, family, cut),
        lambda ch: parties.client_role(ch, family, cut, steps=steps, grad_accum=accum),
        transport="memory", timeout=120,
    )
    ref_losses, ref_weights = parties.reference_training(
        family, cut, steps=steps, grad_accum=accum, init=_initial_reference_state(family, cut)
    )
    assert client["simulated"] is True
    assert client["final"] == steps == server["step"]
    np.testing.assert_allclose(client["losses"], ref_losses, atol=1e-5, rtol=0)
    tee = parties.make_enclave(family, cut)
    assert len(server["adapter"]) == len(ref_weights) > 0
    for k, v in server["adapter"].items():
        ref = ref_weights["base_model.model." + tee.part.full_model_key(k)]
        assert float(np.abs(v - ref.numpy()).max()) <= 1e-5, k
    # training moved the adapter (the test can fail)
    init = _initial_reference_state(family, cut)
    assert any(float((ref_weights[k] - init[k]).abs().max()) > 1e-4 for k in init)


def test_two_processes_over_grpc(run_parties: Any) -> None:
    server, client = run_parties(
        parties.server_role, parties.client_role, transport="grpc", timeout=240,
        args_a=("llama", 2), args_b=("llama", 2),
    )
    ref_losses, _ = parties.reference_training("llama", 2, steps=4, init=_initial_reference_state("llama", 2))
    assert server["step"] == 4
    np.testing.assert_allclose(client["losses"], ref_losses, atol=1e-5, rtol=0)


def _run_recorded(family: str, cut: int, steps: int = 3) -> tuple[list[bytes], dict[str, Any]]:
    """Run a session and record, as wire bytes, every message crossing the untrusted host."""
    seen: list[bytes] = []
    out: dict[str, Any] = {}

    def observe(direction: str, msg: Any) -> None:
        seen.append(codec.encode(msg))

    def server(ch: Any) -> int:
        tee = parties.make_enclave(family, cut, checkpoint_every=1)
        ckpts: list[bytes] = []
        orig = tee.handle

        def handle(frame: bytes) -> Any:
            action = orig(frame)
            if action.sealed_checkpoint is not None:
                ckpts.append(action.sealed_checkpoint)
            return action

        tee.handle = handle  # type: ignore[method-assign]
        step = serve_host(ch, tee, observe=observe)
        seen.extend(ckpts)  # sealed checkpoints are host-visible too
        return step

    def client(ch: Any) -> None:
        model = parties.tiny_model(family)
        cp = client_part(model, cut)
        c = TuneClient(ch, cp, Verifier(parties.policy_for(family, cut)))
        c.connect()
        exs = parties.tiny_examples()
        hist = train_split(c.train_micro, exs, pad_id=0, batch_size=3, max_steps=steps, epochs=2)
        # what the host must never see: the activations and labels of the first micro-batch
        from veil.tune.data import batch_schedule

        first = collate([exs[i] for i in batch_schedule(len(exs), batch_size=3, epochs=2)[0]], 0)
        act = c.activations(first)
        out["hidden"] = act.hidden_states.numpy().astype(np.float32)
        out["labels"] = first.labels
        out["losses"] = hist.losses
        c.finish()

    from veil.testing import run_parties as rp

    rp(server, client, transport="memory", timeout=120)
    return seen, out


def test_host_never_sees_plaintext_activations_or_labels() -> None:
    seen, out = _run_recorded("llama", 1)
    blob = b"".join(seen)
    assert len(seen) > 8
    hidden = out["hidden"]
    # the raw float32 bytes of any activation row (and of any 16-byte window) never appear
    raw = hidden.tobytes()
    assert raw[:64] not in blob and raw[-64:] not in blob
    for row in hidden.reshape(-1, hidden.shape[-1])[:6]:
        assert row.tobytes()[:16] not in blob
    # labels: the int64 label ids of the labelled positions, as a contiguous run
    lab = out["labels"][0]
    run = lab[lab != -100]
    assert run.astype("<i8").tobytes() not in blob
    row_labels = out["labels"].astype("<i8").tobytes()
    assert row_labels[:48] not in blob
    # positive control: the same search finds them in a plaintext encoding of the same message
    from veil.tune.messages import TrainBatch

    plain = codec.encode(TrainBatch(step=0, micro=0, n_micro=1, hidden=hidden, attention_mask=np.ones(hidden.shape[:2], np.int64),
                                     position_ids=np.zeros(hidden.shape[:2], np.int64), labels=out["labels"]))
    assert raw[:64] in plain and row_labels[:48] in plain
    # everything after the key exchange is an opaque Sealed frame
    tags = [codec.peek_tag(b) for b in seen if b[:2] == seen[0][:2]]
    assert {t for t in tags[3:]} <= {"tune.Sealed"}


def test_attestation_refusal_sends_nothing() -> None:
    sent_by_client: list[str] = []

    def server(ch: Any) -> None:
        tee = parties.make_enclave("llama", 1)
        serve_host(ch, tee, observe=lambda d, m: sent_by_client.append(type(m).__name__) if d == "in" else None)

    def client(ch: Any, policy: Policy) -> None:
        c = TuneClient(ch, client_part(parties.tiny_model("llama"), 1), Verifier(policy))
        c.connect()

    from veil.testing import run_parties as rp

    bad_measurement = Policy(allowed_measurements={"00" * 32}, allow_simulated=True, trust_any_simulated_platform=True)
    strict = parties.policy_for("llama", 1, allow_simulated=False)
    for policy in (bad_measurement, strict):
        sent_by_client.clear()
        with pytest.raises(AttestationError):
            rp(server, lambda ch: client(ch, policy), transport="memory", timeout=60)
        assert sent_by_client == ["KexRequest"]  # no KexFinish, no Sealed frame


class _Tamper:
    """A host-side man in the middle: forwards client frames to the enclave, but can modify one."""

    def __init__(self, family: str = "llama", cut: int = 1) -> None:
        self.tee = parties.make_enclave(family, cut)
        self.c_end, self.h_end = MemoryChannel.pair(timeout=30)
        self.client = TuneClient(self.c_end, client_part(parties.tiny_model(family), cut),
                                 Verifier(parties.policy_for(family, cut)))
        self.frames: list[bytes] = []

    def handshake(self) -> None:
        t = threading.Thread(target=self.client.connect)
        t.start()
        from veil.tee import KexFinish, KexRequest

        req = self.h_end.recv(KexRequest)
        self.h_end.send(self.tee.offer(req.nonce))
        self.tee.finish_key_exchange(self.h_end.recv(KexFinish).public_key)
        self.forward()  # SessionInfoRequest
        t.join(30)

    def forward(self, mutate: Any = None) -> None:
        msg = self.h_end.recv(Sealed)
        self.frames.append(msg.frame)
        frame = mutate(msg.frame) if mutate else msg.frame
        action = self.tee.handle(frame)
        self.h_end.send(Sealed(frame=action.reply))


def _step_async(t: _Tamper, step: int) -> threading.Thread:
    b = collate(parties.tiny_examples()[:3], 0)
    th = threading.Thread(target=lambda: _swallow(lambda: t.client.train_micro(b, step)), daemon=True)
    th.start()
    return th


def _swallow(fn: Any) -> None:
    try:
        fn()
    except Exception:
        pass


def test_tampered_and_replayed_frames_are_rejected_and_not_applied() -> None:
    t = _Tamper()
    t.handshake()
    before = t.tee.adapter.adapter_state()
    th = _step_async(t, 0)

    def flip(frame: bytes) -> bytes:
        b = bytearray(frame)
        b[len(b) // 2] ^= 0x01
        return bytes(b)

    msg = t.h_end.recv(Sealed)
    with pytest.raises(DecryptionError):
        t.tee.handle(flip(msg.frame))
    assert t.tee.step == 0
    for k, v in t.tee.adapter.adapter_state().items():
        assert torch.equal(v, before[k])
    # the genuine frame still goes through exactly once ...
    action = t.tee.handle(msg.frame)
    t.h_end.send(Sealed(frame=action.reply))
    th.join(30)
    assert t.tee.step == 1
    after = t.tee.adapter.adapter_state()
    # ... and replaying it is rejected, the step is not applied twice
    with pytest.raises(DecryptionError, match="replayed"):
        t.tee.handle(msg.frame)
    assert t.tee.step == 1
    for k, v in t.tee.adapter.adapter_state().items():
        assert torch.equal(v, after[k])


def test_replayed_step_in_a_new_session_is_refused(tmp_path: Path) -> None:
    """A step number the enclave already applied is refused even with a valid frame."""
    t = _Tamper()
    t.handshake()
    th = _step_async(t, 0)
    t.forward()
    th.join(30)
    assert t.tee.step == 1
    th = _step_async(t, 0)  # client (or a replaying host) asks for step 0 again
    t.forward()
    th.join(30)
    assert t.tee.step == 1


def test_kill_and_resume_from_sealed_checkpoint(tmp_path: Path) -> None:
    from veil.testing import run_parties as rp

    ckpt = str(tmp_path / "enclave.sealed")
    steps = 6
    # uninterrupted run
    s_full, c_full = rp(
        lambda ch: parties.server_role(ch, "llama", 2),
        lambda ch: parties.client_role(ch, "llama", 2, steps=steps, grad_accum=2),
        transport="memory", timeout=120,
    )
    # interrupted: the client dies after 3 steps + half of the 4th (before finishing the session)

    def dying_client(ch: Any) -> None:
        client = TuneClient(ch, client_part(parties.tiny_model("llama"), 2), Verifier(parties.policy_for("llama", 2)))
        client.connect()
        train_split(client.train_micro, parties.tiny_examples(), pad_id=0, batch_size=3, grad_accum=2, epochs=5,
                    seed=0, max_steps=steps, stop_after=3)
        b = collate(parties.tiny_examples()[:3], 0)
        client.train_micro(b, 3, 0, 2)  # first micro-batch of step 3 only
        raise RuntimeError("client killed mid-step")

    with pytest.raises(RuntimeError, match="killed"):
        rp(lambda ch: parties.server_role(ch, "llama", 2, "lora", ckpt, 1), dying_client, transport="memory",
           timeout=120)
    assert Path(ckpt).is_file()
    # resume: a fresh server restores the sealed state, the client continues from the server's step
    s_res, c_res = rp(
        lambda ch: parties.server_role(ch, "llama", 2, "lora", ckpt, 1),
        lambda ch: parties.client_role(ch, "llama", 2, steps=steps, grad_accum=2),
        transport="memory", timeout=120,
    )
    assert c_res["start"] == 3 and s_res["step"] == steps
    np.testing.assert_allclose(c_res["losses"], c_full["losses"][3:], atol=1e-6)
    for k, v in s_full["adapter"].items():
        np.testing.assert_allclose(s_res["adapter"][k], v, atol=1e-6, rtol=0)
    # a tampered checkpoint does not unseal
    blob = bytearray(Path(ckpt).read_bytes())
    blob[-1] ^= 1
    from veil.errors import IntegrityError

    with pytest.raises(IntegrityError):
        parties.make_enclave("llama", 2).restore(bytes(blob))


def test_ptuning_v2_trains_over_the_protocol(run_parties: Any) -> None:
    server, client = run_parties(
        lambda ch: parties.server_role(ch, "llama", 1, "ptuning"),
        lambda ch: parties.client_role(ch, "llama", 1, steps=5, adapter="ptuning", batch_size=12),
        transport="memory", timeout=120,
    )
    assert server["step"] == 5
    assert set(server["adapter"]) == {f"prefix.{i}_{kv}" for i in (1, 2, 3) for kv in ("key", "value")}
    # same full batch every step (12 examples, batch 12): loss goes down
    assert client["losses"][-1] < client["losses"][0] - 0.005


def test_server_killed_after_an_unsealed_step_resumes_without_double_apply(tmp_path: Path) -> None:
    """The enclave dies after applying step 5 but before sealing it (checkpoints every 2 steps):
    the restarted enclave restores step 4 and the client re-sends step 4 onwards."""
    from veil.testing import run_parties as rp

    ckpt = tmp_path / "enclave.sealed"
    steps = 6
    s_full, c_full = rp(
        lambda ch: parties.server_role(ch, "gpt2", 1),
        lambda ch: parties.client_role(ch, "gpt2", 1, steps=steps),
        transport="memory", timeout=120,
    )

    def dying_server(ch: Any) -> None:
        tee = parties.make_enclave("gpt2", 1, checkpoint_every=2)
        orig = tee.handle

        def handle(frame: bytes) -> Any:
            action = orig(frame)
            if tee.step == 5:
                raise RuntimeError("enclave host killed")
            return action

        tee.handle = handle  # type: ignore[method-assign]
        serve_host(ch, tee, checkpoint_path=ckpt)

    with pytest.raises(RuntimeError, match="killed"):
        rp(dying_server, lambda ch: parties.client_role(ch, "gpt2", 1, steps=steps), transport="memory", timeout=120)
    s_res, c_res = rp(
        lambda ch: parties.server_role(ch, "gpt2", 1, "lora", str(ckpt), 2),
        lambda ch: parties.client_role(ch, "gpt2", 1, steps=steps),
        transport="memory", timeout=120,
    )
    assert c_res["start"] == 4 and s_res["step"] == steps
    np.testing.assert_allclose(c_res["losses"], c_full["losses"][4:], atol=1e-6)
    for k, v in s_full["adapter"].items():
        np.testing.assert_allclose(s_res["adapter"][k], v, atol=1e-6, rtol=0)
