"""End-to-end encryption between a client and the enclave workers, through an untrusted gateway.

Every replica holds the same *service identity* (released by the KMS only to attested workers).
A client:

1. asks any replica (through the gateway) for *service evidence*: the worker's enclave evidence
   whose report data is ``SHA-256("veil-serve-identity-v1" || x25519_public || SHA-256(tls cert)
   || client nonce)``; it verifies it against its own :class:`veil.tee.Policy`;
2. per request, makes an ephemeral X25519 key, derives a :class:`SecureSession` with the service
   key (transcript = protocol label, both public keys, model name) and sends an
   :class:`E2ERequest` holding only ciphertext; the response comes back in the same session.

The gateway forwards the opaque bytes (content type :data:`E2E_CONTENT_TYPE`) and never sees
plaintext tensors or prompts.
"""

from __future__ import annotations

import hashlib
import struct

from veil.comm import Message, codec
from veil.crypto.aead import X25519KeyPair
from veil.crypto.session import SecureSession
from veil.errors import CryptoError, ProtocolError
from veil.tee import Evidence, VerifiedClaims, Verifier, pad_report_data

__all__ = [
    "E2E_CONTENT_TYPE",
    "E2ERequest",
    "E2EResponse",
    "ServiceEvidence",
    "client_open",
    "client_seal",
    "identity_report_data",
    "server_open",
    "verify_service_evidence",
]

E2E_CONTENT_TYPE = "application/x-veil-e2e"
_LABEL = b"veil-serve-e2e-v1"


class E2ERequest(Message, frozen=True, tag=True):
    client_public: bytes
    model: str
    path: str  # "infer" or "completions"
    ciphertext: bytes  # SecureSession frame of the inner body
    header_length: int = -1  # of the inner (KServe v2 binary) body, -1 = plain JSON


class E2EResponse(Message, frozen=True, tag=True):
    ciphertext: bytes
    header_length: int = -1
    status: int = 200


class ServiceEvidence(Message, frozen=True, tag=True):
    evidence: Evidence
    x25519_public: bytes
    tls_cert_pem: bytes


def identity_report_data(x25519_public: bytes, tls_cert_pem: bytes, nonce: bytes) -> bytes:
    cert_hash = hashlib.sha256(tls_cert_pem).digest()
    return pad_report_data(
        hashlib.sha256(b"veil-serve-identity-v1" + x25519_public + cert_hash + nonce).digest()
    )


def verify_service_evidence(se: ServiceEvidence, verifier: Verifier, nonce: bytes) -> VerifiedClaims:
    """AttestationError unless the evidence satisfies the policy and binds this identity + nonce."""
    if len(se.x25519_public) != 32:
        raise ProtocolError("service X25519 key must be 32 bytes")
    return verifier.verify(
        se.evidence, report_data=identity_report_data(se.x25519_public, se.tls_cert_pem, nonce)
    )


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _session(
    secret: bytes, client_public: bytes, service_public: bytes, model: str, path: str, *, initiator: bool
) -> SecureSession:
    transcript = _LABEL + b"".join(
        _lp(x) for x in (client_public, service_public, model.encode(), path.encode())
    )
    return SecureSession.from_shared_secret(secret, initiator=initiator, transcript=transcript)


def client_seal(
    service_public: bytes, model: str, path: str, body: bytes, header_length: int | None
) -> tuple[bytes, SecureSession]:
    """Encrypt one request; returns (wire bytes, session to open the response with)."""
    eph = X25519KeyPair.generate()
    sess = _session(
        eph.exchange(service_public), eph.public_bytes, service_public, model, path, initiator=True
    )
    req = E2ERequest(
        client_public=eph.public_bytes,
        model=model,
        path=path,
        ciphertext=sess.encrypt(body),
        header_length=-1 if header_length is None else header_length,
    )
    return codec.encode(req), sess


def client_open(session: SecureSession, data: bytes) -> tuple[int, bytes, int | None]:
    """Decrypt a response: (status, body, header_length or None)."""
    resp = codec.decode(data, E2EResponse)
    body = session.decrypt(resp.ciphertext)
    return resp.status, body, None if resp.header_length < 0 else resp.header_length


class ServerE2E:
    """Worker side: open a request with the service identity and seal its response."""

    def __init__(self, identity: X25519KeyPair) -> None:
        self.identity = identity
        self.public = identity.public_bytes

    def open(self, data: bytes, model: str, path: str) -> tuple[bytes, int | None, SecureSession]:
        req = codec.decode(data, E2ERequest)
        if req.model != model or req.path != path:
            raise ProtocolError("end-to-end request was addressed to another model or endpoint")
        try:
            secret = self.identity.exchange(req.client_public)
        except CryptoError as exc:
            raise ProtocolError(f"bad client key: {exc}") from None
        sess = _session(secret, req.client_public, self.public, model, path, initiator=False)
        body = sess.decrypt(req.ciphertext)
        return body, None if req.header_length < 0 else req.header_length, sess

    @staticmethod
    def seal(sess: SecureSession, status: int, body: bytes, header_length: int | None) -> bytes:
        return codec.encode(
            E2EResponse(
                ciphertext=sess.encrypt(body),
                status=status,
                header_length=-1 if header_length is None else header_length,
            )
        )


def server_open(
    server: ServerE2E, data: bytes, model: str, path: str
) -> tuple[bytes, int | None, SecureSession]:
    return server.open(data, model, path)
