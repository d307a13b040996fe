"""sklearn-style API: fit / predict / save / load, one role per side."""

from __future__ import annotations

import numpy as np
import pytest

from veil.boost import SecureXGBClassifier, SecureXGBRegressor
from veil.boost.errors import BoostConfigError
from veil.crypto.triples import LocalDealer
from veil.testing import run_parties


def test_regressor_fit_save_load_predict(tmp_path):
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=300, n_features=4, noise=1.0, random_state=0)
    s0, s1 = LocalDealer.pair()
    kw = dict(n_estimators=3, max_depth=2, max_bin=8)

    def a(ch):
        m = SecureXGBRegressor("active", ch, triples=s0, **kw).fit(x[:, :2], y)
        m.save_model(tmp_path / "a.json")
        first = m.predict(x[:50, :2])
        m2 = SecureXGBRegressor("active", ch, triples=s0).load_model(tmp_path / "a.json")
        return first, m2.predict(x[:50, :2])

    def b(ch):
        m = SecureXGBRegressor("passive", ch, triples=s1, **kw).fit(x[:, 2:])
        m.save_model(tmp_path / "b.json")
        first = m.predict(x[:50, 2:])
        m2 = SecureXGBRegressor("passive", ch, triples=s1).load_model(tmp_path / "b.json")
        return first, m2.predict(x[:50, 2:])

    (p1, p2), (q1, q2) = run_parties(a, b, timeout=300)
    assert q1 is None and q2 is None
    assert np.allclose(p1, p2, atol=1e-9)
    assert np.sqrt(np.mean((p1 - y[:50]) ** 2)) < np.std(y)  # it learned something


def test_classifier_predict_shapes_and_errors(tmp_path, cancer):
    xtr, xte, ytr, _ = cancer
    s0, s1 = LocalDealer.pair()

    def a(ch):
        m = SecureXGBClassifier("active", ch, triples=s0, n_estimators=1, max_depth=2, max_bin=4).fit(
            xtr[:, :3], ytr
        )
        return m.predict_proba(xte[:, :3]), m.predict(xte[:, :3])

    def b(ch):
        m = SecureXGBClassifier("passive", ch, triples=s1, n_estimators=1, max_depth=2, max_bin=4).fit(
            xtr[:, 3:6]
        )
        return m.predict_proba(xte[:, 3:6]), m.predict(xte[:, 3:6])

    (pa, la), (pb, lb) = run_parties(a, b, timeout=300)
    assert pa.shape == (len(xte), 2) and np.allclose(pa.sum(axis=1), 1.0)
    assert set(np.unique(la)) <= {0.0, 1.0}
    assert pb is None and lb is None
    with pytest.raises(BoostConfigError):
        SecureXGBClassifier("boss", None)  # type: ignore[arg-type]
    with pytest.raises(BoostConfigError):
        SecureXGBClassifier("active", None, max_depth=0)  # type: ignore[arg-type]
    with pytest.raises(BoostConfigError, match="not fitted"):
        SecureXGBClassifier("active", None).predict(xte)  # type: ignore[arg-type]


def test_auto_algorithm_is_ss_agg_with_either_triple_source():
    from veil.boost.api import resolve_algorithm

    assert resolve_algorithm("auto", "homomorphic") == "ss-agg"  # dealer-free one-hot product
    s0, _ = LocalDealer.pair()
    assert resolve_algorithm("auto", s0) == "ss-agg"
    assert resolve_algorithm("ss-agg", "homomorphic") == "ss-agg"
