"""Attested key exchange: a peer derives a :class:`SecureSession` only with a verified enclave.

Protocol (one round trip; the nonce is the client's, fresh per exchange)::

    client  -> enclave : nonce (16..64 random bytes)
    enclave            : (e, E) = X25519 key pair, fresh per offer
                         report_data = SHA-256("veil-kex" || E || nonce), zero-padded to 64
                         evidence = enclave.attest(report_data)
    enclave -> client  : AttestedOffer(evidence, E)
    client             : verifier.verify(evidence, report_data=that binding)   # AttestationError
                         (c, C) = X25519 key pair
    client  -> enclave : KexFinish(C)
    both               : secret = X25519(c, E) = X25519(e, C)
                         transcript = "veil-kex-v1" || len-prefixed(SHA-256(evidence), E, C, nonce)
                         SecureSession.from_shared_secret(secret, initiator=<client>, transcript)

The client is the initiator. Binding ``E`` into report data stops a man in the middle from
swapping the enclave key; hashing the evidence into the transcript makes both sides agree on
exactly which evidence was used. See docs/protocols/attestation.md.
"""

from __future__ import annotations

import hashlib
import logging
import struct

import msgspec

from veil.comm.channel import Channel
from veil.comm.codec import Message
from veil.crypto.aead import X25519KeyPair
from veil.crypto.random import random_bytes
from veil.crypto.session import SecureSession
from veil.errors import AttestationError, CryptoError, InputError, ProtocolError
from veil.tee.base import Enclave
from veil.tee.evidence import Evidence, VerifiedClaims, pad_report_data
from veil.tee.policy import Verifier

__all__ = [
    "AttestedOffer",
    "EnclaveKeyExchange",
    "KexFinish",
    "KexRequest",
    "client_key_exchange",
    "client_key_exchange_with_claims",
    "client_open_session",
    "enclave_accept_session",
    "kex_report_data",
    "kex_transcript",
    "new_nonce",
]

log = logging.getLogger("veil.tee.kex")

_DOMAIN = b"veil-kex"
_TRANSCRIPT = b"veil-kex-v1"
MIN_NONCE, MAX_NONCE = 16, 64


class KexRequest(Message, frozen=True, tag=True):
    """client -> enclave: please attest to a fresh key, bound to this nonce."""

    nonce: bytes


class AttestedOffer(Message, frozen=True, tag=True):
    """enclave -> client: evidence whose report data binds ``public_key`` and the nonce."""

    evidence: Evidence
    public_key: bytes


class KexFinish(Message, frozen=True, tag=True):
    """client -> enclave: the client's X25519 public key."""

    public_key: bytes


def new_nonce() -> bytes:
    """A fresh 32-byte client nonce."""
    return random_bytes(32)


def _check_nonce(nonce: bytes) -> None:
    if not isinstance(nonce, bytes | bytearray) or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise InputError(f"key-exchange nonce must be {MIN_NONCE}..{MAX_NONCE} bytes")


def kex_report_data(enclave_public: bytes, nonce: bytes) -> bytes:
    """SHA-256(b"veil-kex" || enclave_public || nonce), zero-padded to 64 bytes."""
    return pad_report_data(hashlib.sha256(_DOMAIN + bytes(enclave_public) + bytes(nonce)).digest())


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def kex_transcript(evidence: Evidence, enclave_public: bytes, client_public: bytes, nonce: bytes) -> bytes:
    """Transcript both sides feed to the session key schedule."""
    ev_hash = hashlib.sha256(msgspec.msgpack.encode(evidence)).digest()
    return _TRANSCRIPT + b"".join(_lp(x) for x in (ev_hash, enclave_public, client_public, nonce))


