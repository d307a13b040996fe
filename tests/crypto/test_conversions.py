"""HE <-> SS conversions on both HE backends (small test keys)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from veil.comm import Channel
from veil.crypto import he
from veil.crypto.conversions import he_to_ss, max_slots, slot_bits_for, ss_to_he
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC
from veil.crypto.sharing import AShare, share
from veil.crypto.triples import LocalDealer
from veil.errors import HEError
from veil.testing import run_parties

FXP = FixedPoint(20)
MOD = 1 << 64


@pytest.fixture(scope="module", params=[("heu", "ou"), ("phe", "paillier"), ("heu", "paillier")])
def keypair(request: Any) -> he.HEKeyPair:
    backend, scheme = request.param
    if backend not in he.available_backends():
        pytest.skip(f"{backend} not installed")
    return he.keygen(scheme=scheme, key_bits=1024, backend=backend)


def _run(fn0: Any, fn1: Any) -> tuple[Any, Any]:
    s0, s1 = LocalDealer.pair()

    def wrap(party: int, src: Any, fn: Any) -> Any:
        def f(ch: Channel) -> Any:
            return fn(MPC(ch, party, src, FXP, timeout=60))

        return f

    return run_parties(wrap(0, s0, fn0), wrap(1, s1, fn1), timeout=240)


@pytest.mark.parametrize("slots", [1, 3])
def test_ss_to_he_to_ss_round_trip(keypair: he.HEKeyPair, slots: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 2**63, 50, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    x0, x1 = share(x)
    pk, sk = keypair.public, keypair.secret
    sb = slot_bits_for(66)
    if slots * sb > pk.plaintext_bits - 1:
        pytest.skip("key too small for this packing")

    def owner(mpc: MPC) -> np.ndarray:  # party 0 owns the key
        assert ss_to_he(mpc, AShare(x0, 0), pk, key_owner=0, slots=slots, slot_bits=sb) is None
        s = he_to_ss(mpc, None, sk, value_bits=66, slots=slots, slot_bits=sb)
        return mpc.reveal(s)

    def holder(mpc: MPC) -> tuple[np.ndarray, int]:
        ct = ss_to_he(mpc, AShare(x1, 1), pk, key_owner=0, slots=slots, slot_bits=sb)
        assert ct is not None
        s = he_to_ss(mpc, ct, None, value_bits=66, slots=slots, slot_bits=sb, count=x.size)
        return mpc.reveal(s), len(ct)

    r0, (r1, nct) = _run(owner, holder)
    np.testing.assert_array_equal(r0, x)
    np.testing.assert_array_equal(r1, x)
    assert nct == -(-x.size // slots)


def test_bucket_sums_through_he(keypair: he.HEKeyPair) -> None:
    """The he-agg pattern: shared gradients -> HE at the feature owner -> bucket sums -> shares."""
    rng = np.random.default_rng(4)
    n, nb = 40, 4
    g = rng.uniform(-1, 1, n)
    bins = rng.integers(0, nb, (n, 2))
    g0, g1 = share(FXP.encode(g))
    pk, sk = keypair.public, keypair.secret
    vb = 65 + 6  # sums of up to 64 values

    def owner(mpc: MPC) -> np.ndarray:
        ss_to_he(mpc, AShare(g0, 0, 20), pk, key_owner=0)
        return mpc.reveal_float(he_to_ss(mpc, None, sk, value_bits=vb))

    def holder(mpc: MPC) -> np.ndarray:
        ct = ss_to_he(mpc, AShare(g1, 1, 20), pk, key_owner=0)
        sums = ct.bucket_sums(bins, nb)
        return mpc.reveal_float(he_to_ss(mpc, sums, None, value_bits=vb))

    r0, r1 = _run(owner, holder)
    ref = np.array([g[bins[:, f] == b].sum() for f in range(2) for b in range(nb)])
    np.testing.assert_allclose(r0, ref, atol=1e-4)
    np.testing.assert_array_equal(r0, r1)


def test_signed_values_and_packing(keypair: he.HEKeyPair) -> None:
    pk, sk = keypair.public, keypair.secret
    vals = [-(2**62) + 5, -1, 0, 1, 2**62 - 7, -123456789]
    slots = max_slots(pk, 63)
    sb = slot_bits_for(63)
    packed = []
    for i in range(0, len(vals), slots):
        chunk = vals[i:i + slots]
        packed.append(sum(v << (sb * j) for j, v in enumerate(chunk)))
    ct = pk.encrypt(packed)

    def owner(mpc: MPC) -> np.ndarray:
        return mpc.reveal(he_to_ss(mpc, None, sk, value_bits=63, slots=slots))

    def holder(mpc: MPC) -> np.ndarray:
        return mpc.reveal(he_to_ss(mpc, ct, None, value_bits=63, slots=slots, count=len(vals)))

    r0, _ = _run(owner, holder)
    np.testing.assert_array_equal(r0, np.array([v % MOD for v in vals], dtype=np.uint64))


def test_out_of_range_value_is_refused(keypair: he.HEKeyPair) -> None:
    pk, sk = keypair.public, keypair.secret
    ct = pk.encrypt([5, 2**120])  # the second is far wider than value_bits=64

    def owner(mpc: MPC) -> None:
        he_to_ss(mpc, None, sk, value_bits=64)

    def holder(mpc: MPC) -> None:
        he_to_ss(mpc, ct, None, value_bits=64)

    with pytest.raises(HEError):
        _run(owner, holder)


def test_owner_share_is_statistically_masked(keypair: he.HEKeyPair) -> None:
    """What the key owner decrypts is x + r: its share is ~uniform whatever x is."""
    from scipy import stats

    pk, sk = keypair.public, keypair.secret
    n = 300
    out = []
    for value in (0, 2**63 - 1):
        ct = pk.encrypt([value] * n)

        def owner(mpc: MPC) -> np.ndarray:
            return he_to_ss(mpc, None, sk, value_bits=64).values

        def holder(mpc: MPC, ct: Any = ct) -> None:
            he_to_ss(mpc, ct, None, value_bits=64)

        r0, _ = _run(owner, holder)
        out.append(r0.astype(np.float64) / 2.0**64)
    for sample in out:
        assert stats.kstest(sample, "uniform").pvalue > 1e-4
    assert stats.ks_2samp(out[0], out[1]).pvalue > 1e-4
