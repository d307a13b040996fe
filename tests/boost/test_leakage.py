"""Leakage test: everything a party receives during training looks uniform and data-independent.

Each party's received messages are recorded. All secret values (gradients, hessians, bucket
sums, gains, leaf weights, indicators) are small fixed-point numbers or 0/1, i.e. ring elements
within 2^52 of 0 (mod 2^64). A uniform share lands there with probability 2^-11; we assert
that (a) almost no received ring element does, (b) none of the reconstructed leaf weights and
plaintext gradients appear verbatim, and (c) the received values' top-byte distributions of two
runs on different data are statistically indistinguishable (chi-square two-sample test).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2_contingency
from tests.boost.helpers import party

from veil.boost.messages import CiphertextBatch, Hello, HelloAck, Opening, Reveal, TreeDone
from veil.boost.params import BoostParams
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MpcOpen
from veil.crypto.triples import LocalDealer
from veil.testing import run_parties


def _arrays(received):
    u64, u8 = [], []
    for m in received:
        if isinstance(m, MpcOpen):
            arrs = m.arrays
        elif isinstance(m, Opening):
            arrs = m.values
        elif isinstance(m, Reveal):
            arrs = [m.values]
        elif isinstance(m, (Hello, HelloAck, TreeDone, CiphertextBatch)):
            continue
        else:
            raise AssertionError(f"unexpected message type {type(m).__name__}")
        for a in arrs:
            if a.dtype == np.uint64:
                u64.append(a.ravel())
            elif a.dtype == np.uint8:
                u8.append(a.ravel())
            else:
                raise AssertionError(f"unexpected array dtype {a.dtype}")
    return np.concatenate(u64), (np.concatenate(u8) if u8 else np.zeros(0, np.uint8))


def _train(seed: int):
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=160, n_features=6, random_state=seed)
    params = BoostParams(n_estimators=2, max_depth=2, max_bin=8)
    s0, s1 = LocalDealer.pair()
    (ra, _, rec_a), (rb, _, rec_b) = run_parties(
        party,
        party,
        timeout=300,
        args_a=("active", x[:, :3], y.astype(float), params, s0, None, True),
        args_b=("passive", x[:, 3:], None, params, s1, None, True),
    )
    return x, y, ra, rb, rec_a, rec_b


@pytest.fixture(scope="module")
def runs():
    return _train(0), _train(1)


def _near_zero_fraction(v: np.ndarray) -> float:
    mag = np.minimum(v, np.uint64(0) - v)  # |signed value|
    return float(np.mean(mag < np.uint64(1 << 52)))


def test_received_ring_elements_look_uniform(runs):
    for x, y, ra, rb, rec_a, rec_b in runs:
        for rec in (rec_a, rec_b):
            u64, u8 = _arrays(rec)
            assert u64.size > 10_000
            assert _near_zero_fraction(u64) < 3 * 2.0**-11 + 1e-3
            top = (u64 >> np.uint64(63)).mean()
            assert abs(top - 0.5) < 0.01
            if u8.size:
                bits = np.unpackbits(u8).mean()
                assert abs(bits - 0.5) < 0.01


def test_no_plaintext_values_in_received_messages(runs):
    fxp = FixedPoint(20)
    for x, y, ra, rb, rec_a, rec_b in runs:
        weights = set()
        for ta, tb in zip(ra.model.trees, rb.model.trees, strict=True):
            weights |= set((ta.leaf_shares + tb.leaf_shares).tolist())
        p0 = y.mean()
        grads = set(fxp.encode(p0 - y.astype(float)).tolist())  # first-tree gradients
        for rec in (rec_a, rec_b):
            u64, _ = _arrays(rec)
            vals = set(u64.tolist())
            assert not (vals & weights), "a leaf weight was sent in the clear"
            assert len(vals & grads) == 0, "a plaintext gradient was sent in the clear"


def test_two_runs_indistinguishable(runs):
    (_, _, _, _, a0, b0), (_, _, _, _, a1, b1) = runs
    for r0, r1 in ((a0, a1), (b0, b1)):
        v0, _ = _arrays(r0)
        v1, _ = _arrays(r1)
        h0 = np.bincount((v0 >> np.uint64(56)).astype(np.int64), minlength=256)
        h1 = np.bincount((v1 >> np.uint64(56)).astype(np.int64), minlength=256)
        _, p, _, _ = chi2_contingency(np.stack([h0, h1]))
        assert p > 1e-4, p


def test_split_reveal_only_to_owner(runs):
    """Each party learns only its own splits: the received split-selector shares are uniform and
    the models hold disjoint node sets."""
    for _, _, ra, rb, _, _ in runs:
        for ta, tb in zip(ra.model.trees, rb.model.trees, strict=True):
            assert set(ta.splits).isdisjoint(tb.splits)


@pytest.mark.slow
def test_he_agg_feature_owner_only_sees_peer_ciphertexts():
    """he-agg: the feature owner receives only ciphertexts under the peer's key (it holds no key
    that decrypts them); everything else it receives is uniform."""
    from sklearn.datasets import make_classification

    from veil.crypto.he.base import CiphertextArray, HEPublicKey

    x, y = make_classification(n_samples=60, n_features=4, random_state=2)
    params = BoostParams(n_estimators=1, max_depth=2, max_bin=4, algorithm="he-agg")
    s0, s1 = LocalDealer.pair()
    (_, _, rec_a), (_, _, rec_b) = run_parties(
        party,
        party,
        timeout=600,
        args_a=("active", x[:, :2], y.astype(float), params, s0, None, True),
        args_b=("passive", x[:, 2:], None, params, s1, None, True),
    )
    for rec in (rec_a, rec_b):
        pks = [m for m in rec if isinstance(m, CiphertextBatch) and m.stage == "he/pk"]
        assert len(pks) == 1
        peer_pk = HEPublicKey.from_bytes(pks[0].data)
        enc = [m for m in rec if isinstance(m, CiphertextBatch) and m.stage.endswith("/enc")]
        assert enc
        for m in enc:
            assert len(CiphertextArray.from_bytes(peer_pk, m.data)) == m.count
        u64, _ = _arrays(rec)
        assert _near_zero_fraction(u64) < 3 * 2.0**-11 + 1e-3


def _dealer_free_recorded(ch, role, x, y, params):
    """One party of a dealer-free run with the triple source on the recorded channel, so the OT
    extension and one-hot product messages are recorded too."""
    from tests.boost.helpers import Recorder

    from veil.boost.api import make_triple_source
    from veil.boost.train import secure_train

    rec = Recorder(ch)
    src = make_triple_source("homomorphic", rec, 0 if role == "active" else 1, arith="ot")
    try:
        res = secure_train(rec, role, x, y, params, src)
    finally:
        src.close()
    return res, rec.received


def _ot_arrays(received):
    """Arrays of the OT-extension messages (OT columns, GGM corrections, one-hot corrections)."""
    from veil.crypto.triples_ot import OtMsg

    u64, u8 = [], []
    for m in received:
        if isinstance(m, OtMsg):
            for a in m.arrays:
                (u64 if a.dtype == np.uint64 else u8).append(a.ravel())
    return np.concatenate(u64), np.concatenate(u8)


@pytest.mark.slow
def test_dealer_free_ss_agg_messages_look_uniform_and_data_independent():
    """Dealer-free ss-agg (bucket sums by the one-hot product over OT): every ring element either
    party receives, OT-extension and one-hot corrections included, looks uniform, and two runs
    on different data are indistinguishable."""
    from sklearn.datasets import make_classification

    from veil.crypto.triples_he import HtMsg

    params = BoostParams(n_estimators=2, max_depth=2, max_bin=8, algorithm="ss-agg")
    tops = []
    for seed in (3, 4):
        x, y = make_classification(n_samples=160, n_features=6, random_state=seed)
        (ra, rec_a), (rb, rec_b) = run_parties(
            _dealer_free_recorded,
            _dealer_free_recorded,
            timeout=300,
            args_a=("active", x[:, :3], y.astype(float), params),
            args_b=("passive", x[:, 3:], None, params),
        )
        weights = set()
        for ta, tb in zip(ra.model.trees, rb.model.trees, strict=True):
            weights |= set((ta.leaf_shares + tb.leaf_shares).tolist())
        for rec in (rec_a, rec_b):
            from veil.crypto.triples_ot import OtMsg

            rest = [m for m in rec if not isinstance(m, (OtMsg, HtMsg))]
            u64, _ = _arrays(rest)
            o64, o8 = _ot_arrays(rec)
            allv = np.concatenate([u64, o64])
            assert o64.size > 10_000
            assert _near_zero_fraction(allv) < 3 * 2.0**-11 + 1e-3
            assert abs(float((o64 >> np.uint64(63)).mean()) - 0.5) < 0.01
            assert abs(float(np.unpackbits(o8).mean()) - 0.5) < 0.01
            assert not (set(allv.tolist()) & weights)
            tops.append(np.bincount((allv >> np.uint64(56)).astype(np.int64), minlength=256))
    for i in (0, 1):  # the same party in the two runs
        _, p, _, _ = chi2_contingency(np.stack([tops[i], tops[i + 2]]))
        assert p > 1e-4, p
