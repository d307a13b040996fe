"""Ed25519 signing of package manifests (thin wrapper; key bytes come from veil.crypto.random)."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veil.crypto.random import random_bytes
from veil.errors import InputError

__all__ = ["SigningKey", "load_or_create", "verify"]


class SigningKey:
    """An Ed25519 signing key (the packager's identity)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise InputError("an Ed25519 signing key is 32 bytes")
        self._sk = Ed25519PrivateKey.from_private_bytes(seed)
        self._seed = seed
        self.public_bytes: bytes = self._sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(random_bytes(32))

    def sign(self, message: bytes) -> bytes:
        return self._sk.sign(message)

    def save(self, path: Path) -> None:
        from veil.atomic import atomic_write_text

        # hardening (issue 9): created 0600 from the start (open-then-chmod let another local user
        # open the file in between and read the seed later) and written atomically
        atomic_write_text(Path(path), self._seed.hex() + "\n", encoding="ascii", mode=0o600)

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        try:
            text = Path(path).read_text(encoding="ascii").strip()
            return cls(bytes.fromhex(text))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read signing key {path}: {exc}") from None


def load_or_create(path: Path) -> SigningKey:
    """Load the signing key at ``path``, creating it (mode 0600) if it does not exist."""
    if Path(path).exists():
        return SigningKey.load(path)
    key = SigningKey.generate()
    key.save(path)
    return key


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
