"""HE interface on both backends: round trips, homomorphic ops == plaintext, bucket sums,
serialization, key separation, range checks, backend selection."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veil.config import reset_settings
from veil.crypto import he
from veil.crypto.encoding import FixedPoint
from veil.crypto.he import registry
from veil.errors import ConfigError, HEError, InputError

BACKENDS = [("phe", "paillier"), ("heu", "ou"), ("heu", "paillier")]
KEY_BITS = 1024  # small keys for speed in tests only


@pytest.fixture(scope="module", params=BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def kp(request: pytest.FixtureRequest) -> he.HEKeyPair:
    backend, scheme = request.param
    return he.keygen(scheme=scheme, key_bits=KEY_BITS, backend=backend)


@pytest.fixture(scope="module")
def other_kp() -> dict[str, he.HEKeyPair]:
    return {
        "phe": he.keygen("paillier", KEY_BITS, "phe"),
        "heu": he.keygen("ou", KEY_BITS, "heu"),
    }


# values up to 2**200 in magnitude: > 64 bits, negative, and far inside every scheme's range
big = st.integers(min_value=-(2**200), max_value=2**200)
hyp = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@hyp
@given(st.lists(big, min_size=0, max_size=12))
def test_round_trip(kp: he.HEKeyPair, xs: list[int]) -> None:
    ct = kp.public.encrypt(xs)
    assert len(ct) == len(xs)
    assert kp.secret.decrypt(ct) == xs


@hyp
@given(st.lists(st.tuples(big, big, st.integers(-(2**64), 2**64)), min_size=1, max_size=10), big)
def test_homomorphic_ops_equal_plaintext(kp: he.HEKeyPair, rows: list[tuple[int, int, int]], s: int) -> None:
    pk, sk = kp.public, kp.secret
    a = [r[0] for r in rows]
    b = [r[1] for r in rows]
    k = [r[2] for r in rows]
    ca, cb = pk.encrypt(a), pk.encrypt(b)
    assert sk.decrypt(ca + cb) == [x + y for x, y in zip(a, b, strict=True)]
    assert sk.decrypt(ca - cb) == [x - y for x, y in zip(a, b, strict=True)]
    assert sk.decrypt(ca + b) == [x + y for x, y in zip(a, b, strict=True)]
    assert sk.decrypt(ca - b) == [x - y for x, y in zip(a, b, strict=True)]
    assert sk.decrypt(b - ca) == [y - x for x, y in zip(a, b, strict=True)]
    assert sk.decrypt(ca + s) == [x + s for x in a]
    assert sk.decrypt(-ca) == [-x for x in a]
    assert sk.decrypt(ca * k) == [x * y for x, y in zip(a, k, strict=True)]
    assert sk.decrypt(ca * -7) == [x * -7 for x in a]
    assert sk.decrypt(3 * ca) == [3 * x for x in a]
    assert sk.decrypt(ca.sum()) == [sum(a)]
    # length-1 ciphertexts broadcast
    assert sk.decrypt(ca + ca[[0]]) == [x + a[0] for x in a]


def test_numpy_operands(kp: he.HEKeyPair) -> None:
    pk, sk = kp.public, kp.secret
    x = np.array([-(2**63), -1, 0, 1, 2**63 - 1], dtype=np.int64)
    u = np.array([0, 1, 2**63, 2**64 - 1, 5], dtype=np.uint64)
    assert sk.decrypt(pk.encrypt(x)) == x.tolist()
    assert sk.decrypt(pk.encrypt(u)) == [int(v) for v in u]  # uint64 = unsigned ring elements
    ct = pk.encrypt(x)
    assert sk.decrypt(ct + u) == [int(a) + int(b) for a, b in zip(x, u, strict=True)]
    assert sk.decrypt(u + ct) == [int(a) + int(b) for a, b in zip(x, u, strict=True)]
    m = np.array([3, -2, 0, 5, -1], dtype=np.int64)
    assert sk.decrypt(ct * m) == [int(a) * int(b) for a, b in zip(x, m, strict=True)]
    assert sk.decrypt(pk.encrypt(np.array([1, 2, 3], dtype=np.int32))) == [1, 2, 3]
    assert sk.decrypt_array(ct).tolist() == x.tolist()


def test_indexing_and_concat(kp: he.HEKeyPair) -> None:
    pk, sk = kp.public, kp.secret
    vals = [10, -20, 30, -40, 50]
    ct = pk.encrypt(vals)
    assert sk.decrypt(ct[2]) == [30]
    assert sk.decrypt(ct[-1]) == [50]
    assert sk.decrypt(ct[1:4]) == [-20, 30, -40]
    assert sk.decrypt(ct[[4, 0, 0]]) == [50, 10, 10]
    assert sk.decrypt(ct[np.array([True, False, True, False, False])]) == [10, 30]
    assert len(ct[[]]) == 0
    cat = he.CiphertextArray.concat([ct[[0]], ct[[]], ct[3:], ct])
    assert sk.decrypt(cat) == [10, -40, 50, *vals]
    assert sk.decrypt(ct.select_sums([[0, 1], [2], [], np.array([3, 4])])) == [-10, 30, 0, 10]
    with pytest.raises(InputError):
        _ = ct[5]
    with pytest.raises(InputError):
        _ = ct[[0, 9]]


def _plain_buckets(
    vals: list[int], bins: np.ndarray, n_bins: int, mask: np.ndarray | None = None
) -> list[int]:
    b2 = bins.reshape(len(vals), -1)
    out = [0] * (b2.shape[1] * n_bins)
    for i, v in enumerate(vals):
        if mask is not None and not mask[i]:
            continue
        for f in range(b2.shape[1]):
            out[f * n_bins + int(b2[i, f])] += v
    return out


@pytest.mark.parametrize("n_bins", [1, 8, 130])
def test_bucket_sums_equal_plaintext(kp: he.HEKeyPair, n_bins: int) -> None:
    rng = np.random.default_rng(n_bins)  # test data only
    n, n_feat = 40, 3
    vals = [int(v) for v in rng.integers(-(2**62), 2**62, size=n)]
    vals[0] = 2**100  # wide values too
    bins = rng.integers(0, n_bins, size=(n, n_feat))
    pk, sk = kp.public, kp.secret
    ct = pk.encrypt(vals)
    assert sk.decrypt(ct.bucket_sums(bins, n_bins)) == _plain_buckets(vals, bins, n_bins)
    assert sk.decrypt(ct.bucket_sums(bins[:, 1], n_bins)) == _plain_buckets(vals, bins[:, 1], n_bins)
    mask = rng.integers(0, 2, size=n).astype(bool)
    assert sk.decrypt(ct.bucket_sums(bins, n_bins, mask=mask)) == _plain_buckets(vals, bins, n_bins, mask)
    masks = [mask, ~mask, np.zeros(n, dtype=bool)]
    multi = ct.bucket_sums_multi(bins, n_bins, masks)
    assert [sk.decrypt(c) for c in multi] == [_plain_buckets(vals, bins, n_bins, m) for m in masks]


def test_bucket_sums_bad_input(kp: he.HEKeyPair) -> None:
    ct = kp.public.encrypt([1, 2, 3])
    with pytest.raises(InputError):
        ct.bucket_sums(np.array([0, 1, 4]), 4)
    with pytest.raises(InputError):
        ct.bucket_sums(np.array([0, 1]), 4)
    with pytest.raises(InputError):
        ct.bucket_sums(np.array([0.0, 1.0, 2.0]), 4)
    with pytest.raises(InputError):
        ct.bucket_sums(np.array([0, 1, 2]), 4, mask=np.array([1, 0]))


def test_rerandomize(kp: he.HEKeyPair) -> None:
    pk, sk = kp.public, kp.secret
    ct = pk.encrypt([5, -6, 2**90])
    rr = ct.rerandomize()
    assert sk.decrypt(rr) == [5, -6, 2**90]
    assert rr.to_bytes() != ct.to_bytes()
    # encryption is probabilistic too
    assert pk.encrypt([5]).to_bytes() != pk.encrypt([5]).to_bytes()


def test_serialization_round_trip(kp: he.HEKeyPair) -> None:
    pk, sk = kp.public, kp.secret
    pk_bytes = pk.to_bytes()
    pk2 = he.HEPublicKey.from_bytes(pk_bytes)
    assert pk2 == pk and pk2.plaintext_bits == pk.plaintext_bits and pk2.key_bits == pk.key_bits
    ct = pk2.encrypt([7, -8, 2**70])  # the peer encrypts under the received key
    data = (ct * 2).to_bytes()
    back = he.CiphertextArray.from_bytes(pk, data)
    assert sk.decrypt(back) == [14, -16, 2**71]
    sk2 = he.HESecretKey.from_bytes(sk.to_bytes())
    assert sk2.decrypt(back) == [14, -16, 2**71]
    assert b"pickle" not in data and not data.startswith(b"\x80")


def test_serialization_rejects_garbage(kp: he.HEKeyPair, other_kp: dict[str, he.HEKeyPair]) -> None:
    pk = kp.public
    data = pk.encrypt([1, 2]).to_bytes()
    with pytest.raises(HEError):
        he.CiphertextArray.from_bytes(pk, data[:-7])
    with pytest.raises(HEError):
        he.CiphertextArray.from_bytes(pk, b"nonsense")
    with pytest.raises(HEError):
        he.CiphertextArray.from_bytes(other_kp[pk.backend].public, data)  # fingerprint mismatch
    with pytest.raises(HEError):
        he.HEPublicKey.from_bytes(b"VEILHEPK1garbage")
    with pytest.raises(HEError):
        he.HEPublicKey.from_bytes(b"not a key")


def test_wrong_key_and_mixing_rejected(kp: he.HEKeyPair, other_kp: dict[str, he.HEKeyPair]) -> None:
    ct = kp.public.encrypt([1, 2, 3])
    other = other_kp[kp.public.backend]
    with pytest.raises(HEError, match="different public key"):
        other.secret.decrypt(ct)
    with pytest.raises(HEError):
        _ = ct + other.public.encrypt([1, 1, 1])
    foreign = other_kp["heu" if kp.public.backend == "phe" else "phe"]
    with pytest.raises(HEError):
        _ = ct + foreign.public.encrypt([1, 1, 1])
    with pytest.raises(HEError):
        _ = ct * ct  # type: ignore[operator]


def test_range_and_type_checks(kp: he.HEKeyPair) -> None:
    pk = kp.public
    assert pk.plaintext_bits >= 300
    bound = 2**pk.plaintext_bits
    assert kp.secret.decrypt(pk.encrypt([bound - 1, -(bound - 1)])) == [bound - 1, -(bound - 1)]
    with pytest.raises(HEError, match="out of range"):
        pk.encrypt([bound])
    with pytest.raises(HEError, match="out of range"):
        pk.encrypt([-bound])
    with pytest.raises(InputError):
        pk.encrypt([1.5])  # type: ignore[list-item]
    with pytest.raises(InputError):
        pk.encrypt(np.array([1.0, 2.0]))
    with pytest.raises(InputError):
        _ = pk.encrypt([1, 2]) + np.array([1, 2, 3])


def test_decrypt_range_check(kp: he.HEKeyPair) -> None:
    # a result that overflowed the usable range is refused, not returned wrong
    # (on heu/OU this is HEU's range check, which also blocks the OU plaintext-overflow attack)
    pk = kp.public
    half = pk.encrypt([2 ** (pk.plaintext_bits - 1)])
    with pytest.raises(HEError):
        kp.secret.decrypt(half + half)
    with pytest.raises(HEError):
        kp.secret.decrypt(-half - half)
    assert kp.secret.decrypt(half + half - 1) == [2**pk.plaintext_bits - 1]


def test_floats(kp: he.HEKeyPair) -> None:
    fxp = FixedPoint(20)
    x = np.array([1.5, -2.25, 1234.5678, -0.001, 0.0])
    ct = he.encrypt_floats(kp.public, x, fxp)
    np.testing.assert_allclose(he.decrypt_floats(kp.secret, ct, fxp), x, atol=2**-20)
    w = fxp.encode(np.array(-3.5))
    ct2 = ct * int(FixedPoint.to_signed(w))
    np.testing.assert_allclose(he.decrypt_floats(kp.secret, ct2, fxp, frac_bits=40), x * -3.5, atol=1e-5)


def test_phe_interoperates_with_python_paillier(other_kp: dict[str, he.HEKeyPair]) -> None:
    from veil.crypto.he.phe_backend import PheCiphertextArray, PhePublicKey, PheSecretKey, _obj

    kp = other_kp["phe"]
    pk, sk = kp.public, kp.secret
    assert isinstance(pk, PhePublicKey) and isinstance(sk, PheSecretKey)
    theirs = pk.phe_key.encrypt(-12345)  # python-paillier's own encryption
    ct = PheCiphertextArray(pk, _obj([theirs.ciphertext(be_secure=False)]))
    assert sk.decrypt(ct) == [-12345]
    ours = pk.encrypt([42])
    assert sk._priv.raw_decrypt(int(ours.arr[0])) == 42


# ---- backend selection -------------------------------------------------------------------


def test_unknown_backend_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown HE backend"):
        he.keygen("paillier", KEY_BITS, backend="seal")


def test_unavailable_backend_no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._REGISTRY, "ghost", "veil_no_such_module:Backend")
    with pytest.raises(ConfigError, match="does not fall back"):
        he.keygen("paillier", KEY_BITS, backend="ghost")
    assert "ghost" not in he.available_backends()
    assert {"heu", "phe"} <= set(he.available_backends())


def test_scheme_and_key_size_checks() -> None:
    with pytest.raises(ConfigError, match="schemes"):
        he.keygen("ou", KEY_BITS, backend="phe")
    with pytest.raises(ConfigError, match="key_bits"):
        he.keygen("paillier", 256, backend="phe")


def test_backend_from_config_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("VEIL_HE_BACKEND", "phe")
    monkeypatch.setenv("VEIL_HE_SCHEME", "paillier")
    monkeypatch.setenv("VEIL_HE_KEY_BITS", str(KEY_BITS))
    monkeypatch.setattr(registry, "_LOGGED", set())
    reset_settings()
    try:
        with caplog.at_level(logging.INFO, logger="veil.crypto.he"):
            k1 = he.keygen()
            k2 = he.keygen()
        assert k1.backend == k2.backend == "phe" and k1.public.key_bits == KEY_BITS
        selected = [r for r in caplog.records if "HE backend selected: phe" in r.getMessage()]
        assert len(selected) == 1
        monkeypatch.setenv("VEIL_HE_BACKEND", "nope")
        reset_settings()
        with pytest.raises(ConfigError):
            he.keygen()
        monkeypatch.setenv("VEIL_HE_KEY_BITS", "12")
        reset_settings()
        with pytest.raises(ConfigError, match="VEIL_HE_KEY_BITS"):
            he.keygen()
    finally:
        monkeypatch.undo()
        reset_settings()


def test_empty_arrays(kp: he.HEKeyPair) -> None:
    # HEU segfaults on some empty-array operations; the wrapper must never pass one through
    pk, sk = kp.public, kp.secret
    e = pk.encrypt([])
    one = pk.encrypt([5])
    back = he.CiphertextArray.from_bytes(pk, e.to_bytes())
    assert len(back) == 0 and sk.decrypt(back) == []
    for r in (e + e, e - e, e + one, one + e, e + 1, e * 3, -e, e[[]], e[0:0], one[1:], e.rerandomize()):
        assert len(r) == 0 and sk.decrypt(r) == []
    assert sk.decrypt(e.sum()) == [0]
    assert sk.decrypt(e.select_sums([[], []])) == [0, 0]
    assert sk.decrypt(one.select_sums([[], [0]])) == [0, 5]
    assert sk.decrypt(e.bucket_sums(np.zeros((0, 2), dtype=np.int64), 3)) == [0] * 6
    assert sk.decrypt(he.CiphertextArray.concat([e, one, e])) == [5]
    with pytest.raises(HEError):
        he.CiphertextArray.from_bytes(pk, e.to_bytes() + b"x")


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "scheme"), [("heu", "ou"), ("phe", "paillier")])
def test_production_key_size(backend: str, scheme: str) -> None:
    kp = he.keygen(scheme=scheme, key_bits=2048, backend=backend)
    assert kp.public.key_bits == 2048 and kp.public.plaintext_bits >= 680
    vals = [2**63 - 1, -(2**63), 2**104 + 12345, -7]
    bins = np.array([[0, 1], [1, 1], [0, 0], [2, 1]])
    ct = kp.public.encrypt(vals)
    pk2 = he.HEPublicKey.from_bytes(kp.public.to_bytes())
    masked = he.CiphertextArray.from_bytes(pk2, (ct.rerandomize() + pk2.encrypt([1, 2, 3, 4])).to_bytes())
    assert kp.secret.decrypt(masked) == [v + m for v, m in zip(vals, [1, 2, 3, 4], strict=True)]
    assert kp.secret.decrypt(ct.bucket_sums(bins, 3)) == _plain_buckets(vals, bins, 3)
