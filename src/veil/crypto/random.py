"""The ONLY source of randomness for keys, masks, nonces and shares in veil.

Everything here draws from :mod:`secrets` (the OS CSPRNG). ``random``, ``numpy.random`` and
``torch.rand*`` are for data and tests only.
"""

from __future__ import annotations

import secrets

import numpy as np
import numpy.typing as npt

__all__ = ["random_below", "random_bits", "random_bytes", "random_int_array", "random_u64"]


def random_bytes(n: int) -> bytes:
    """``n`` uniformly random bytes."""
    if n < 0:
        raise ValueError("n must be non-negative")
    return secrets.token_bytes(n)


def random_bits(k: int) -> int:
    """A uniformly random integer in ``[0, 2**k)``."""
    if k <= 0:
        return 0
    return secrets.randbits(k)


def random_below(n: int) -> int:
    """A uniformly random integer in ``[0, n)``."""
    return secrets.randbelow(n)


def random_u64(shape: int | tuple[int, ...]) -> npt.NDArray[np.uint64]:
    """Uniform elements of Z_2^64 as a numpy ``uint64`` array of the given shape."""
    shp = (shape,) if isinstance(shape, int) else tuple(shape)
    count = int(np.prod(shp, dtype=np.int64)) if shp else 1
    buf = secrets.token_bytes(8 * count)
    return np.frombuffer(buf, dtype="<u8").astype(np.uint64).reshape(shp)


def random_int_array(shape: int | tuple[int, ...], bits: int) -> list[int]:
    """A flat list of uniform Python ints in ``[0, 2**bits)`` (for masks wider than 64 bits)."""
    shp = (shape,) if isinstance(shape, int) else tuple(shape)
    count = int(np.prod(shp, dtype=np.int64)) if shp else 1
    nbytes = (bits + 7) // 8
    raw = secrets.token_bytes(nbytes * count)
    excess = nbytes * 8 - bits
    out = []
    for i in range(count):
        v = int.from_bytes(raw[i * nbytes : (i + 1) * nbytes], "little")
        out.append(v >> excess if excess else v)
    return out
