"""Dealer-free one-hot product (veil.crypto.onehot): GGM puncturing, exact bucket sums against the
plaintext product for both owners, native kernel == numpy reference, malformed peer messages
refused, and the owner's view of the peer's share masked."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from veil.comm import Channel
from veil.crypto import onehot as O
from veil.crypto import triples_ot as T
from veil.errors import ProtocolError
from veil.testing import run_parties

native = O._native()
needs_native = pytest.mark.skipif(native is None, reason="native one-hot kernel unavailable (numpy only)")


def _dense(bins: np.ndarray, n_bins: int) -> np.ndarray:
    n, f = bins.shape
    m = np.zeros((n, f * n_bins), dtype=np.uint64)
    for j in range(f):
        m[np.arange(n), j * n_bins + bins[:, j]] = 1
    return m


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_punctured_tree_has_every_leaf_but_alpha(depth: int) -> None:
    rng = np.random.default_rng(depth)
    n_leaves = 1 << depth
    alpha = np.arange(n_leaves, dtype=np.int64).repeat(2)  # every position, twice
    roots = rng.integers(0, 256, (alpha.size, 16), dtype=np.uint8)
    leaves, sums = O.ggm_expand(roots, depth)
    assert leaves.shape == (alpha.size, n_leaves, 16)
    bits = (alpha[:, None] >> np.arange(depth - 1, -1, -1)[None, :]) & 1
    got = sums[np.arange(alpha.size)[:, None], np.arange(depth)[None, :], 1 - bits]  # off-path side
    punct = O.ggm_punctured(alpha, got, depth)
    for r, a in enumerate(alpha):
        keep = np.arange(n_leaves) != a
        np.testing.assert_array_equal(punct[r, keep], leaves[r, keep])
        assert not punct[r, a].any()
    assert len({leaves[r, 0].tobytes() for r in range(alpha.size)}) == alpha.size  # distinct roots
    # the wrong side of the top level gives wrong leaves (the test can fail)
    bad = got.copy()
    bad[:, 0] ^= 1
    assert not np.array_equal(O.ggm_punctured(alpha, bad, depth), punct)
    if native is not None:  # the native set-up is byte-identical, also when keeping fewer leaves
        for keep in (n_leaves, max(1, n_leaves - 3)):
            lv, sm = native.ggm_expand(roots, depth, keep, O._KEY)
            np.testing.assert_array_equal(lv, leaves[:, :keep])
            np.testing.assert_array_equal(sm, sums)
            got_native = native.ggm_punctured(alpha, got, depth, keep, O._KEY)
            np.testing.assert_array_equal(got_native, punct[:, :keep])


def _role(p: int, bins: list[np.ndarray], n_bins: int, shares: list[list[np.ndarray]],
          use_native: bool | None) -> Any:
    feats = (bins[0].shape[1], bins[1].shape[1])

    def f(ch: Channel) -> list[tuple[np.ndarray, np.ndarray]]:
        ot = T.OTExtension(ch, p, timeout=60)
        prod = O.OneHotProduct(ot, p, bins[p], bins[p].shape[0], feats, n_bins, use_native=use_native)
        return [prod.sums(x[p]) for x in shares]

    return f


def _case(n: int, feats: tuple[int, int], n_bins: int, widths: tuple[int, ...], seed: int) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    bins = [rng.integers(0, n_bins, (n, f)).astype(np.int32) for f in feats]
    if feats[0]:
        bins[0][:, 0] = n_bins - 1  # the last (NaN) bin, a single occupied bin
    xs = [rng.integers(0, 2**64 - 1, (n, c), dtype=np.uint64, endpoint=True) for c in widths]
    shares = []
    for x in xs:
        r = rng.integers(0, 2**64 - 1, x.shape, dtype=np.uint64, endpoint=True)
        shares.append([x - r, r])
    return bins, xs, shares


@pytest.mark.parametrize(
    ("paths", "n", "feats", "n_bins"),
    [
        ((False, False), 101, (3, 2), 17),  # numpy; n and bins not powers of two
        pytest.param((True, True), 101, (3, 2), 17, marks=needs_native),
        pytest.param((True, False), 64, (2, 4), 5, marks=needs_native),
        ((None, None), 40, (0, 3), 2),  # one party owns no features; depth-1 trees
    ],
)
def test_sums_reconstruct_the_plaintext_product(paths: tuple[Any, Any], n: int, feats: tuple[int, int],
                                                n_bins: int) -> None:
    """Both owners' bucket sums, three calls of widths 2, 1 (odd) and 4, reconstruct ``M^T X``
    mod 2^64 exactly; parties on different paths (native / numpy) interoperate."""
    bins, xs, shares = _case(n, feats, n_bins, (2, 1, 4), seed=n + n_bins)
    r0, r1 = run_parties(_role(0, bins, n_bins, shares, paths[0]), _role(1, bins, n_bins, shares, paths[1]),
                         timeout=120)
    for call, x in enumerate(xs):
        for h in (0, 1):
            ref = _dense(bins[h], n_bins).T @ x  # uint64 matmul wraps: exact mod 2^64
            got = r0[call][h] + r1[call][h]
            assert got.shape == (feats[h] * n_bins, x.shape[1])
            np.testing.assert_array_equal(got, ref)
            if ref.size:
                assert not np.array_equal(r0[call][h], ref)  # a share alone is not the sum


@needs_native
def test_native_kernel_equals_numpy_reference() -> None:
    rng = np.random.default_rng(3)
    for n, f, nl, c in ((7, 3, 17, 16), (5, 1, 2, 3), (9, 2, 9, 1)):
        leaves = rng.integers(0, 256, (n, f, nl, 16), dtype=np.uint8)
        x = rng.integers(0, 2**64 - 1, (n, c), dtype=np.uint64, endpoint=True)
        bins = rng.integers(0, nl, (n, f)).astype(np.int32)
        tweak = int(rng.integers(0, 2**40))
        d_ref, a_ref = O.prf_send(leaves, x, tweak)
        d, a = native.onehot_send(leaves, x, tweak, O._KEY)
        np.testing.assert_array_equal(d, d_ref)
        np.testing.assert_array_equal(a, a_ref)
        np.testing.assert_array_equal(native.onehot_recv(leaves, bins, d_ref, tweak, O._KEY),
                                      O.prf_recv(leaves, bins, d_ref, tweak))
        # the receiver ignores its leaf at the bin (it does not know it)
        blind = leaves.copy()
        blind[np.arange(n)[:, None], np.arange(f)[None, :], bins] = 0
        np.testing.assert_array_equal(native.onehot_recv(blind, bins, d_ref, tweak, O._KEY),
                                      O.prf_recv(leaves, bins, d_ref, tweak))
    with pytest.raises(ValueError, match="out of range"):
        native.onehot_recv(leaves, bins + nl, d_ref, 0, O._KEY)
    with pytest.raises(ValueError):
        native.onehot_send(leaves[:, :, :, :8], x, 0, O._KEY)


def test_owner_view_is_masked_and_fresh_per_call() -> None:
    """The corrections the owner receives are uniform-looking even for an all-zero share, and two
    calls on the same share differ (fresh tweak per call)."""
    n, n_bins = 400, 17
    rng = np.random.default_rng(9)
    bins = [rng.integers(0, n_bins, (n, 2)).astype(np.int32), np.zeros((n, 0), np.int32)]
    seen: list[np.ndarray] = []

    def owner(ch: Channel) -> None:
        ot = T.OTExtension(ch, 0, timeout=60)
        orig = ot.exchange

        def spy(arrays: Any, **kw: Any) -> Any:
            got = orig(arrays, **kw)
            seen.append(got[0])
            return got

        ot.exchange = spy  # type: ignore[method-assign]
        prod = O.OneHotProduct(ot, 0, bins[0], n, (2, 0), n_bins)
        for _ in range(2):
            prod.sums(np.zeros((n, 4), np.uint64))

    def peer(ch: Channel) -> None:
        ot = T.OTExtension(ch, 1, timeout=60)
        prod = O.OneHotProduct(ot, 1, bins[1], n, (2, 0), n_bins)
        for _ in range(2):
            prod.sums(np.zeros((n, 4), np.uint64))  # the peer's share is all zero too

    run_parties(owner, peer, timeout=60)
    d1, d2 = seen[-2], seen[-1]
    assert d1.shape == (n, 2, 4) and d1.dtype == np.uint64
    assert abs(float((d1 >> np.uint64(63)).mean()) - 0.5) < 0.05
    assert len(np.unique(d1)) == d1.size
    assert not np.any(d1 == d2)
    setup = seen[0]  # the GGM corrections: uniform bytes
    assert abs(float(np.unpackbits(setup).mean()) - 0.5) < 0.02


def test_malformed_peer_messages_are_refused() -> None:
    n, n_bins = 16, 4
    bins = [np.zeros((n, 1), np.int32), np.ones((n, 2), np.int32)]

    def honest(ch: Channel) -> str:
        ot = T.OTExtension(ch, 0, timeout=30)
        prod = O.OneHotProduct(ot, 0, bins[0], n, (1, 2), n_bins)
        try:
            prod.sums(np.zeros((n, 2), np.uint64))
        except ProtocolError as exc:
            return str(exc)
        return "accepted"

    def cheat(ch: Channel) -> None:
        ot = T.OTExtension(ch, 1, timeout=30)
        O.OneHotProduct(ot, 1, bins[1], n, (1, 2), n_bins)
        ot.exchange([np.zeros((n, 1, 3), np.uint64)], same_shape=False)  # wrong width

    msg, _ = run_parties(honest, cheat, timeout=60)
    assert "peer correction has shape" in msg
    with pytest.raises(ProtocolError, match="bin indices"):
        O.OneHotProduct(None, 0, bins[0] + n_bins, n, (1, 2), n_bins)
    with pytest.raises(ProtocolError, match="bins must be"):
        O.OneHotProduct(None, 0, bins[1], n, (1, 2), n_bins)
