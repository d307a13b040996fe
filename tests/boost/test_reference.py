"""The plaintext reference reproduces xgboost's hist semantics closely enough."""

from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from veil.boost.binning import QuantileBinner
from veil.boost.params import BoostParams
from veil.boost.reference import PlainModel, effective_weights, train_reference
from veil.boost.split import candidate_sums


def _split_bins(xtr, xte, cols, max_bin):
    out_tr, out_te = [], []
    for c in cols:
        b = QuantileBinner(max_bin).fit(xtr[:, c])
        out_tr.append(b.transform(xtr[:, c]))
        out_te.append(b.transform(xte[:, c]))
    return out_tr, out_te


def _xgb(params: BoostParams, xtr, ytr, xte, base_score):
    cls = xgb.XGBClassifier if params.objective == "binary:logistic" else xgb.XGBRegressor
    m = cls(
        n_estimators=params.n_estimators,
        max_depth=params.max_depth,
        learning_rate=params.learning_rate,
        reg_lambda=params.reg_lambda,
        gamma=params.gamma,
        min_child_weight=params.min_child_weight,
        max_bin=params.max_bin,
        tree_method="hist",
        base_score=base_score,
        n_jobs=1,
    )
    m.fit(xtr, ytr)
    return m.predict_proba(xte)[:, 1] if params.objective == "binary:logistic" else m.predict(xte)


def test_cancer_auc_matches_xgboost(cancer):
    xtr, xte, ytr, yte = cancer
    params = BoostParams(n_estimators=10, max_depth=3, max_bin=16)
    cols = [list(range(15)), list(range(15, 30))]
    btr, bte = _split_bins(xtr, xte, cols, params.max_bin)
    model = train_reference(btr, ytr, params)
    auc = roc_auc_score(yte, model.predict_margin_bins(bte, params.max_bin))
    auc_x = roc_auc_score(yte, _xgb(params, xtr, ytr, xte, float(ytr.mean())))
    assert abs(auc - auc_x) < 0.005, (auc, auc_x)
    assert auc > 0.97


def test_regression_rmse_matches_xgboost():
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=4000, n_features=8, n_informative=6, noise=10.0, random_state=1)
    xtr, xte, ytr, yte = x[:3000], x[3000:], y[:3000], y[3000:]
    params = BoostParams(objective="reg:squarederror", n_estimators=30, max_depth=4, max_bin=32)
    btr, bte = _split_bins(xtr, xte, [[0, 1, 2, 3], [4, 5, 6, 7]], params.max_bin)
    model = train_reference(btr, ytr, params)
    rmse = float(np.sqrt(np.mean((model.predict_margin_bins(bte, params.max_bin) - yte) ** 2)))
    rmse_x = float(np.sqrt(np.mean((_xgb(params, xtr, ytr, xte, float(ytr.mean())) - yte) ** 2)))
    assert rmse <= rmse_x * 1.01, (rmse, rmse_x)


def test_candidate_sums_layout():
    hist = np.arange(2 * 3 * 5, dtype=float).reshape(1, 2 * 3, 5)[:, :2, :]  # 1 node, 2 features, 4+1 bins
    cs = candidate_sums(hist, 4)
    assert cs.shape == (1, 2 * 2 * 4)
    # feature 0, missing right, bin 1 = h[0]+h[1]; missing left adds the NaN bin
    assert cs[0, 1] == hist[0, 0, 0] + hist[0, 0, 1]
    assert cs[0, 4 + 1] == hist[0, 0, 0] + hist[0, 0, 1] + hist[0, 0, 4]


def test_unsplit_node_propagates_weight():
    w = [np.array([1.0]), np.array([2.0, 3.0]), np.array([4.0, 5.0, 6.0, 7.0])]
    v = [np.array([0.0]), np.array([1.0, 1.0])]
    assert effective_weights(w, v).tolist() == [1.0, 1.0, 1.0, 1.0]
    v = [np.array([1.0]), np.array([0.0, 1.0])]
    assert effective_weights(w, v).tolist() == [2.0, 2.0, 6.0, 7.0]


def test_missing_values_routed(cancer):
    xtr, xte, ytr, yte = cancer
    xtr = xtr.copy()
    rng = np.random.default_rng(0)
    xtr[rng.random(xtr.shape) < 0.1] = np.nan
    params = BoostParams(n_estimators=5, max_depth=3, max_bin=16)
    btr, bte = _split_bins(xtr, xte, [list(range(15)), list(range(15, 30))], 16)
    model: PlainModel = train_reference(btr, ytr, params)
    auc = roc_auc_score(yte, model.predict_margin_bins(bte, 16))
    assert auc > 0.95
    assert any(s.missing_left for t in model.trees for _, s in t.splits.values())


@pytest.mark.parametrize("obj", ["binary:logistic", "reg:squarederror"])
def test_early_stopping_truncates(cancer, obj):
    xtr, xte, ytr, yte = cancer
    params = BoostParams(
        objective=obj, n_estimators=60, max_depth=3, learning_rate=0.9, early_stopping_rounds=2
    )
    btr, bte = _split_bins(xtr, xte, [list(range(15)), list(range(15, 30))], 16)
    model = train_reference(btr, ytr, params, valid=(bte, yte))
    assert 1 <= len(model.trees) < 60
