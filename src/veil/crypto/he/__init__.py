"""Additively homomorphic encryption: one interface, explicit backends.

>>> kp = keygen(scheme="paillier", key_bits=2048, backend="phe")   # doctest: +SKIP
>>> ct = kp.public.encrypt([1, -2, 3])
>>> kp.secret.decrypt(ct * 2 + 1)
[3, -3, 7]

Backends: ``heu`` (SecretFlow HEU; schemes ``ou`` and ``paillier`` = ZPaillier) and ``phe``
(python-paillier + gmpy2; scheme ``paillier``). ``backend=None`` uses
``VeilSettings.he_backend`` (env ``VEIL_HE_BACKEND``, default ``heu``); the choice is logged once
and an unknown or uninstalled backend raises :class:`veil.errors.ConfigError` — there is no
silent fallback.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.crypto.encoding import FixedPoint
from veil.crypto.he.base import CiphertextArray, HEKeyPair, HEPublicKey, HESecretKey
from veil.crypto.he.registry import (
    HEBackend,
    available_backends,
    get_backend,
    register_backend,
    registered_backends,
)
from veil.errors import ConfigError

__all__ = [
    "CiphertextArray",
    "HEBackend",
    "HEKeyPair",
    "HEPublicKey",
    "HESecretKey",
    "available_backends",
    "decrypt_floats",
    "encrypt_floats",
    "get_backend",
    "keygen",
    "register_backend",
    "registered_backends",
]

_log = logging.getLogger("veil.crypto.he")
_SCHEME_ALIASES = {"ou": "ou", "paillier": "paillier", "zpaillier": "paillier", "z-paillier": "paillier"}
MIN_KEY_BITS = 1024


def keygen(scheme: str | None = None, key_bits: int | None = None, backend: str | None = None) -> HEKeyPair:
    """Generate a key pair. ``None`` arguments come from :class:`veil.config.VeilSettings`.

    ConfigError for an unknown/unavailable backend, a scheme the backend lacks, or a key size
    below 1024 bits. Keys below 2048 bits are logged as test-only.
    """
    settings = None
    if scheme is None or key_bits is None:
        from veil.config import get_settings

        settings = get_settings()
    if backend is None:
        be = get_backend(None)
    else:
        be = get_backend(backend, source="argument")
    sch_in = scheme if scheme is not None else (settings.he_scheme if settings else "ou")
    sch = _SCHEME_ALIASES.get(str(sch_in).lower())
    if sch is None or sch not in be.schemes:
        where = "" if scheme is not None else " (from VEIL_HE_SCHEME; pass scheme= or set VEIL_HE_SCHEME)"
        raise ConfigError(
            f"HE backend {be.name!r} supports schemes {list(be.schemes)}, not {sch_in!r}{where}"
        )
    bits = key_bits if key_bits is not None else (settings.he_key_bits if settings else 2048)
    if not isinstance(bits, int) or bits < MIN_KEY_BITS or bits > 8192:
        raise ConfigError(f"HE key_bits must be an int in [{MIN_KEY_BITS}, 8192], got {bits!r}")
    if bits < 2048:
        _log.warning("HE key of %d bits is for tests only (use >= 2048 in production)", bits)
    return be.keygen(sch, bits)


def encrypt_floats(pk: HEPublicKey, x: Any, fxp: FixedPoint) -> CiphertextArray:
    """Fixed-point encode reals (signed, ``round(x * 2**frac_bits)``) and encrypt them."""
    enc = fxp.encode(np.asarray(x, dtype=np.float64).reshape(-1))
    return pk.encrypt(FixedPoint.to_signed(enc))


def decrypt_floats(
    sk: HESecretKey, ct: CiphertextArray, fxp: FixedPoint, *, frac_bits: int | None = None
) -> npt.NDArray[np.float64]:
    """Decrypt and divide by ``2**frac_bits`` (default ``fxp.frac_bits``; pass ``2 * f`` after a
    multiplication by an encoded fixed-point scalar). Works for values beyond 64 bits."""
    f = fxp.frac_bits if frac_bits is None else frac_bits
    ints = sk.decrypt(ct)
    scale = 2**f
    return np.array([v / scale for v in ints], dtype=np.float64)
