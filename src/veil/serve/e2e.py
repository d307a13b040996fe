"""End-to-end encryption between a client and the enclave workers, through an untrusted gateway.

Every replica holds the same *service identity* (released by the KMS only to attested workers).
A client:

1. asks any replica (through the gateway) for *service evidence*: the worker's enclave evidence
   whose report data is ``SHA-256("veil-serve-identity-v1" || x25519_public || SHA-256(tls cert)
   || client nonce)``; it verifies it against its own :class:`veil.tee.Policy`;
2. makes one X25519 key per client and shares a secret with the service key; per request it
   draws a fresh 16-byte salt and derives request and response keys with
   ``HKDF(secret, salt, info = label || client key || service key || model || endpoint)``, sends an
   :class:`E2ERequest` holding only AES-256-GCM ciphertext (aad binds model, endpoint, the
   binary-header length and the sealing time) and opens the response with the response key.
   Workers cache the X25519 result per client key, so a request costs one HKDF and one AES-GCM
   on each side.
3. Replay (finding H-9): a worker runs each sealed request at most once. It refuses a request
   whose authenticated sealing time is more than ``window_s`` away from its clock, and keeps a
   :class:`ReplayCache` of the (client key, salt) pairs it opened within the window; a second
   delivery is refused with :class:`ReplayError`. A client that retries re-seals (fresh salt
   and time), so legitimate retries still work.

The gateway forwards the opaque bytes (content type :data:`E2E_CONTENT_TYPE`) and never sees
plaintext tensors or prompts.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
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
    "ReplayCache",
    "ReplayError",
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
#: default freshness window of a sealed request (s): the replay cache remembers salts this long
REPLAY_WINDOW_S = 120.0
#: default bound on remembered salts (~190 bytes each in CPython: ~12 MiB of enclave memory at
#: most); beyond it the oldest is evicted and the floor rises, see :class:`ReplayCache`
REPLAY_CACHE_ENTRIES = 65_536


class ReplayError(ProtocolError):
    """A sealed end-to-end request was already opened, or is outside the freshness window."""


class E2ERequest(Message, frozen=True, tag=True, forbid_unknown_fields=True):
    client_public: bytes
    salt: bytes  # 16 fresh random bytes per request
    model: str
    path: str  # "infer" or "completions"
    ciphertext: bytes  # AES-256-GCM of the inner body
    header_length: int  # of the inner (KServe v2 binary) body, -1 = plain JSON
    sealed_at_ms: int  # client's Unix time in ms when sealed (authenticated in the aad)


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


def _aad(
    model: str, path: str, header_length: int, status: int = 0, sealed_at_ms: int | None = None
) -> bytes:
    aad = _lp(model.encode()) + _lp(path.encode()) + struct.pack(">qi", header_length, status)
    return aad if sealed_at_ms is None else aad + struct.pack(">q", sealed_at_ms)


class ReplayCache:
    """Remembers which sealed requests a worker has opened, in bounded memory (thread-safe).

    A request is fresh when its authenticated sealing time is within ``window_s`` of this
    worker's clock; :meth:`check_fresh` refuses the others before any cryptography. After the
    request decrypted, :meth:`remember` records its (client key, salt) and refuses a second one.
    Entries older than the window are dropped (their requests are refused as stale anyway).
    When ``max_entries`` fresh entries are held, the oldest is evicted and the *floor* rises to
    its sealing time: requests sealed at or before the floor are refused as well, so an evicted
    salt can never be replayed (under such a flood a slow client may see a stale refusal and
    re-seal). Salts are random and public, so a hash-table lookup leaks nothing secret.
    """

    def __init__(
        self,
        window_s: float = REPLAY_WINDOW_S,
        max_entries: int = REPLAY_CACHE_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0 or max_entries < 1:
            raise ProtocolError("replay window and cache size must be positive")
        self.window_ms = int(window_s * 1000)
        self.max_entries = int(max_entries)
        self._clock = clock
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # key -> sealed_at_ms, arrival order
        self._floor_ms = -(1 << 62)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check_fresh(self, sealed_at_ms: int) -> None:
        now = self._now_ms()
        if abs(now - sealed_at_ms) > self.window_ms:
            raise ReplayError(
                f"request sealed {(now - sealed_at_ms) / 1000:.1f} s from this worker's clock, outside "
                f"the {self.window_ms / 1000:g} s window (stale or replayed; re-seal and retry)"
            )
        if sealed_at_ms <= self._floor_ms:
            raise ReplayError("request sealed before the replay cache's floor (re-seal and retry)")

    def remember(self, client_public: bytes, salt: bytes, sealed_at_ms: int) -> None:
        """Record an opened request; ReplayError if it was opened before."""
        key = client_public + salt
        with self._lock:
            self.check_fresh(sealed_at_ms)
            if key in self._seen:
                raise ReplayError("end-to-end request replayed (its salt was already used)")
            self._seen[key] = sealed_at_ms
            oldest = self._now_ms() - self.window_ms
            while self._seen:
                k, t = next(iter(self._seen.items()))
                if t >= oldest and len(self._seen) <= self.max_entries:
                    break
                del self._seen[k]
                if t >= oldest:  # evicted while still fresh: refuse everything sealed up to it
                    self._floor_ms = max(self._floor_ms, t)


@dataclass
class ResponseKey:
    """What a client needs to open the response of one request."""

    key: bytes
    model: str
    path: str
    client_public: bytes = b""  # who sealed the request (worker side: the per-client budget key)


class ClientE2E:
    """Client side. One X25519 exchange per client (not per request); each request gets fresh keys
    from a random salt, so no (key, nonce) pair ever repeats."""

    def __init__(self, service_public: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(service_public) != 32:
            raise ProtocolError("service X25519 key must be 32 bytes")
        self.service_public = service_public
        self._clock = clock
        self._eph = X25519KeyPair.generate()
        self.client_public = self._eph.public_bytes
        self._secret = self._eph.exchange(service_public)

    def seal(
        self, model: str, path: str, body: bytes, header_length: int | None
    ) -> tuple[bytes, ResponseKey]:
        """Seal one request. Each call draws a fresh salt and time: a retry must call it again
        (workers refuse a sealed request they have already opened, see :class:`ReplayCache`)."""
        salt = random_bytes(16)
        sealed_at_ms = int(self._clock() * 1000)
        k_req, k_resp = _keys(self._secret, salt, self.client_public, self.service_public, model, path)
        hl = -1 if header_length is None else header_length
        ct = aead_encrypt(k_req, _REQ_NONCE, body, _aad(model, path, hl, sealed_at_ms=sealed_at_ms))
        req = E2ERequest(
            client_public=self.client_public,
            salt=salt,
            model=model,
            path=path,
            ciphertext=ct,
            header_length=hl,
            sealed_at_ms=sealed_at_ms,
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
    """Worker side: open a request with the service identity and seal its response.

    Each sealed request is opened at most once within ``replay.window_s`` (finding H-9)."""

    def __init__(
        self, identity: X25519KeyPair, cache_size: int = 4096, replay: ReplayCache | None = None
    ) -> None:
        self.identity = identity
        self.public = identity.public_bytes
        self._secrets: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.replay = replay if replay is not None else ReplayCache()

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
        self.replay.check_fresh(req.sealed_at_ms)  # cheap refusal before any cryptography
        k_req, k_resp = _keys(
            self._secret(req.client_public), req.salt, req.client_public, self.public, model, path
        )
        aad = _aad(model, path, req.header_length, sealed_at_ms=req.sealed_at_ms)
        body = aead_decrypt(k_req, _REQ_NONCE, req.ciphertext, aad)
        # only an authentic request takes a cache entry (forgeries cannot fill the cache)
        self.replay.remember(req.client_public, req.salt, req.sealed_at_ms)
        rk = ResponseKey(k_resp, model, path, req.client_public)
        return body, None if req.header_length < 0 else req.header_length, rk

    @staticmethod
    def seal(rk: ResponseKey, status: int, body: bytes, header_length: int | None) -> bytes:
        hl = -1 if header_length is None else header_length
        ct = aead_encrypt(rk.key, _RESP_NONCE, body, _aad(rk.model, rk.path, hl, status))
        return codec.encode(E2EResponse(ciphertext=ct, status=status, header_length=hl))
