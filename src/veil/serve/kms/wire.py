"""What the KMS sends: msgspec structs (via :mod:`veil.comm.codec`) and pydantic HTTP bodies."""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel, ConfigDict, Field

from veil.comm import Message
from veil.errors import ProtocolError

__all__ = [
    "AuditEntry",
    "ChallengeResponse",
    "CreateKeyRequest",
    "ImportKeyRequest",
    "KeyInfo",
    "KeyRelease",
    "NewKeyResponse",
    "ReleaseRequest",
    "ReleaseResponse",
    "ReleasedKey",
    "ServiceIdentity",
    "ServiceInfo",
    "b64d",
    "b64e",
]

HEX32 = r"^[0-9a-f]{32}$"
HEX64 = r"^[0-9a-f]{64}$"
MODEL = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: str, what: str = "field") -> bytes:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ProtocolError(f"{what} is not valid base64") from None


# ----------------------------------------------------------------- sealed bundle (msgspec)


class ServiceIdentity(Message, frozen=True, tag=True):
    """The one identity every replica presents: TLS key + certificate and an X25519 key for E2E."""

    x25519_private: bytes
    x25519_public: bytes
    tls_key_pem: bytes
    tls_cert_pem: bytes


class ReleasedKey(Message, frozen=True, tag=True):
    key_id: str
    model: str
    version: int
    key: bytes
    signer: str


class KeyRelease(Message, frozen=True, tag=True):
    """Encrypted to the attested worker key (SecureSession from veil.tee.kex)."""

    keys: list[ReleasedKey]
    identity: ServiceIdentity
    issued_at: float


# ----------------------------------------------------------------- HTTP bodies (pydantic)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImportKeyRequest(_Strict):
    model: str = Field(pattern=MODEL)
    key_id: str = Field(pattern=HEX32)
    key: str = Field(pattern=HEX64, description="hex of the 32-byte AES-256 data key")
    signer: str = Field(pattern=HEX64, description="hex Ed25519 public key of the packager")


class CreateKeyRequest(_Strict):
    signer: str = Field(pattern=HEX64)


class KeyInfo(_Strict):
    model: str
    key_id: str
    version: int
    signer: str
    created: float
    retired: bool


class NewKeyResponse(KeyInfo):
    key: str = Field(description="hex data key, returned once to the admin for packaging")


class ChallengeResponse(_Strict):
    nonce: str = Field(description="hex, single use")
    expires_in_s: float


class ReleaseRequest(_Strict):
    nonce: str = Field(pattern=r"^(?:[0-9a-f]{2}){16,64}$")  # even length (hardening: odd -> 500)
    offer: str = Field(max_length=1 << 20, description="base64 of the veil.comm-encoded AttestedOffer")
    key_ids: list[str] = Field(default_factory=list, max_length=64)
    worker_id: str = Field(default="", max_length=128)


class ReleaseResponse(_Strict):
    kms_public: str = Field(description="hex X25519 public key of the KMS side of the exchange")
    bundle: str = Field(description="base64 SecureSession frame holding a KeyRelease")
    tee: str = Field(description="'simulated' or 'hardware'")
    measurement: str


class AuditEntry(_Strict):
    id: int
    ts: float
    event: str
    outcome: str
    reason: str
    measurement: str
    tee: str
    key_ids: list[str]
    worker_id: str
    peer: str


class ServiceInfo(_Strict):
    x25519_public: str
    tls_cert_pem: str
    policy: dict[str, object]
