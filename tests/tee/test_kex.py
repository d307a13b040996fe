from __future__ import annotations

import msgspec
import pytest

from veil.comm import codec
from veil.errors import AttestationError, DecryptionError, ProtocolError
from veil.tee import (
    AttestedOffer,
    EnclaveKeyExchange,
    KexFinish,
    Policy,
    SimulatedEnclave,
    Verifier,
    client_key_exchange,
    new_nonce,
)
from veil.tee.kex import kex_report_data
from veil.tee.simulated import platform_public_key


def _setup(clock, **kw):
    enc = SimulatedEnclave(code=[b"server"], config={}, clock=clock)
    pol = Policy(
        allowed_measurements={enc.measurement},
        allow_simulated=True,
        simulated_platform_keys={platform_public_key().hex()},
        **kw,
    )
    return enc, Verifier(pol, clock=clock)


def test_kex_roundtrip(clock) -> None:
    enc, verifier = _setup(clock)
    kx = EnclaveKeyExchange(enc)
    nonce = new_nonce()
    offer = kx.offer(nonce)
    assert offer.evidence.report_data == kex_report_data(offer.public_key, nonce)
    # offer travels through the codec
    offer = codec.decode(codec.encode(offer), AttestedOffer)
    client_pub, c_sess = client_key_exchange(offer, verifier, nonce)
    fin = codec.decode(codec.encode(KexFinish(public_key=client_pub)), KexFinish)
    e_sess = kx.finish(fin.public_key)
    assert c_sess.session_id == e_sess.session_id
    assert e_sess.decrypt(c_sess.encrypt(b"activations")) == b"activations"
    assert c_sess.decrypt(e_sess.encrypt(b"grads")) == b"grads"
    with pytest.raises(ProtocolError):
        kx.finish(client_pub)  # one session per offer


def test_key_not_bound_to_report_data(clock) -> None:
    enc, verifier = _setup(clock)
    nonce = new_nonce()
    offer = EnclaveKeyExchange(enc).offer(nonce)
    # man in the middle swaps the enclave key for its own
    mitm = msgspec.structs.replace(offer, public_key=b"\x09" * 32)
    with pytest.raises(AttestationError, match="not bound"):
        client_key_exchange(mitm, verifier, nonce)
    # evidence attesting arbitrary report data (not our binding)
    loose = AttestedOffer(evidence=enc.attest(b"whatever"), public_key=offer.public_key)
    with pytest.raises(AttestationError, match="not bound"):
        client_key_exchange(loose, verifier, nonce)


def test_wrong_nonce_replayed_offer(clock) -> None:
    enc, verifier = _setup(clock)
    offer = EnclaveKeyExchange(enc).offer(new_nonce())
    with pytest.raises(AttestationError, match="not bound"):
        client_key_exchange(offer, verifier, new_nonce())


def test_kex_refuses_simulated_without_policy(clock) -> None:
    enc = SimulatedEnclave(code=[b"server"], config={}, clock=clock)
    nonce = new_nonce()
    offer = EnclaveKeyExchange(enc).offer(nonce)
    with pytest.raises(AttestationError, match="check 'simulated'"):
        verifier = Verifier(Policy(allowed_measurements={enc.measurement}), clock=clock)
        client_key_exchange(offer, verifier, nonce)


def test_kex_wrong_measurement_and_stale(clock) -> None:
    enc, _ = _setup(clock)
    nonce = new_nonce()
    offer = EnclaveKeyExchange(enc).offer(nonce)
    v = Verifier(
        Policy(allowed_measurements={"00" * 32}, allow_simulated=True, trust_any_simulated_platform=True),
        clock=clock,
    )
    with pytest.raises(AttestationError, match="check 'measurement'"):
        client_key_exchange(offer, v, nonce)
    _, verifier = _setup(clock, max_age_s=10)
    clock.t += 11
    with pytest.raises(AttestationError, match="stale"):
        client_key_exchange(offer, verifier, nonce)


def test_sessions_differ_and_mitm_cannot_decrypt(clock) -> None:
    enc, verifier = _setup(clock)
    kx = EnclaveKeyExchange(enc)
    nonce = new_nonce()
    offer = kx.offer(nonce)
    _, c_sess = client_key_exchange(offer, verifier, nonce)
    # the enclave finishes with a different (attacker) client key: sessions do not match
    e_sess = kx.finish(b"\x05" * 32)
    with pytest.raises(DecryptionError):
        e_sess.decrypt(c_sess.encrypt(b"x"))
