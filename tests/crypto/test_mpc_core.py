"""MPC primitives: every op equals the plaintext reference within a stated fixed-point error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from veil.comm import Channel
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC, OneHotMatrix
from veil.crypto.sharing import AShare, share, share_floats
from veil.crypto.triples import LocalDealer
from veil.testing import run_parties

FXP = FixedPoint(20)
ULP = 2.0**-20


def run_mpc(fn: Callable[..., Any], x0: Any, x1: Any, sources: Any = None) -> tuple[Any, Any]:
    """Run ``fn(mpc, share, extra)`` for both parties over a MemoryChannel pair."""
    s0, s1 = sources if sources is not None else LocalDealer.pair()

    def role(party: int, src: Any, arg: Any) -> Callable[[Channel], Any]:
        def f(ch: Channel) -> Any:
            mpc = MPC(ch, party, src, FXP, timeout=60)
            return fn(mpc, *arg)

        return f

    return run_parties(role(0, s0, x0), role(1, s1, x1), timeout=240)


def shared(x: np.ndarray) -> tuple[AShare, AShare]:
    return share_floats(x, FXP)


def both(fn: Callable[..., Any], *vals: np.ndarray, sources: Any = None) -> np.ndarray:
    """Share vals, run fn(mpc, *shares) on both sides, reveal result to both, return floats."""
    sh = [shared(v) for v in vals]
    a0 = tuple(s[0] for s in sh)
    a1 = tuple(s[1] for s in sh)

    def prog(mpc: MPC, *xs: AShare) -> np.ndarray:
        out = fn(mpc, *xs)
        return mpc.reveal_float(out)

    r0, r1 = run_mpc(prog, a0, a1, sources)
    np.testing.assert_array_equal(r0, r1)
    return r0


rng = np.random.default_rng(1)


def test_mul_matches_plaintext() -> None:
    x = rng.uniform(-1000, 1000, 500)
    y = rng.uniform(-1000, 1000, 500)
    got = both(lambda m, a, b: m.mul(a, b), x, y)
    assert np.max(np.abs(got - x * y)) < 1e-3  # inputs encoded with 0.5 ulp error each


def test_trunc_exact_within_one_ulp_for_large_values() -> None:
    x = rng.uniform(-(2.0**20), 2.0**20, 2000)
    y = rng.uniform(-3, 3, 2000)
    got = both(lambda m, a, b: m.mul(a, b), x, y)
    ref = FXP.decode(FXP.encode(x)) * FXP.decode(FXP.encode(y))
    assert np.max(np.abs(got - ref)) <= 2 * ULP


def test_ltz_and_select() -> None:
    x = np.concatenate([rng.uniform(-1e6, 1e6, 300), [0.0, ULP, -ULP, 1e9, -1e9]])
    got = both(lambda m, a: AShare(m.ltz(a).values, m.party, 20), x)
    np.testing.assert_array_equal(got * 2**20, (x < 0).astype(float))
    y = rng.uniform(-5, 5, x.size)
    sel = both(lambda m, a, b: m.select(m.ltz(a), a, b), x, y)
    np.testing.assert_allclose(sel, np.where(x < 0, x, y), atol=ULP)


def test_argmax_tournament() -> None:
    x = rng.uniform(-100, 100, (7, 13))
    sh = shared(x)

    def prog(mpc: MPC, a: AShare) -> tuple[np.ndarray, np.ndarray]:
        oh, mx = mpc.argmax(a, axis=1)
        return mpc.reveal(oh), mpc.reveal_float(mx)

    (oh, mx), _ = run_mpc(prog, (sh[0],), (sh[1],))
    np.testing.assert_array_equal(oh, np.eye(13, dtype=np.uint64)[np.argmax(x, axis=1)])
    np.testing.assert_allclose(mx, x.max(axis=1), atol=ULP)


def test_reciprocal_and_div() -> None:
    x = np.exp(rng.uniform(np.log(0.01), np.log(60000), 400))
    got = both(lambda m, a: m.reciprocal(a), x)
    np.testing.assert_allclose(got, 1 / x, rtol=1e-4, atol=8 * ULP)
    a = rng.uniform(-500, 500, 400)
    got = both(lambda m, p, q: m.div(p, q), a, x)
    np.testing.assert_allclose(got, a / x, rtol=1e-4, atol=8 * ULP)


def test_sigmoid_error_bound() -> None:
    x = np.concatenate([np.linspace(-40, 40, 801), [-1000.0, 1000.0, 0.0]])
    got = both(lambda m, a: m.sigmoid(a), x)
    err = np.max(np.abs(got - 1 / (1 + np.exp(-np.clip(x, -700, 700)))))
    assert err < 2e-4, err


def test_matmul_and_public_matrix() -> None:
    x = rng.uniform(-10, 10, (6, 5))
    y = rng.uniform(-10, 10, (5, 4))
    got = both(lambda m, a, b: m.matmul(a, b), x, y)
    np.testing.assert_allclose(got, x @ y, atol=1e-3)

    n, feats, nb = 300, 3, 8
    bins = rng.integers(0, nb, (n, feats))
    onehot = OneHotMatrix(bins, nb)
    dense = onehot.to_dense().astype(np.float64)
    v = rng.uniform(-2, 2, (n, 4))
    sh = shared(v)

    def prog(mpc: MPC, a: AShare, mat: Any, dmat: Any) -> tuple[Any, ...]:
        pm = mpc.public_matrix(mat, holder=1, shape=(n, feats * nb))
        pm.prepare(5)  # 4 + 1 columns consumed below without new correlation
        r1 = mpc.reveal_float(pm.t_matmul(a))
        r2 = mpc.reveal_float(pm.t_matmul(a[:, 0]))
        left = pm.available
        r3 = mpc.reveal_float(pm.t_matmul(a[:, 1:3]))  # prepares again
        pd = mpc.public_matrix(dmat, holder=0, shape=(n, 7))  # dense matrix held by party 0
        r4 = mpc.reveal_float(pd.t_matmul(a))
        return r1, r2, r3, r4, left

    dm = rng.integers(-3, 4, (n, 7))
    (r1, r2, r3, r4, left), _ = run_mpc(prog, (sh[0], None, dm), (sh[1], onehot, None))
    np.testing.assert_allclose(r1, dense.T @ v, atol=1e-3)
    np.testing.assert_allclose(r2, dense.T @ v[:, 0], atol=1e-3)
    np.testing.assert_allclose(r3, dense.T @ v[:, 1:3], atol=1e-3)
    np.testing.assert_allclose(r4, dm.T @ v, atol=1e-3)
    assert left == 0


def test_ltz_with_bit_bound() -> None:
    bound = 2.0**10  # |x| < 2^10 real -> |ring value| < 2^30
    x = np.concatenate([rng.uniform(-bound + 1, bound - 1, 200), [0.0, ULP, -ULP, bound - ULP, -bound + ULP]])
    got = both(lambda m, a: AShare(m.ltz(a, bits=31).values, m.party, 20), x)
    np.testing.assert_array_equal(got * 2**20, (x < 0).astype(float))
    v = rng.uniform(0, 100, (3, 9))
    sh = shared(v)

    def prog(mpc: MPC, a: AShare) -> np.ndarray:
        return mpc.reveal(mpc.argmax(a, bits=28)[0])

    oh, _ = run_mpc(prog, (sh[0],), (sh[1],))
    np.testing.assert_array_equal(oh, np.eye(9, dtype=np.uint64)[np.argmax(v, axis=1)])


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 17, 40, 62, 63])
def test_ltz_every_bit_width(bits: int) -> None:
    lim = 2**bits
    raw = np.concatenate([rng.integers(-lim + 1, lim, 300, dtype=np.int64), [0, 1, -1, lim - 1, -lim + 1]])
    raw = np.clip(raw, -(2**63) + 1, 2**63 - 1).astype(np.int64)
    s0, s1 = share(raw.view(np.uint64))

    def prog(mpc: MPC, v: Any) -> np.ndarray:
        return mpc.reveal(mpc.ltz(AShare(v, mpc.party, 0), bits=bits))

    r0, _ = run_mpc(prog, (s0,), (s1,))
    np.testing.assert_array_equal(r0, (raw < 0).astype(np.uint64))


def test_out_of_step_or_malformed_frames_are_refused() -> None:
    from veil.comm import MemoryChannel
    from veil.crypto.mpc import MpcOpen
    from veil.errors import ProtocolError

    s0, _ = LocalDealer.pair()
    a, b = MemoryChannel.pair(timeout=5)
    mpc = MPC(a, 0, s0, FXP, timeout=5)
    b.send(MpcOpen(7, [np.zeros(3, np.uint64)]))  # wrong step
    with pytest.raises(ProtocolError, match="stage"):
        mpc.exchange([np.zeros(3, np.uint64)])
    mpc2 = MPC(a, 0, s0, FXP, timeout=5)
    b.send(MpcOpen(0, [np.zeros(4, np.uint64)]))  # wrong shape
    with pytest.raises(ProtocolError, match="does not match"):
        mpc2.exchange([np.zeros(3, np.uint64)])
    mpc3 = MPC(a, 0, s0, FXP, timeout=5)
    b.send(MpcOpen(0, [np.zeros(2, np.uint64)]))
    with pytest.raises(ProtocolError):
        mpc3.share(None, owner=1, shape=(3,))


def test_ring_matmul_exact_against_python_ints() -> None:
    from veil.crypto.mpc_ring import RingMatrix, ring_matmul

    r = np.random.default_rng(21)
    a = r.integers(0, 2**64 - 1, (9, 37), dtype=np.uint64, endpoint=True)
    b = r.integers(0, 2**64 - 1, (37, 5), dtype=np.uint64, endpoint=True)
    a[0, :] = np.uint64(2**64 - 1)  # extreme limbs
    b[:, 0] = np.uint64(2**64 - 1)
    ai, bi = a.astype(object), b.astype(object)
    ref = np.array([[int(sum(ai[i, t] * bi[t, j] for t in range(37)) % 2**64) for j in range(5)]
                    for i in range(9)], dtype=np.uint64)
    np.testing.assert_array_equal(ring_matmul(a, b), ref)
    np.testing.assert_array_equal(ring_matmul(np.asfortranarray(a), b), ref)
    np.testing.assert_array_equal(RingMatrix(a, cache=True).matmul(b), ref)
    np.testing.assert_array_equal(ring_matmul(a, b[:, 2]), ref[:, 2])
