"""Bucket sums: the owner's sparse one-hot sums and both secure aggregators against plaintext."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from veil.boost.histogram import (
    HEAggregator,
    OneHotSums,
    SSAggregator,
    _dense_onehot,
    _Timed,
    level_sums,
    onehot_bucket_sums,
)
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC
from veil.crypto.sharing import AShare
from veil.crypto.triples import LocalDealer
from veil.testing import run_parties

N_BINS = 5


def _bins(rng: np.random.Generator, n: int, feats: int) -> np.ndarray:
    b = rng.integers(0, N_BINS, (n, feats)).astype(np.int32)
    b[:, 0] = 2  # one feature with a single occupied bin (the other bins must stay 0)
    return b


def test_onehot_sums_equal_the_dense_product_mod_2_64() -> None:
    rng = np.random.default_rng(5)
    bins = _bins(rng, 257, 4)
    x = rng.integers(0, 2**64 - 1, (257, 3), dtype=np.uint64, endpoint=True)
    ref = _dense_onehot(bins, N_BINS).T @ x  # uint64 matmul wraps: exact mod 2^64
    summer = OneHotSums(bins, N_BINS)
    np.testing.assert_array_equal(summer(x), ref)
    np.testing.assert_array_equal(summer(x[:, :1]), ref[:, :1])  # reusable for other widths
    np.testing.assert_array_equal(onehot_bucket_sums(bins, N_BINS, x), ref)
    assert not summer(x)[1].any()  # empty bin of the single-bin feature


@pytest.mark.parametrize("algorithm", ["ss-agg", pytest.param("he-agg", marks=pytest.mark.slow)])
def test_level_sums_of_both_owners_reconstruct_the_plaintext_sums(algorithm: str) -> None:
    """Both feature owners' bucket sums of a shared matrix, in one call per party, twice (two
    levels), reconstruct to ``M_p^T V`` exactly; each party's bins stay local."""
    rng = np.random.default_rng(11)
    n, feats = 60, (3, 2)
    bins = [_bins(rng, n, feats[0]), _bins(rng, n, feats[1])]
    vs = [rng.integers(0, 2**20, (n, c), dtype=np.uint64) for c in (2, 4)]
    masks = [rng.integers(0, 2**64 - 1, v.shape, dtype=np.uint64, endpoint=True) for v in vs]
    s0, s1 = LocalDealer.pair()
    keys: list[Any] = [None, None]
    if algorithm == "he-agg":
        from veil.crypto import he

        keys = [he.keygen(scheme="ou", key_bits=2048) for _ in range(2)]

    def role(ch: Any, party: int) -> list[list[np.ndarray]]:
        mpc = MPC(ch, party, s0 if party == 0 else s1, FixedPoint(20))
        cls = SSAggregator if algorithm == "ss-agg" else HEAggregator
        he_keys = (keys[party], keys[1 - party].public) if keys[0] is not None else (None, None)
        aggs = [
            cls(mpc, h, bins[h] if h == party else None, n, feats[h], N_BINS, f"agg{h}", _Timed(), he_keys)
            for h in (0, 1)
        ]
        for agg in aggs:
            agg.new_tree(sum(v.shape[1] for v in vs), f"t0/agg{agg.holder}")
        out = []
        for v, m in zip(vs, masks, strict=True):
            share = AShare(v - m if party == 0 else m, party, 20)
            out.append([s.values for s in level_sums(aggs, share)])
        return out

    res0, res1 = run_parties(lambda ch: role(ch, 0), lambda ch: role(ch, 1), timeout=120)
    for lvl, v in enumerate(vs):
        for h in (0, 1):
            ref = _dense_onehot(bins[h], N_BINS).T @ v
            np.testing.assert_array_equal(res0[lvl][h] + res1[lvl][h], ref)
            assert not np.array_equal(res0[lvl][h], ref)  # a share alone is not the sum


