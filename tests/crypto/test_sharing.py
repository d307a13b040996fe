"""Additive sharing over Z_2^64: reconstruction, local operators, hiding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.crypto.encoding import FixedPoint
from veil.crypto.sharing import AShare, reconstruct, share, share_floats
from veil.errors import InputError

u64s = st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(u64s)
def test_share_reconstruct(xs: list[int]) -> None:
    x = np.array(xs, dtype=np.uint64)
    a, b = share(x)
    assert a.dtype == b.dtype == np.uint64
    np.testing.assert_array_equal(reconstruct(a, b), x)


@settings(max_examples=100, deadline=None)
@given(u64s, st.integers(min_value=-(2**70), max_value=2**70))
def test_local_ops_match_plaintext(xs: list[int], k: int) -> None:
    x = np.array(xs, dtype=np.uint64)
    y = x[::-1].copy()
    xa, xb = share(x)
    ya, yb = share(y)
    X0, X1 = AShare(xa, 0), AShare(xb, 1)
    Y0, Y1 = AShare(ya, 0), AShare(yb, 1)
    M = 2**64
    ref_add = [(int(p) + int(q)) % M for p, q in zip(x, y, strict=True)]
    ref_sub = [(int(p) - int(q)) % M for p, q in zip(x, y, strict=True)]
    ref_mul = [(int(p) * k) % M for p in x]
    ref_pub = [(int(p) + 7) % M for p in x]
    ref_neg = [(-int(p)) % M for p in x]
    assert reconstruct(X0 + Y0, X1 + Y1).tolist() == ref_add
    assert reconstruct(X0 - Y0, X1 - Y1).tolist() == ref_sub
    assert reconstruct(X0 * k, X1 * k).tolist() == ref_mul
    assert reconstruct(k * X0, k * X1).tolist() == ref_mul
    assert reconstruct(X0 + 7, X1 + 7).tolist() == ref_pub
    assert reconstruct(7 + X0, 7 + X1).tolist() == ref_pub
    assert reconstruct(-X0, -X1).tolist() == ref_neg
    assert reconstruct((X0 - 7), (X1 - 7)).tolist() == [(int(p) - 7) % M for p in x]
    assert reconstruct((7 - X0), (7 - X1)).tolist() == [(7 - int(p)) % M for p in x]
    assert int(reconstruct(X0.sum(), X1.sum())) == sum(int(p) for p in x) % M


def test_fixed_point_sharing_and_public_array() -> None:
    fxp = FixedPoint(16)
    x = np.array([[1.5, -2.0], [3.25, -0.5]])
    p = np.array([[0.5, 0.5], [-1.0, 1.0]])
    s0, s1 = share_floats(x, fxp)
    r0, r1 = s0 + fxp.encode(p), s1 + fxp.encode(p)
    np.testing.assert_allclose(fxp.decode(reconstruct(r0, r1)), x + p)
    # elementwise public int array multiply, indexing, reshape, sum(axis)
    k = np.array([[2, -3], [1, 0]], dtype=np.int64)
    m0, m1 = s0 * k, s1 * k
    np.testing.assert_allclose(fxp.decode(reconstruct(m0, m1)), x * k)
    np.testing.assert_allclose(fxp.decode(reconstruct(s0[1], s1[1])), x[1])
    np.testing.assert_allclose(fxp.decode(reconstruct(s0.reshape(4), s1.reshape(4))), x.reshape(4))
    np.testing.assert_allclose(fxp.decode(reconstruct(s0.sum(axis=0), s1.sum(axis=0))), x.sum(axis=0))
    np.testing.assert_allclose(fxp.decode(reconstruct(s0.T, s1.T)), x.T)


def test_shares_look_uniform() -> None:
    # a share of all-zeros is the uniform mask itself: both halves of the bit range are hit
    a, b = share(np.zeros(4096, dtype=np.uint64))
    top_bits = (a >> np.uint64(63)).astype(np.int64)
    assert 1700 < int(top_bits.sum()) < 2400
    assert len(np.unique(a)) == 4096
    np.testing.assert_array_equal(a + b, 0)


def test_errors() -> None:
    a0 = AShare(np.zeros(3, dtype=np.uint64), 0, 16)
    a1 = AShare(np.zeros(3, dtype=np.uint64), 1, 16)
    with pytest.raises(InputError, match="different parties"):
        _ = a0 + a1
    with pytest.raises(InputError, match="scales"):
        _ = a0 + AShare(np.zeros(3, dtype=np.uint64), 0, 8)
    with pytest.raises(InputError, match="protocol"):
        _ = a0 * a0
    with pytest.raises(InputError, match="party"):
        AShare(np.zeros(3, dtype=np.uint64), 2)
    with pytest.raises(InputError):
        _ = a0 + 1.5
    with pytest.raises(InputError, match="shapes"):
        reconstruct(np.zeros(2, dtype=np.uint64), np.zeros(3, dtype=np.uint64))


def test_numpy_left_operand_defers_to_share() -> None:
    x = np.array([1, 2, 3], dtype=np.uint64)
    p = np.array([10, 20, 30], dtype=np.uint64)
    a, b = share(x)
    A, B = AShare(a, 0), AShare(b, 1)
    r0, r1 = p + A, p + B
    assert isinstance(r0, AShare)
    assert reconstruct(r0, r1).tolist() == [11, 22, 33]
    assert reconstruct(p - A, p - B).tolist() == [9, 18, 27]
    assert reconstruct(AShare.from_public(p, 0) + A, AShare.from_public(p, 1) + B).tolist() == [11, 22, 33]
    z0 = AShare.zeros(3, 0)
    assert reconstruct(AShare.concatenate([A, z0]), AShare.concatenate([B, AShare.zeros(3, 1)])).tolist() == [
        1,
        2,
        3,
        0,
        0,
        0,
    ]


def test_public_lists_must_be_ints() -> None:
    a = AShare(np.zeros(2, dtype=np.uint64), 0)
    assert a.__add__([1, -1]).values.tolist() == [1, 2**64 - 1]
    with pytest.raises(InputError):
        a.__add__([1.5, 2.0])
    with pytest.raises(InputError):
        _ = a * [True, False]
    with pytest.raises(InputError):
        share([[1, 2], [3]])
