"""Key agreement, key derivation and authenticated encryption (thin, checked wrappers over
`cryptography`).

* :func:`hkdf_sha256` — RFC 5869 HKDF with SHA-256.
* :class:`X25519KeyPair` — RFC 7748 Diffie-Hellman; private keys drawn from
  :mod:`veil.crypto.random`.
* :func:`aead_encrypt` / :func:`aead_decrypt` — AES-256-GCM or ChaCha20-Poly1305 (RFC 8439),
  12-byte nonces, 16-byte tags appended to the ciphertext. Any authentication failure is one
  :class:`veil.errors.DecryptionError` and no plaintext is returned.
"""

from __future__ import annotations

from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from veil.crypto.random import random_bytes
from veil.errors import ConfigError, CryptoError, DecryptionError

__all__ = [
    "CIPHERS",
    "KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "CipherName",
    "X25519KeyPair",
    "aead_decrypt",
    "aead_encrypt",
    "hkdf_sha256",
]

CipherName = Literal["aes-256-gcm", "chacha20-poly1305"]
CIPHERS: Final[tuple[str, ...]] = ("aes-256-gcm", "chacha20-poly1305")
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF-SHA256 (extract-then-expand). An empty ``salt`` means HashLen zero bytes."""
    if not 1 <= length <= 255 * 32:
        raise CryptoError(f"HKDF-SHA256 output length must be in [1, 8160], got {length}")
    for name, val in (("ikm", ikm), ("salt", salt), ("info", info)):
        if not isinstance(val, (bytes, bytearray, memoryview)):
            raise CryptoError(f"HKDF {name} must be bytes, got {type(val).__name__}")
    kdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=bytes(salt) or None, info=bytes(info))
    return kdf.derive(bytes(ikm))


class X25519KeyPair:
    """An X25519 key pair (RFC 7748)."""

    __slots__ = ("_private",)

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private

    @classmethod
    def generate(cls) -> X25519KeyPair:
        return cls(X25519PrivateKey.from_private_bytes(random_bytes(32)))

    @classmethod
    def from_private_bytes(cls, data: bytes) -> X25519KeyPair:
        if len(data) != 32:
            raise CryptoError(f"X25519 private key must be 32 bytes, got {len(data)}")
        return cls(X25519PrivateKey.from_private_bytes(bytes(data)))

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        """Raw private scalar (32 bytes). Handle as a secret."""
        return self._private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def exchange(self, peer_public: bytes) -> bytes:
        """The 32-byte shared secret with ``peer_public``; rejects the all-zero (low-order) result."""
        if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != 32:
            raise CryptoError("X25519 peer public key must be 32 bytes")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
        except ValueError as exc:  # all-zero shared secret: small-order peer point
            raise CryptoError(f"X25519 key exchange failed: {exc}") from exc

    def __repr__(self) -> str:
        return f"X25519KeyPair(public={self.public_bytes.hex()[:16]}…)"


def _cipher(key: bytes, cipher: str) -> AESGCM | ChaCha20Poly1305:
    if cipher not in CIPHERS:
        raise ConfigError(f"unknown AEAD cipher {cipher!r}; choose one of {', '.join(CIPHERS)}")
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise CryptoError(f"{cipher} needs a {KEY_BYTES}-byte key")
    if cipher == "aes-256-gcm":
        return AESGCM(bytes(key))
    return ChaCha20Poly1305(bytes(key))


def _check_nonce(nonce: bytes) -> None:
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise CryptoError(f"AEAD nonce must be {NONCE_BYTES} bytes")


def aead_encrypt(
    key: bytes, nonce: bytes, plaintext: bytes, aad: bytes = b"", cipher: str = "aes-256-gcm"
) -> bytes:
    """Encrypt and authenticate; returns ``ciphertext || tag``. Never reuse a (key, nonce) pair."""
    aead = _cipher(key, cipher)
    _check_nonce(nonce)
    return aead.encrypt(bytes(nonce), bytes(plaintext), bytes(aad))


def aead_decrypt(
    key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes = b"", cipher: str = "aes-256-gcm"
) -> bytes:
    """Verify and decrypt ``ciphertext || tag``; :class:`DecryptionError` if anything is off."""
    aead = _cipher(key, cipher)
    _check_nonce(nonce)
    if len(ciphertext) < TAG_BYTES:
        raise DecryptionError("ciphertext shorter than the authentication tag")
    try:
        return aead.decrypt(bytes(nonce), bytes(ciphertext), bytes(aad))
    except InvalidTag:
        raise DecryptionError("authentication failed (tampered data, wrong key or wrong context)") from None
