"""Triple sources: every correlation is correct, for the dealer (in-process and as a separate
party over channels) and dealer-free (HE on both backends); MPC on dealer-free triples."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from veil.comm import Channel, MemoryChannel
from veil.crypto import he
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC, OneHotMatrix
from veil.crypto.mpc_ring import ring_matmul
from veil.crypto.sharing import AShare, share, share_floats
from veil.crypto.triples import DealerSeed, LocalDealer, TrustedDealer, run_dealer
from veil.crypto.triples_he import HomomorphicTriples
from veil.errors import InputError
from veil.testing import run_parties

FXP = FixedPoint(20)


def exercise(src: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["beaver"] = src.beaver((3, 7))
    out["bits"] = src.bit_triples(5)
    out["matmul"] = src.matmul_triple(2, 3, 4)
    for holder in (0, 1):
        ctx, a = src.matrix_mask(5, 3, holder)
        out[f"mask{holder}"] = a
        out[f"mv{holder}"] = src.matrix_vector_triple(ctx, 2)
    return out


def check(r0: dict[str, Any], r1: dict[str, Any]) -> None:
    (a0, b0, c0), (a1, b1, c1) = r0["beaver"], r1["beaver"]
    assert a0.shape == (3, 7)
    np.testing.assert_array_equal((a0 + a1) * (b0 + b1), c0 + c1)
    assert not np.array_equal(a0, a1)
    (x0, y0, z0), (x1, y1, z1) = r0["bits"], r1["bits"]
    np.testing.assert_array_equal((x0 ^ x1) & (y0 ^ y1), z0 ^ z1)
    (p0, q0, s0), (p1, q1, s1) = r0["matmul"], r1["matmul"]
    np.testing.assert_array_equal(ring_matmul(p0 + p1, q0 + q1), s0 + s1)
    for holder in (0, 1):
        a = (r0, r1)[holder][f"mask{holder}"]
        assert (r0, r1)[1 - holder][f"mask{holder}"] is None
        b = (r0, r1)[1 - holder][f"mv{holder}"][0]
        assert (r0, r1)[holder][f"mv{holder}"][0] is None
        np.testing.assert_array_equal(ring_matmul(a.T, b), r0[f"mv{holder}"][1] + r1[f"mv{holder}"][1])


def test_local_dealer_correlations() -> None:
    s0, s1 = LocalDealer.pair()
    assert "TEST ONLY" in s0.trust
    r0 = exercise(s0)
    r1 = exercise(s1)
    check(r0, r1)


def test_trusted_dealer_as_third_party() -> None:
    d0, p0 = MemoryChannel.pair(timeout=30)
    d1, p1 = MemoryChannel.pair(timeout=30)
    served: list[int] = []
    t = threading.Thread(target=lambda: served.append(run_dealer(d0, d1, timeout=30)), daemon=True)
    t.start()
    results: dict[int, Any] = {}

    def party(i: int, ch: MemoryChannel) -> None:
        src = TrustedDealer(ch, i, timeout=30)
        assert src.trust == "dealer"
        results[i] = exercise(src)
        src.close()

    ths = [threading.Thread(target=party, args=(i, ch)) for i, ch in ((0, p0), (1, p1))]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    t.join(30)
    check(results[0], results[1])
    # party 0 got one seed message and nothing else; party 1 one correction per request
    assert p0.stats.messages_received == 1
    assert served == [p1.stats.messages_received - 1]
    assert p0.stats.bytes_received < 200


def test_trusted_dealer_refuses_wrong_party_seed() -> None:
    from veil.errors import ProtocolError

    a, b = MemoryChannel.pair(timeout=5)
    a.send(DealerSeed(1, b"\x00" * 32))
    with pytest.raises(ProtocolError):
        TrustedDealer(b, 0, timeout=5)


@pytest.fixture(scope="module", params=[("heu", "ou"), ("phe", "paillier")])
def kp(request: Any) -> he.HEKeyPair:
    backend, scheme = request.param
    if backend not in he.available_backends():
        pytest.skip(f"{backend} not installed")
    return he.keygen(scheme=scheme, key_bits=1024, backend=backend)


def test_homomorphic_triples_correlations(kp: he.HEKeyPair) -> None:
    """The OU/Paillier (Gilboa) path for every arithmetic correlation, on both HE backends."""

    def role(p: int) -> Any:
        def f(ch: Channel) -> dict[str, Any]:
            src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, timeout=60, arith="he")
            assert src.trust == "homomorphic"
            return exercise(src)

        return f

    r0, r1 = run_parties(role(0), role(1), timeout=300)
    check(r0, r1)


def _mpc_program(mpc: MPC, x: Any, y: Any, bins: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["mul"] = mpc.reveal_float(mpc.mul(x, y))
    out["ltz"] = mpc.reveal(mpc.ltz(x))
    oh, mx = mpc.argmax(x)
    out["argmax"] = mpc.reveal(oh)
    out["max"] = mpc.reveal_float(mx)
    pm = mpc.public_matrix(OneHotMatrix(bins, 3) if bins is not None else None, holder=0, shape=(x.size, 6))
    out["pm"] = mpc.reveal_float(pm.t_matmul(y))
    return out


def test_mpc_on_homomorphic_triples() -> None:
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)
    rng = np.random.default_rng(7)
    x = rng.uniform(-50, 50, 6)
    y = rng.uniform(-50, 50, 6)
    bins = rng.integers(0, 3, (6, 2))
    x0, x1 = share_floats(x, FXP)
    y0, y1 = share_floats(y, FXP)

    def role(p: int, xs: Any, ys: Any, b: Any) -> Any:
        def f(ch: Channel) -> dict[str, Any]:
            src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, timeout=120)
            return _mpc_program(MPC(ch, p, src, FXP, timeout=120), xs, ys, b)

        return f

    r0, r1 = run_parties(role(0, x0, y0, bins), role(1, x1, y1, None), timeout=600)
    np.testing.assert_allclose(r0["mul"], x * y, atol=1e-3)
    np.testing.assert_array_equal(r0["ltz"], (x < 0).astype(np.uint64))
    np.testing.assert_array_equal(r0["argmax"], np.eye(6, dtype=np.uint64)[np.argmax(x)])
    np.testing.assert_allclose(r0["max"], x.max(), atol=1e-5)
    dense = OneHotMatrix(bins, 3).to_dense().astype(float)
    np.testing.assert_allclose(r0["pm"], dense.T @ y, atol=1e-3)
    for k in r0:
        np.testing.assert_array_equal(r0[k], r1[k])


def test_ot_extension_random_ots_and_and_triples() -> None:
    from veil.crypto.triples_ot import OTExtension

    rng = np.random.default_rng(9)
    choices = [rng.integers(0, 2, 64).astype(np.uint8) for _ in range(2)]

    def role(p: int) -> Any:
        def f(ch: Channel) -> Any:
            ot = OTExtension(ch, p, timeout=30)
            return ot.random_ots(64, choices[p]), ot.and_triples(16)

        return f

    ((m0_a, m1_a, mc_a), t0), ((m0_b, m1_b, mc_b), t1) = run_parties(role(0), role(1), timeout=120)
    # party 1 receives in the instance where party 0 sends, and vice versa
    np.testing.assert_array_equal(mc_b, np.where(choices[1][:, None] == 1, m1_a, m0_a))
    np.testing.assert_array_equal(mc_a, np.where(choices[0][:, None] == 1, m1_b, m0_b))
    assert not np.array_equal(m0_a, m1_a)
    (a0, b0, c0), (a1, b1, c1) = t0, t1
    np.testing.assert_array_equal((a0 ^ a1) & (b0 ^ b1), c0 ^ c1)


def test_homomorphic_bits_via_he_option() -> None:
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)

    def role(p: int) -> Any:
        def f(ch: Channel) -> Any:
            return HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, bits="he").bit_triples(4)

        return f

    (a0, b0, c0), (a1, b1, c1) = run_parties(role(0), role(1), timeout=120)
    np.testing.assert_array_equal((a0 ^ a1) & (b0 ^ b1), c0 ^ c1)


def test_homomorphic_triples_all_correlations_via_ot() -> None:
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)

    def role(p: int) -> Any:
        def f(ch: Channel) -> dict[str, Any]:
            src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, arith="ot", timeout=60)
            out = exercise(src)
            out["wide"] = src.matmul_triple(2, 3, 6)  # n > m: generated transposed
            return out

        return f

    r0, r1 = run_parties(role(0), role(1), timeout=300)
    check(r0, r1)
    (p0, q0, s0), (p1, q1, s1) = r0["wide"], r1["wide"]
    assert p0.shape == (2, 3) and q0.shape == (3, 6)
    np.testing.assert_array_equal(ring_matmul(p0 + p1, q0 + q1), s0 + s1)


def test_homomorphic_triples_arith_via_ot() -> None:
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)
    rng = np.random.default_rng(12)
    x = rng.uniform(-30, 30, 40)
    y = rng.uniform(-30, 30, 40)
    x0, x1 = share_floats(x, FXP)
    y0, y1 = share_floats(y, FXP)

    def role(p: int, xs: Any, ys: Any) -> Any:
        def f(ch: Channel) -> Any:
            src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, arith="ot")
            a, b, c = src.beaver(100)
            mpc = MPC(ch, p, src, FXP, timeout=60)
            return (a, b, c), mpc.reveal_float(mpc.mul(xs, ys))

        return f

    ((a0, b0, c0), r0), ((a1, b1, c1), _) = run_parties(role(0, x0, y0), role(1, x1, y1), timeout=120)
    np.testing.assert_array_equal((a0 + a1) * (b0 + b1), c0 + c1)
    np.testing.assert_allclose(r0, x * y, atol=1e-3)


def test_ot_bit_product() -> None:
    from veil.crypto.triples_ot import OTExtension

    rng = np.random.default_rng(13)
    bits = [rng.integers(0, 2, 37).astype(np.uint64) for _ in range(2)]

    def role(p: int) -> Any:
        def f(ch: Channel) -> Any:
            return OTExtension(ch, p, timeout=30).bit_product(bits[p])

        return f

    z0, z1 = run_parties(role(0), role(1), timeout=120)
    np.testing.assert_array_equal(z0 + z1, bits[0] * bits[1])


def test_mul_bits_with_ot_and_dealer() -> None:
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)
    rng = np.random.default_rng(14)
    bits = rng.integers(0, 2, (5, 7)).astype(np.uint64)
    x = rng.uniform(-1000, 1000, (5, 7))
    b0, b1 = share(bits)
    x0, x1 = share_floats(x, FXP)

    def role(p: int, bs: Any, xs: Any, dealer: Any) -> Any:
        def f(ch: Channel) -> Any:
            src = dealer if dealer is not None else HomomorphicTriples(ch, p, keypair=kp if p == 0 else None)
            mpc = MPC(ch, p, src, FXP, timeout=60)
            (z,) = mpc.mul_bits([(AShare(bs, p, 0), xs)])
            sel = mpc.select(AShare(bs, p, 0), xs, xs * 2)
            return mpc.reveal_float(z), mpc.reveal_float(sel)

        return f

    d0, d1 = LocalDealer.pair()
    for s0, s1 in ((None, None), (d0, d1)):
        (z, sel), _ = run_parties(role(0, b0, x0, s0), role(1, b1, x1, s1), timeout=120)
        np.testing.assert_allclose(z, bits * x, atol=1e-5)
        np.testing.assert_allclose(sel, np.where(bits == 1, x, 2 * x), atol=1e-5)


def test_mpc_with_trusted_dealer_process_roles() -> None:
    """Dealer thread + two parties, each on its own channel; MPC results equal the plaintext."""
    d0, p0 = MemoryChannel.pair(timeout=30)
    d1, p1 = MemoryChannel.pair(timeout=30)
    dealer = threading.Thread(target=run_dealer, args=(d0, d1), kwargs={"timeout": 30}, daemon=True)
    dealer.start()
    rng = np.random.default_rng(15)
    x = rng.uniform(-20, 20, (4, 9))
    x0, x1 = share_floats(x, FXP)

    def role(p: int, dch: MemoryChannel, xs: Any) -> Any:
        def f(ch: Channel) -> Any:
            src = TrustedDealer(dch, p, timeout=30)
            mpc = MPC(ch, p, src, FXP, timeout=30)
            sq = mpc.mul(xs, xs)
            oh, mx = mpc.argmax(xs, axis=1)
            out = mpc.reveal_float(sq), mpc.reveal(oh), mpc.reveal_float(mx)
            src.close()
            return out

        return f

    (sq, oh, mx), _ = run_parties(role(0, p0, x0), role(1, p1, x1), timeout=120)
    dealer.join(30)
    np.testing.assert_allclose(sq, x * x, atol=1e-3)
    np.testing.assert_array_equal(oh, np.eye(9, dtype=np.uint64)[np.argmax(x, axis=1)])
    np.testing.assert_allclose(mx, x.max(axis=1), atol=1e-5)
    assert not dealer.is_alive()


def test_pure_he_mode_uses_no_ot() -> None:
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)
    x = np.array([3.5, -2.0, 7.25])
    x0, x1 = share_floats(x, FXP)

    def role(p: int, xs: Any) -> Any:
        def f(ch: Channel) -> Any:
            src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, arith="he", bits="he")
            mpc = MPC(ch, p, src, FXP, timeout=120)
            out = mpc.reveal_float(mpc.mul(xs, xs)), mpc.reveal(mpc.ltz(xs))
            return out, src._ot is None

        return f

    ((sq, neg), no_ot), _ = run_parties(role(0, x0), role(1, x1), timeout=300)
    np.testing.assert_allclose(sq, x * x, atol=1e-4)
    np.testing.assert_array_equal(neg, (x < 0).astype(np.uint64))
    assert no_ot


def test_reciprocal_div_sigmoid_dealer_free_equal_plaintext() -> None:
    """The OT path of reciprocal/div (XOR-shared normaliser bits used directly by bit x value
    OTs) gives the same error bounds as the dealer path, on values at every power of two."""
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)
    rng = np.random.default_rng(15)
    edges = np.array([2.0**k for k in range(-8, 16)])
    x = np.concatenate([np.exp(rng.uniform(np.log(2.0**-8), np.log(60000), 150)), edges,
                        edges - 2.0**-20, [2.0**-8 + 2.0**-20]])
    x = x[(x >= 2.0**-8) & (x < 2.0**16)]
    a = rng.uniform(-500, 500, x.size)
    z = np.linspace(-40, 40, x.size)
    xs, as_, zs = share_floats(x, FXP), share_floats(a, FXP), share_floats(z, FXP)

    def role(p: int) -> Any:
        def f(ch: Channel) -> Any:
            src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, timeout=60)
            mpc = MPC(ch, p, src, FXP, timeout=60)
            return (mpc.reveal_float(mpc.reciprocal(xs[p])), mpc.reveal_float(mpc.div(as_[p], xs[p])),
                    mpc.reveal_float(mpc.sigmoid(zs[p])))

        return f

    (rec, dv, sg), _ = run_parties(role(0), role(1), timeout=300)
    ulp = 2.0**-20
    np.testing.assert_allclose(rec, 1 / x, rtol=1e-4, atol=8 * ulp)
    np.testing.assert_allclose(dv, a / x, rtol=1e-4, atol=8 * ulp)
    assert np.max(np.abs(sg - 1 / (1 + np.exp(-z)))) < 2e-4


@pytest.mark.parametrize("dealer", [True, False])
def test_bit_window_and_suffix_or(dealer: bool) -> None:
    """Bits lo..hi-1 of x0 + x1 (wrapping carries included) and their suffix OR, exactly."""
    rng = np.random.default_rng(16)
    x = np.concatenate([rng.integers(0, 2**63, 200, dtype=np.uint64),
                        np.array([0, 1, 2**20 - 1, 2**20, 2**34 - 1, 2**64 - 1], dtype=np.uint64)])
    x0, x1 = share(x)
    kp = None if dealer else he.keygen(scheme="ou", key_bits=1024,
                                       backend="heu" if "heu" in he.available_backends() else None)
    d = LocalDealer.pair() if dealer else (None, None)

    def role(p: int, xs: Any) -> Any:
        def f(ch: Channel) -> Any:
            src = d[p] if dealer else HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, timeout=60)
            mpc = MPC(ch, p, src, FXP, timeout=60)
            out = []
            for lo, hi in ((0, 1), (0, 7), (20, 34), (5, 64), (63, 64)):
                bits = mpc._bit_window(np.asarray(xs, dtype=np.uint64), lo, hi)
                out.append((bits, mpc._suffix_or(bits)))
            return out

        return f

    r0, r1 = run_parties(role(0, x0), role(1, x1), timeout=300)
    for (lo, hi), (b0, s0), (b1, s1) in zip(((0, 1), (0, 7), (20, 34), (5, 64), (63, 64)), r0, r1, strict=True):
        want = np.array([[(int(v) >> i) & 1 for v in x] for i in range(lo, hi)], dtype=np.uint8)
        np.testing.assert_array_equal(b0 ^ b1, want)
        suffix = np.flip(np.maximum.accumulate(np.flip(want, axis=0), axis=0), axis=0)
        np.testing.assert_array_equal(s0 ^ s1, suffix)


def test_ot_cross_product_and_square() -> None:
    """cross_product gives shares of x0 * x1 mod 2^64 (odd sizes, both directions); MPC.square on
    it equals the plaintext square within the truncation bound."""
    kp = he.keygen(scheme="ou", key_bits=1024, backend="heu" if "heu" in he.available_backends() else None)
    rng = np.random.default_rng(17)
    vals = [rng.integers(0, 2**64 - 1, 37, dtype=np.uint64, endpoint=True) for _ in range(2)]
    x = rng.uniform(-1500, 1500, 41)  # x^2 < 2^22: the truncation range
    xs = share_floats(x, FXP)

    def role(p: int) -> Any:
        def f(ch: Channel) -> Any:
            src = HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, timeout=60)
            mpc = MPC(ch, p, src, FXP, timeout=60)
            return src.cross_product(vals[p]), mpc.reveal_float(mpc.square(xs[p]))

        return f

    (z0, sq), (z1, _) = run_parties(role(0), role(1), timeout=120)
    np.testing.assert_array_equal(z0 + z1, vals[0] * vals[1])
    ref = FXP.decode(FXP.encode(x)) ** 2
    assert np.max(np.abs(sq - ref)) <= 2 * 2.0**-20  # truncation: floor or one ulp less


def test_ot_and_private() -> None:
    """XOR shares of x0 AND x1 for privately held packed bits (odd byte counts: both halves)."""
    from veil.crypto.triples_ot import OTExtension

    rng = np.random.default_rng(18)
    for nbytes in (1, 5, 333):
        xs = [rng.integers(0, 256, nbytes).astype(np.uint8) for _ in range(2)]

        def role(p: int, xs: Any = xs) -> Any:
            def f(ch: Channel) -> Any:
                return OTExtension(ch, p, timeout=30).and_private(xs[p])

            return f

        z0, z1 = run_parties(role(0), role(1), timeout=120)
        np.testing.assert_array_equal(z0 ^ z1, xs[0] & xs[1])


@pytest.mark.parametrize("dealer", [True, False])
def test_bits_matvec_equals_the_plaintext_product(dealer: bool) -> None:
    """ind @ w for a shared 0/1 matrix (leaf indicators) and shared weights: exact in the ring with
    a dealer (matrix triple) and dealer-free (one OT product per element + a row sum)."""
    rng = np.random.default_rng(29)
    ind = rng.integers(0, 2, (53, 12), dtype=np.uint64)
    w = rng.integers(0, 2**64 - 1, 12, dtype=np.uint64, endpoint=True)
    i0, i1 = share(ind)
    w0, w1 = share(w)
    kp = None if dealer else he.keygen(scheme="ou", key_bits=1024,
                                       backend="heu" if "heu" in he.available_backends() else None)
    d = LocalDealer.pair() if dealer else (None, None)

    def role(p: int, ishare: Any, wshare: Any) -> Any:
        def f(ch: Channel) -> Any:
            src = d[p] if dealer else HomomorphicTriples(ch, p, keypair=kp if p == 0 else None, timeout=60)
            mpc = MPC(ch, p, src, FXP, timeout=60)
            with pytest.raises(InputError):
                mpc.bits_matvec(AShare(ishare, p, 0), AShare(wshare[:5], p, FXP.frac_bits))
            return mpc.bits_matvec(AShare(ishare, p, 0), AShare(wshare, p, FXP.frac_bits)).values

        return f

    r0, r1 = run_parties(role(0, i0, w0), role(1, i1, w1), timeout=300)
    np.testing.assert_array_equal(r0 + r1, ind @ w)
