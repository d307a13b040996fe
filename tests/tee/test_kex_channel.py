"""The attested key exchange as two parties over a Channel (threads and separate processes)."""

from __future__ import annotations

import pytest

from veil.comm.codec import Message
from veil.errors import AttestationError
from veil.tee import Policy, SimulatedEnclave, Verifier, client_open_session, enclave_accept_session
from veil.tee.simulated import measure, platform_public_key
from veil.testing import run_parties

CODE = b"enclave server code v1"


class Frame(Message, frozen=True, tag=True):
    data: bytes


def enclave_party(channel, code: bytes) -> bytes:
    session = enclave_accept_session(channel, SimulatedEnclave(code=[code], config={}), timeout=60)
    request = session.decrypt(channel.recv(Frame, timeout=60).data)
    channel.send(Frame(data=session.encrypt(request[::-1])))
    return request


def client_party(channel, measurement: str, platform_key_hex: str, allow_simulated: bool) -> dict:
    policy = Policy(
        allowed_measurements={measurement},
        allow_simulated=allow_simulated,
        simulated_platform_keys={platform_key_hex},
    )
    session, claims = client_open_session(channel, Verifier(policy), timeout=60)
    channel.send(Frame(data=session.encrypt(b"private prompt")))
    reply = session.decrypt(channel.recv(Frame, timeout=60).data)
    return {"reply": reply, "tee": claims.label, "measurement": claims.measurement}


def _args(allow_simulated: bool = True, measurement: str | None = None) -> tuple:
    return (measurement or measure([CODE], {}), platform_public_key().hex(), allow_simulated)


def test_kex_over_memory_channel() -> None:
    got_enclave, got_client = run_parties(
        enclave_party, client_party, transport="memory", timeout=60, args_a=(CODE,), args_b=_args()
    )
    assert got_enclave == b"private prompt"
    assert got_client == {"reply": b"tpmorp etavirp", "tee": "simulated", "measurement": measure([CODE], {})}


def test_client_refusal_aborts_enclave() -> None:
    with pytest.raises(AttestationError, match="check 'simulated'"):
        run_parties(
            enclave_party,
            client_party,
            transport="memory",
            timeout=60,
            args_a=(CODE,),
            args_b=_args(allow_simulated=False),
        )
    with pytest.raises(AttestationError, match="check 'measurement'"):
        run_parties(
            enclave_party,
            client_party,
            transport="memory",
            timeout=60,
            args_a=(b"tampered code",),
            args_b=_args(),
        )


@pytest.mark.slow
def test_kex_between_processes_over_grpc() -> None:
    got_enclave, got_client = run_parties(
        enclave_party, client_party, transport="grpc", timeout=120, args_a=(CODE,), args_b=_args()
    )
    assert got_enclave == b"private prompt"
    assert got_client["reply"] == b"tpmorp etavirp" and got_client["tee"] == "simulated"
