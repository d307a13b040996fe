"""Ring helpers for the MPC layer: exact Z_2^64 matrix products, a seeded PRG, bit packing.

numpy has no BLAS path for integer matrices (a uint64 ``A @ B`` of boost's size takes tens of
seconds), so :func:`ring_matmul` splits both operands into 16-bit limbs and runs float64 GEMMs
that are *exact*: a product of two 16-bit limbs summed over at most 2^20 rows stays below
2^52. Only the limb pairs that land below bit 64 are computed (10 of 16).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from veil.errors import InputError

__all__ = ["PRG", "U8", "U64", "RingMatrix", "ring_matmul"]

U64 = npt.NDArray[np.uint64]
U8 = npt.NDArray[np.uint8]

_LIMB = 16
_MASK16 = np.uint64(0xFFFF)
_CHUNK = 1 << 12  # contraction rows per GEMM block (exactness needs <= 2^20)


def _limbs(x: U64) -> list[npt.NDArray[np.float64]]:
    """The four 16-bit limbs of ``x`` as float64 arrays (low limb first)."""
    if sys.byteorder != "little":  # pragma: no cover - the uint16 view below assumes little-endian
        return [((x >> np.uint64(_LIMB * i)) & _MASK16).astype(np.float64) for i in range(4)]
    if x.ndim == 2 and x.flags.f_contiguous and not x.flags.c_contiguous:
        xt = x.T  # C-contiguous view: read each element's 4 limbs from one uint16 view
        v = xt.view(np.uint16).reshape((*xt.shape, 4))
        return [np.ascontiguousarray(v[..., i], dtype=np.float64).T for i in range(4)]
    v = np.ascontiguousarray(x).view(np.uint16).reshape((*x.shape, 4))
    return [np.ascontiguousarray(v[..., i], dtype=np.float64) for i in range(4)]


def ring_matmul(a: Any, b: Any) -> U64:
    """Exact ``a @ b mod 2^64`` for uint64 matrices (2-D ``a`` (m, k), ``b`` (k, n) or 1-D ``b``)."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    vec = b.ndim == 1
    if vec:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise InputError(f"ring_matmul: shapes {a.shape} and {b.shape} do not align")
    m, k = a.shape
    n = b.shape[1]
    out = np.zeros((m, n), dtype=np.uint64)
    for start in range(0, k, _CHUNK):
        stop = min(k, start + _CHUNK)
        al = _limbs(a[:, start:stop])
        bl = _limbs(b[start:stop])
        for i in range(4):
            for j in range(4 - i):
                prod = al[i] @ bl[j]  # exact: < 2^16 * 2^16 * 2^14 = 2^46
                out += prod.astype(np.uint64) << np.uint64(_LIMB * (i + j))
    return out[:, 0] if vec else out


class RingMatrix:
    """A fixed left operand ``a`` (m, k) for repeated exact products ``a @ b mod 2^64``.

    Pass ``E.T`` of a C-ordered ``E`` (an F-ordered view) rather than a contiguous transpose:
    the contraction chunks are then contiguous. With ``cache=True`` the float64 limbs of ``a``
    are computed once (32 bytes per element);
    ``cache=None`` caches when that stays below ``cache_limit_bytes`` (default 512 MiB).
    """

    def __init__(self, a: Any, *, cache: bool | None = None, cache_limit_bytes: int = 512 << 20) -> None:
        self.a = np.asarray(a, dtype=np.uint64)  # keep F-ordered views: column chunks stay contiguous
        if self.a.ndim != 2:
            raise InputError("RingMatrix needs a 2-D matrix")
        if cache is None:
            cache = self.a.size * 32 <= cache_limit_bytes
        self._chunks: list[list[npt.NDArray[np.float64]]] | None = None
        if cache:
            k = self.a.shape[1]
            self._chunks = [_limbs(self.a[:, s:min(k, s + _CHUNK)]) for s in range(0, k, _CHUNK)]

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.a.shape[1]))

    def matmul(self, b: Any) -> U64:
        if self._chunks is None:
            return ring_matmul(self.a, b)
        b = np.asarray(b, dtype=np.uint64)
        vec = b.ndim == 1
        if vec:
            b = b[:, None]
        m, k = self.shape
        if b.ndim != 2 or b.shape[0] != k:
            raise InputError(f"RingMatrix.matmul: shapes {self.shape} and {b.shape} do not align")
        out = np.zeros((m, b.shape[1]), dtype=np.uint64)
        for ci, start in enumerate(range(0, k, _CHUNK)):
            al = self._chunks[ci]
            bl = _limbs(b[start:min(k, start + _CHUNK)])
            for i in range(4):
                for j in range(4 - i):
                    out += (al[i] @ bl[j]).astype(np.uint64) << np.uint64(_LIMB * (i + j))
        return out[:, 0] if vec else out


class PRG:
    """AES-256-CTR keystream keyed by a 32-byte seed; ``stream(label)`` gives an independent
    deterministic stream per 64-bit label (the label is the CTR nonce prefix).

    Used by the trusted dealer so one party's correlated randomness costs a seed, not bytes.
    """

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise InputError("PRG seed must be 32 bytes")
        self._seed = seed

    def stream(self, label: int) -> PRGStream:
        return PRGStream(self._seed, label)


class PRGStream:
    """Sequential reader over one AES-CTR keystream."""

    def __init__(self, seed: bytes, label: int) -> None:
        nonce = int(label % (1 << 64)).to_bytes(8, "little") + b"\x00" * 8
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor()

    def bytes(self, n: int) -> bytes:
        return self._enc.update(b"\x00" * n)

    def u64(self, shape: int | tuple[int, ...]) -> U64:
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        count = int(np.prod(shp, dtype=np.int64)) if shp else 1
        return np.frombuffer(self.bytes(8 * count), dtype="<u8").astype(np.uint64).reshape(shp)

    def u8(self, n: int) -> U8:
        return np.frombuffer(self.bytes(n), dtype=np.uint8).copy()
