"""Fixed-point encoding of real numbers into the ring Z_2^64.

A real ``x`` is encoded as ``round(x * 2**frac_bits)`` in two's complement, stored as ``uint64``.
Decoding interprets the ring element as a signed ``int64`` and divides by ``2**frac_bits``.
The representable range is ``|x| < 2**(63 - frac_bits)``; values outside it (and NaN / inf)
raise :class:`veil.errors.InputError` instead of wrapping silently.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from veil.errors import ConfigError, InputError

__all__ = ["RING_BITS", "FixedPoint"]

RING_BITS = 64
"""Bit width of the ring used for fixed-point values and additive shares."""

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


class FixedPoint:
    """Fixed-point codec with ``frac_bits`` fractional bits over Z_2^64."""

    __slots__ = ("frac_bits", "scale")

    def __init__(self, frac_bits: int = 20) -> None:
        if not isinstance(frac_bits, int) or isinstance(frac_bits, bool) or not 0 <= frac_bits <= 52:
            raise ConfigError(f"frac_bits must be an int in [0, 52], got {frac_bits!r}")
        self.frac_bits = frac_bits
        self.scale = float(1 << frac_bits)

    def __repr__(self) -> str:
        return f"FixedPoint(frac_bits={self.frac_bits})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FixedPoint) and other.frac_bits == self.frac_bits

    def __hash__(self) -> int:
        return hash(("FixedPoint", self.frac_bits))

    @property
    def max_abs(self) -> float:
        """Largest magnitude that encodes without overflow (exclusive bound)."""
        return float(2 ** (63 - self.frac_bits))

    def encode(self, x: Any) -> U64:
        """Encode real values (array-like) to ring elements (``uint64``, same shape)."""
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"fixed-point encode needs numeric input: {exc}") from exc
        if not np.all(np.isfinite(arr)):
            raise InputError("fixed-point encode: input contains NaN or infinity")
        scaled = np.rint(arr * self.scale)
        # float64 2**63 is exactly representable; anything >= it overflows int64
        if arr.size and float(np.max(np.abs(scaled))) >= 2.0**63:
            raise InputError(
                f"fixed-point encode: |x| must be < 2**{63 - self.frac_bits} "
                f"with frac_bits={self.frac_bits}, got max |x| = {float(np.max(np.abs(arr)))}"
            )
        return scaled.astype(np.int64).view(np.uint64)

    def decode(self, x: Any) -> F64:
        """Decode ring elements (``uint64`` array-like) to float64, signed interpretation."""
        return self.to_signed(x).astype(np.float64) / self.scale

    @staticmethod
    def to_signed(x: Any) -> I64:
        """View ring elements as signed two's complement ``int64``."""
        arr = as_u64(x)
        return arr.view(np.int64)

    @staticmethod
    def from_signed(x: Any) -> U64:
        """Map signed integers (``int64`` array-like) to ring elements."""
        try:
            arr = np.asarray(x, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InputError(f"expected signed 64-bit integers: {exc}") from exc
        return arr.view(np.uint64)


def as_u64(x: Any) -> U64:
    """Coerce to a ``uint64`` ndarray; ``int64`` arrays are reinterpreted (two's complement)."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint64:
            return x
        if x.dtype == np.int64:
            return x.view(np.uint64)
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            return x.astype(np.int64).view(np.uint64)
        raise InputError(f"expected an integer array for ring elements, got dtype {x.dtype}")
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return np.asarray(int(x) % (1 << 64), dtype=np.uint64)
    if isinstance(x, (list, tuple)):
        flat = _flatten(x)
        for v in flat:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(
                    f"expected integers for ring elements, got {type(v).__name__} "
                    "(encode reals with FixedPoint first)"
                )
        try:
            return np.asarray([int(v) % (1 << 64) for v in flat], dtype=np.uint64).reshape(np.shape(x))
        except ValueError as exc:  # ragged nesting
            raise InputError(f"ring elements must form a regular array: {exc}") from exc
    raise InputError(f"expected ring elements (uint64 array), got {type(x).__name__}")


def _flatten(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        out: list[Any] = []
        for v in x:
            out.extend(_flatten(v))
        return out
    return [x]