@pytest.mark.slow
def test_he_sums_in_a_narrowed_ring_equal_the_64_bit_sums() -> None:
    """he-agg with a public bound on the sums (``bound_bits``, as logistic training passes) packs
    more values per ciphertext (shares reduced mod 2^k) and lifts the result back to Z_2^64 with
    one comparison per value: the sums are exactly those of the 64-bit path, negative ones too."""
    from veil.crypto import he

    rng = np.random.default_rng(23)
    n, feats, frac = 300, (2, 3), 20
    bins = [_bins(rng, n, feats[0]), _bins(rng, n, feats[1])]
    bound = frac + 2 + math.ceil(math.log2(n))
    # signed values with |v| <= 2^frac (like g in [-1, 1]), extremes included
    vals = rng.integers(-(2**frac), 2**frac, (n, 4), endpoint=True)
    vals[:, 0] = 2**frac
    vals[:, 1] = -(2**frac)
    v = vals.astype(np.int64).view(np.uint64)
    mask = rng.integers(0, 2**64 - 1, v.shape, dtype=np.uint64, endpoint=True)
    s0, s1 = LocalDealer.pair()
    keys = [he.keygen(scheme="ou", key_bits=2048) for _ in range(2)]

    def role(ch: Any, party: int) -> tuple[list[np.ndarray], list[int], list[int]]:
        mpc = MPC(ch, party, s0 if party == 0 else s1, FixedPoint(frac))
        he_keys = (keys[party], keys[1 - party].public)
        aggs = [
            HEAggregator(mpc, h, bins[h] if h == party else None, n, feats[h], N_BINS, f"agg{h}", _Timed(),
                         he_keys, bound_bits=bound)
            for h in (0, 1)
        ]
        share = AShare(v - mask if party == 0 else mask, party, frac)
        return [s.values for s in level_sums(aggs, share)], [a.ring for a in aggs], [a.slots for a in aggs]

    (r0, rings, slots), (r1, _, _) = run_parties(lambda ch: role(ch, 0), lambda ch: role(ch, 1), timeout=300)
    assert rings == [bound, bound] and min(slots) >= 6  # 5 slots without the bound (OU-2048)
    for h in (0, 1):
        ref = (_dense_onehot(bins[h], N_BINS).T @ v).view(np.int64)  # exact mod 2^64, signed
        np.testing.assert_array_equal((r0[h] + r1[h]).view(np.int64), ref)
        assert (ref < 0).any() and (ref > 0).any()


def test_ss_aggregator_refuses_more_columns_than_prepared() -> None:
    s0, s1 = LocalDealer.pair()
    bins = _bins(np.random.default_rng(1), 10, 2)

    def role(ch: Any, party: int) -> None:
        mpc = MPC(ch, party, s0 if party == 0 else s1, FixedPoint(20))
        agg = SSAggregator(mpc, 0, bins if party == 0 else None, 10, 2, N_BINS, "a", _Timed())
        agg.new_tree(1, "t0")
        agg.sums(AShare(np.zeros((10, 2), np.uint64), party, 20))

    from veil.boost.errors import BoostProtocolError
    from veil.errors import VeilError

    with pytest.raises((BoostProtocolError, VeilError)):
        run_parties(lambda ch: role(ch, 0), lambda ch: role(ch, 1), timeout=30)



@pytest.mark.parametrize("n", [2, 1000, 50_000, 200_000])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 10.0])
def test_comparison_widths_cover_the_worst_case(n: int, lam: float) -> None:
    """The widths promised to ltz/argmax/sigmoid hold for the extreme values training can reach."""
    import math

    from veil.boost.params import BoostParams
    from veil.boost.train import INVALID_GAIN_BITS, _comparison_bits

    f = 20
    p = BoostParams(n_estimators=10, max_depth=5, reg_lambda=lam, gamma=3.0, min_child_weight=2.0)
    lo = 2.0 ** math.floor(math.log2(max(lam, 2.0**-8))) if lam > 0 else 2.0**-8
    hi = 2.0 ** max(4, math.ceil(math.log2(n / 4 + lam + 2)))
    w = _comparison_bits(f, n, p, lo, hi)
    lam_eff = max(lam, lo)
    max_gain = float(n) ** 2 / lam_eff  # |G| <= n (|g| <= 1), H + lambda >= lambda
    assert 2.0 ** (w["gain"] - f) > 2 * max_gain + 2.0**INVALID_GAIN_BITS + p.gamma or w["gain"] == 63
    assert 2.0 ** (w["hess"] - f) > hi + p.min_child_weight
    max_margin = math.log(1e6) + p.n_estimators * p.learning_rate * n / lam_eff + 32
    assert 2.0 ** (w["margin"] - f) > max_margin or w["margin"] == 63
    reg = _comparison_bits(f, n, BoostParams(objective="reg:squarederror"), lo, hi)
    assert reg["gain"] == reg["margin"] == 63  # no a-priori bound on regression gradients
