"""veil.crypto: the fenced cryptography package.

* :mod:`veil.crypto.random`   — the only randomness source (``secrets``)
* :mod:`veil.crypto.aead`     — HKDF-SHA256, X25519, AES-256-GCM / ChaCha20-Poly1305
* :mod:`veil.crypto.session`  — :class:`SecureSession` (ordered, replay-proof AEAD frames)
* :mod:`veil.crypto.encoding` — :class:`FixedPoint` over Z_2^64
* :mod:`veil.crypto.sharing`  — 2-party additive secret sharing (:class:`AShare`)
* :mod:`veil.crypto.he`       — additively homomorphic encryption (backends ``heu``, ``phe``)

Submodules are imported lazily so that ``import veil.crypto`` stays cheap (HE libraries load
only when :mod:`veil.crypto.he` is used).
"""

from __future__ import annotations

from veil.crypto.aead import X25519KeyPair, aead_decrypt, aead_encrypt, hkdf_sha256
from veil.crypto.encoding import FixedPoint
from veil.crypto.session import SecureSession
from veil.crypto.sharing import AShare, reconstruct, share

__all__ = [
    "AShare",
    "FixedPoint",
    "SecureSession",
    "X25519KeyPair",
    "aead_decrypt",
    "aead_encrypt",
    "hkdf_sha256",
    "reconstruct",
    "share",
]
