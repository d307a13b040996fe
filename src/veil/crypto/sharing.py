"""Two-party additive secret sharing over Z_2^64 (numpy ``uint64``, wrap-around arithmetic).

``share(x)`` returns ``(r, x - r)`` with ``r`` uniform from :mod:`veil.crypto.random`; each share
alone is uniformly distributed and says nothing about ``x``. :class:`AShare` is one party's
share; its operators are the *local* operations of the scheme (no communication):

* ``a + b``, ``a - b``, ``-a``                   share-wise;
* ``a + p``, ``a - p``, ``p - a`` (public ``p``)  only party 0 adds ``p``;
* ``a * k`` (public integer or integer array)    share-wise, modulo 2^64.

Multiplying two shares needs a protocol (Beaver triples): see ``veil.crypto.mpc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, SupportsIndex

import numpy as np
import numpy.typing as npt

from veil.crypto.encoding import FixedPoint, as_u64
from veil.crypto.random import random_u64
from veil.errors import InputError

__all__ = ["AShare", "reconstruct", "share", "share_floats"]

U64 = npt.NDArray[np.uint64]


def share(x: Any) -> tuple[U64, U64]:
    """Split ring elements ``x`` into two additive shares ``(s0, s1)`` with ``s0 + s1 = x``."""
    arr = as_u64(x)
    r = random_u64(arr.shape)
    return r, arr - r


def reconstruct(a: Any, b: Any) -> U64:
    """Recombine two additive shares: ``a + b mod 2^64``."""
    aa, bb = _unwrap(a), _unwrap(b)
    if aa.shape != bb.shape:
        raise InputError(f"share shapes differ: {aa.shape} vs {bb.shape}")
    return aa + bb


def share_floats(x: Any, fxp: FixedPoint) -> tuple[AShare, AShare]:
    """Fixed-point encode real values and share them; returns both parties' :class:`AShare`."""
    s0, s1 = share(fxp.encode(x))
    return AShare(s0, 0, fxp.frac_bits), AShare(s1, 1, fxp.frac_bits)


def _unwrap(x: Any) -> U64:
    if isinstance(x, AShare):
        return x.values
    return as_u64(x)


def _public(p: Any) -> U64:
    """A public operand (int, int array, or uint64 ring elements) as uint64."""
    if isinstance(p, AShare):
        raise InputError("expected a public value, got an AShare")
    if isinstance(p, np.ndarray) and np.issubdtype(p.dtype, np.floating):
        raise InputError("public operand must be ring elements (ints); encode floats with FixedPoint first")
    if isinstance(p, float):
        raise InputError("public operand must be an int; encode floats with FixedPoint first")
    return as_u64(p)


class AShare:
    """One party's additive share of a Z_2^64 tensor (fixed-point scale ``frac_bits``)."""

    __slots__ = ("frac_bits", "party", "values")
    __array_priority__ = 1000  # make ``ndarray op AShare`` defer to our reflected operators

    def __init__(self, values: Any, party: int, frac_bits: int = 0) -> None:
        if party not in (0, 1):
            raise InputError(f"party must be 0 or 1, got {party!r}")
        if not isinstance(frac_bits, int) or frac_bits < 0:
            raise InputError(f"frac_bits must be a non-negative int, got {frac_bits!r}")
        self.values: U64 = as_u64(values)
        self.party: int = party
        self.frac_bits: int = frac_bits

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def zeros(cls, shape: int | tuple[int, ...], party: int, frac_bits: int = 0) -> AShare:
        return cls(np.zeros(shape, dtype=np.uint64), party, frac_bits)

    @classmethod
    def from_public(cls, value: Any, party: int, frac_bits: int = 0) -> AShare:
        """A trivial sharing of a public value: party 0 holds it, party 1 holds zero."""
        v = _public(value)
        return cls(v.copy() if party == 0 else np.zeros_like(v), party, frac_bits)

    # ---- introspection ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def size(self) -> int:
        return int(self.values.size)

    @property
    def ndim(self) -> int:
        return int(self.values.ndim)

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"AShare(party={self.party}, shape={self.shape}, frac_bits={self.frac_bits})"

    # ---- helpers ------------------------------------------------------------------------
    def _same(self, values: U64) -> AShare:
        return AShare(values, self.party, self.frac_bits)

    def _check_peer(self, other: AShare) -> None:
        if other.party != self.party:
            raise InputError(
                f"cannot combine shares of different parties locally ({self.party} vs {other.party})"
            )
        if other.frac_bits != self.frac_bits:
            raise InputError(
                f"fixed-point scales differ: {self.frac_bits} vs {other.frac_bits} fractional bits"
            )

    def _add_public(self, p: Any) -> U64:
        pub = _public(p)
        if self.party == 0:
            return self.values + pub
        return np.broadcast_to(self.values, np.broadcast_shapes(self.values.shape, pub.shape)).copy()

    # ---- local arithmetic ---------------------------------------------------------------
    def __add__(self, other: Any) -> AShare:
        if isinstance(other, AShare):
            self._check_peer(other)
            return self._same(self.values + other.values)
        return self._same(self._add_public(other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> AShare:
        if isinstance(other, AShare):
            self._check_peer(other)
            return self._same(self.values - other.values)
        return self + (-_public(other))

    def __rsub__(self, other: Any) -> AShare:
        # public - share
        return (-self) + other

    def __neg__(self) -> AShare:
        return self._same(np.zeros_like(self.values) - self.values)

    def __mul__(self, k: Any) -> AShare:
        if isinstance(k, AShare):
            raise InputError("share * share needs a protocol: use veil.crypto.mpc.MPC.mul")
        return self._same(self.values * _public(k))

    __rmul__ = __mul__

    # ---- shape ops ----------------------------------------------------------------------
    def __getitem__(self, idx: Any) -> AShare:
        v = self.values[idx]
        return self._same(np.asarray(v, dtype=np.uint64))

    def reshape(self, *shape: SupportsIndex | Sequence[SupportsIndex]) -> AShare:
        return self._same(self.values.reshape(*shape))  # type: ignore[arg-type,call-overload]

    def sum(self, axis: int | tuple[int, ...] | None = None) -> AShare:
        return self._same(np.asarray(self.values.sum(axis=axis, dtype=np.uint64), dtype=np.uint64))

    def copy(self) -> AShare:
        return self._same(self.values.copy())

    @property
    def T(self) -> AShare:
        return self._same(self.values.T)

    @staticmethod
    def concatenate(parts: Sequence[AShare], axis: int = 0) -> AShare:
        if not parts:
            raise InputError("concatenate needs at least one share")
        first = parts[0]
        for p in parts[1:]:
            first._check_peer(p)
        return first._same(np.concatenate([p.values for p in parts], axis=axis))
