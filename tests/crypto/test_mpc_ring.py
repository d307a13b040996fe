"""mpc_ring.ring_matmul / RingMatrix: exact mod 2^64 across contraction blocks and layouts."""

from __future__ import annotations

import numpy as np
import pytest

from veil.crypto import mpc_ring
from veil.crypto.mpc_ring import RingMatrix, ring_matmul
from veil.errors import InputError


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Python-int product reduced mod 2^64 (independent of numpy's integer kernels)."""
    ai, bi = a.astype(object), b.astype(object)
    return np.array((ai @ bi) % (1 << 64), dtype=np.uint64)


@pytest.mark.parametrize("k", [1, mpc_ring._CHUNK - 1, mpc_ring._CHUNK + 3])
def test_exact_across_blocks_and_layouts(k: int) -> None:
    r = np.random.default_rng(k)
    a = r.integers(0, 2**64 - 1, (3, k), dtype=np.uint64, endpoint=True)
    b = r.integers(0, 2**64 - 1, (k, 2), dtype=np.uint64, endpoint=True)
    a[0] = np.uint64(2**64 - 1)
    ref = _reference(a, b)
    np.testing.assert_array_equal(ring_matmul(a, b), ref)
    np.testing.assert_array_equal(ring_matmul(np.asfortranarray(a), b), ref)
    np.testing.assert_array_equal(ring_matmul(np.ascontiguousarray(a.T).T, b), ref)  # F-ordered view
    np.testing.assert_array_equal(ring_matmul(a, b[:, 1]), ref[:, 1])
    for cache in (True, False, None):
        np.testing.assert_array_equal(RingMatrix(a.T.T, cache=cache).matmul(b), ref)


def test_empty_and_misaligned() -> None:
    z = ring_matmul(np.zeros((2, 0), np.uint64), np.zeros((0, 3), np.uint64))
    assert z.shape == (2, 3) and not z.any()
    with pytest.raises(InputError):
        ring_matmul(np.zeros((2, 3), np.uint64), np.zeros((4, 1), np.uint64))
    with pytest.raises(InputError):
        RingMatrix(np.zeros((2, 3), np.uint64)).matmul(np.zeros((2, 1), np.uint64))
