"""FixedPoint encoding: round trips, ring semantics, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.crypto.encoding import FixedPoint
from veil.errors import ConfigError, InputError

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=0, max_size=50), st.integers(min_value=0, max_value=30))
def test_round_trip_within_resolution(xs: list[float], frac_bits: int) -> None:
    fxp = FixedPoint(frac_bits)
    x = np.array(xs, dtype=np.float64)
    enc = fxp.encode(x)
    assert enc.dtype == np.uint64
    dec = fxp.decode(enc)
    assert np.all(np.abs(dec - x) <= 0.5 / 2**frac_bits + 1e-9 * np.abs(x))


def test_negative_is_twos_complement() -> None:
    fxp = FixedPoint(16)
    enc = fxp.encode(np.array([-1.0, 1.0, 0.0]))
    assert int(enc[0]) == 2**64 - 2**16
    assert int(enc[1]) == 2**16
    assert int(enc[2]) == 0
    assert fxp.to_signed(enc).tolist() == [-(2**16), 2**16, 0]


def test_ring_addition_is_real_addition() -> None:
    fxp = FixedPoint(20)
    a = np.array([1.5, -2.25, 1000.0, -0.001])
    b = np.array([-3.0, 2.25, -999.5, 0.002])
    s = fxp.encode(a) + fxp.encode(b)
    np.testing.assert_allclose(fxp.decode(s), a + b, atol=2**-19)


def test_scalar_preserved_shape() -> None:
    fxp = FixedPoint()
    assert fxp.encode(3.25).shape == ()
    assert fxp.decode(fxp.encode(3.25)) == 3.25
    assert fxp.encode(np.zeros((2, 3))).shape == (2, 3)


def test_overflow_rejected() -> None:
    fxp = FixedPoint(20)
    with pytest.raises(InputError, match="must be <"):
        fxp.encode(np.array([2.0**43]))
    fxp.encode(np.array([2.0**42]))  # fits


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], ["abc"]])
def test_bad_values_rejected(bad: list[object]) -> None:
    with pytest.raises(InputError):
        FixedPoint().encode(bad)


@pytest.mark.parametrize("fb", [-1, 53, 2.5])
def test_bad_frac_bits(fb: object) -> None:
    with pytest.raises(ConfigError):
        FixedPoint(fb)  # type: ignore[arg-type]