class EnclaveKeyExchange:
    """Enclave side. One :meth:`offer` is answered by exactly one :meth:`finish`."""

    def __init__(self, enclave: Enclave) -> None:
        self.enclave = enclave
        self._pending: tuple[X25519KeyPair, AttestedOffer, bytes] | None = None

    def offer(self, nonce: bytes) -> AttestedOffer:
        _check_nonce(nonce)
        kp = X25519KeyPair.generate()
        evidence = self.enclave.attest(kex_report_data(kp.public_bytes, nonce))
        offer = AttestedOffer(evidence=evidence, public_key=kp.public_bytes)
        self._pending = (kp, offer, bytes(nonce))
        kind = "SIMULATED enclave" if evidence.simulated else evidence.backend
        log.info("key-exchange offer made (%s)", kind)
        return offer

    def finish(self, client_public: bytes) -> SecureSession:
        if self._pending is None:
            raise ProtocolError("key exchange: finish() without a pending offer (or called twice)")
        kp, offer, nonce = self._pending
        self._pending = None  # one session per offer; the private key is dropped here
        try:
            secret = kp.exchange(bytes(client_public))
        except CryptoError as e:
            raise ProtocolError(f"key exchange: invalid client public key: {e}") from e
        transcript = kex_transcript(offer.evidence, offer.public_key, bytes(client_public), nonce)
        return SecureSession.from_shared_secret(secret, initiator=False, transcript=transcript)


def client_key_exchange(
    offer: AttestedOffer, verifier: Verifier, nonce: bytes
) -> tuple[bytes, SecureSession]:
    """Client side: verify ``offer`` against ``verifier``'s policy and the nonce, then derive the
    session. Returns ``(client_public, session)``; send ``KexFinish(client_public)`` to the
    enclave. Raises :class:`AttestationError` when the evidence is refused or the enclave key is
    not bound to its report data."""
    client_public, session, _ = client_key_exchange_with_claims(offer, verifier, nonce)
    return client_public, session


def client_key_exchange_with_claims(
    offer: AttestedOffer, verifier: Verifier, nonce: bytes
) -> tuple[bytes, SecureSession, VerifiedClaims]:
    """Like :func:`client_key_exchange`, also returning the verified claims."""
    _check_nonce(nonce)
    if not isinstance(offer, AttestedOffer) or len(offer.public_key) != 32:
        raise AttestationError("key exchange: malformed offer (need Evidence and a 32-byte X25519 key)")
    binding = kex_report_data(offer.public_key, nonce)
    try:
        claims = verifier.verify(offer.evidence, report_data=binding)
    except AttestationError as e:
        if "check 'report_data'" in str(e):
            raise AttestationError(
                "key exchange refused: the enclave public key and nonce are not bound to the evidence "
                "report_data (check 'kex-binding' failed)"
            ) from e
        raise
    kp = X25519KeyPair.generate()
    try:
        secret = kp.exchange(offer.public_key)
    except CryptoError as e:
        raise AttestationError(f"key exchange refused: enclave public key is invalid: {e}") from e
    transcript = kex_transcript(offer.evidence, offer.public_key, kp.public_bytes, bytes(nonce))
    session = SecureSession.from_shared_secret(secret, initiator=True, transcript=transcript)
    log.info("attested session established with %s enclave %s", claims.label, claims.measurement[:16])
    return kp.public_bytes, session, claims


# ---------------------------------------------------------------------------------- over a Channel


def enclave_accept_session(
    channel: Channel, enclave: Enclave, *, timeout: float | None = None
) -> SecureSession:
    """Enclave role over a :class:`veil.comm.Channel`: KexRequest -> AttestedOffer -> KexFinish."""
    req = channel.recv(KexRequest, timeout=timeout)
    kx = EnclaveKeyExchange(enclave)
    try:
        offer = kx.offer(req.nonce)
    except (InputError, AttestationError) as e:
        channel.abort(f"enclave could not attest: {e}")
        raise
    channel.send(offer)
    fin = channel.recv(KexFinish, timeout=timeout)
    try:
        return kx.finish(fin.public_key)
    except ProtocolError as e:
        channel.abort(str(e))
        raise


def client_open_session(
    channel: Channel, verifier: Verifier, *, timeout: float | None = None
) -> tuple[SecureSession, VerifiedClaims]:
    """Client role over a channel: fresh nonce, verify the offer, send our key. On refusal the
    peer is told (``channel.abort``) and :class:`AttestationError` is raised."""
    nonce = new_nonce()
    channel.send(KexRequest(nonce=nonce))
    offer = channel.recv(AttestedOffer, timeout=timeout)
    try:
        client_public, session, claims = client_key_exchange_with_claims(offer, verifier, nonce)
    except AttestationError as e:
        channel.abort(f"attestation refused by client: {e}")
        raise
    channel.send(KexFinish(public_key=client_public))
    return session, claims
