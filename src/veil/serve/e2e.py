"""End-to-end encryption between a client and the enclave workers, through an untrusted gateway.

Every replica holds the same *service identity* (released by the KMS only to attested workers).
A client:

1. asks any replica (through the gateway) for *service evidence*: the worker's enclave evidence
   whose report data is ``SHA-256("veil-serve-identity-v1" || x25519_public || SHA-256(tls cert)
   || client nonce)``; it verifies it against its own :class:`veil.tee.Policy`;
2. makes one X25519 key per client and shares a secret with the service key; per request it
   draws a fresh 16-byte salt and derives request and response keys with
   ``HKDF(secret, salt, info = label || client key || service key || model || endpoint)``, sends an
   :class:`E2ERequest` holding only AES-256-GCM ciphertext (aad binds model, endpoint and the
   binary-header length) and opens the response with the response key. Workers cache the
   X25519 result per client key, so a request costs one HKDF and one AES-GCM on each side.

The gateway forwards the opaque bytes (content type :data:`E2E_CONTENT_TYPE`) and never sees
plaintext tensors or prompts.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from veil.comm import Message, codec
from veil.crypto.aead import X25519KeyPair, aead_decrypt, aead_encrypt, hkdf_sha256
from veil.crypto.random import random_bytes
from veil.errors import CryptoError, ProtocolError
from veil.tee import Evidence, VerifiedClaims, Verifier, pad_report_data

__all__ = [
    "E2E_CONTENT_TYPE",
    "ClientE2E",
    "E2ERequest",
    "E2EResponse",
    "ResponseKey",
    "ServerE2E",
    "ServiceEvidence",
    "client_open",
    "client_seal",
    "identity_report_data",
    "verify_service_evidence",
]

E2E_CONTENT_TYPE = "application/x-veil-e2e"
_LABEL = b"veil-serve-e2e-v1"


class E2ERequest(Message, frozen=True, tag=True, forbid_unknown_fields=True):
    client_public: bytes
    salt: bytes  # 16 fresh random bytes per request
    model: str
    path: str  # "infer" or "completions"
    ciphertext: bytes  # AES-256-GCM of the inner body
    header_length: int  # of the inner (KServe v2 binary) body, -1 = plain JSON


class E2EResponse(Message, frozen=True, tag=True, forbid_unknown_fields=True):
    ciphertext: bytes
    header_length: int
    status: int


class ServiceEvidence(Message, frozen=True, tag=True, forbid_unknown_fields=True):
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


_REQ_NONCE = b"\x00" * 12
_RESP_NONCE = b"\x01" + b"\x00" * 11


def _keys(
    secret: bytes, salt: bytes, client_public: bytes, service_public: bytes, model: str, path: str
) -> tuple[bytes, bytes]:
    """Per-request keys: HKDF(secret, salt = fresh 16-byte request salt, info = full context)."""
    info = _LABEL + b"".join(_lp(x) for x in (client_public, service_public, model.encode(), path.encode()))
    okm = hkdf_sha256(secret, salt=salt, info=info, length=64)
    return okm[:32], okm[32:]


def _aad(model: str, path: str, header_length: int, status: int = 0) -> bytes:
    return _lp(model.encode()) + _lp(path.encode()) + struct.pack(">qi", header_length, status)


@dataclass
class ResponseKey:
    """What a client needs to open the response of one request."""

    key: bytes
    model: str
    path: str


class ClientE2E:
    """Client side. One X25519 exchange per client (not per request); each request gets fresh keys
    from a random salt, so no (key, nonce) pair ever repeats."""

    def __init__(self, service_public: bytes) -> None:
        if len(service_public) != 32:
            raise ProtocolError("service X25519 key must be 32 bytes")
        self.service_public = service_public
        self._eph = X25519KeyPair.generate()
        self.client_public = self._eph.public_bytes
        self._secret = self._eph.exchange(service_public)

    def seal(
        self, model: str, path: str, body: bytes, header_length: int | None
    ) -> tuple[bytes, ResponseKey]:
        salt = random_bytes(16)
        k_req, k_resp = _keys(self._secret, salt, self.client_public, self.service_public, model, path)
        hl = -1 if header_length is None else header_length
        ct = aead_encrypt(k_req, _REQ_NONCE, body, _aad(model, path, hl))
        req = E2ERequest(
            client_public=self.client_public,
            salt=salt,
            model=model,
            path=path,
            ciphertext=ct,
            header_length=hl,
        )
        return codec.encode(req), ResponseKey(k_resp, model, path)

    @staticmethod
    def open(rk: ResponseKey, data: bytes) -> tuple[int, bytes, int | None]:
        """Decrypt a response: (status, body, header_length or None)."""
        resp = codec.decode(data, E2EResponse)
        body = aead_decrypt(
            rk.key, _RESP_NONCE, resp.ciphertext, _aad(rk.model, rk.path, resp.header_length, resp.status)
        )
        return resp.status, body, None if resp.header_length < 0 else resp.header_length


def client_seal(
    service_public: bytes, model: str, path: str, body: bytes, header_length: int | None
) -> tuple[bytes, ResponseKey]:
    """One-shot helper (a fresh client key per call; prefer :class:`ClientE2E` for many requests)."""
    return ClientE2E(service_public).seal(model, path, body, header_length)


def client_open(rk: ResponseKey, data: bytes) -> tuple[int, bytes, int | None]:
    return ClientE2E.open(rk, data)


class ServerE2E:
    """Worker side: open a request with the service identity and seal its response."""

    def __init__(self, identity: X25519KeyPair, cache_size: int = 4096) -> None:
        self.identity = identity
        self.public = identity.public_bytes
        self._secrets: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _secret(self, client_public: bytes) -> bytes:
        with self._lock:
            sec = self._secrets.get(client_public)
            if sec is not None:
                self._secrets.move_to_end(client_public)
                return sec
        try:
            sec = self.identity.exchange(client_public)
        except CryptoError as exc:
            raise ProtocolError(f"bad client key: {exc}") from None
        with self._lock:
            self._secrets[client_public] = sec
            if len(self._secrets) > self._cache_size:
                self._secrets.popitem(last=False)
        return sec

    def open(self, data: bytes, model: str, path: str) -> tuple[bytes, int | None, ResponseKey]:
        req = codec.decode(data, E2ERequest)
        if req.model != model or req.path != path:
            raise ProtocolError("end-to-end request was addressed to another model or endpoint")
        if len(req.salt) != 16 or len(req.client_public) != 32:
            raise ProtocolError("malformed end-to-end request")
        k_req, k_resp = _keys(
            self._secret(req.client_public), req.salt, req.client_public, self.public, model, path
        )
        body = aead_decrypt(k_req, _REQ_NONCE, req.ciphertext, _aad(model, path, req.header_length))
        return body, None if req.header_length < 0 else req.header_length, ResponseKey(k_resp, model, path)

    @staticmethod
    def seal(rk: ResponseKey, status: int, body: bytes, header_length: int | None) -> bytes:
        hl = -1 if header_length is None else header_length
        ct = aead_encrypt(rk.key, _RESP_NONCE, body, _aad(rk.model, rk.path, hl, status))
        return codec.encode(E2EResponse(ciphertext=ct, status=status, header_length=hl))
