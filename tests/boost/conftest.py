"""Small data sets shared by the boost tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def cancer() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Breast cancer (569 x 30), stratified 70/30 split."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y.astype(float), test_size=0.3, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


@pytest.fixture(scope="session")
def regression() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic regression (600 x 8)."""
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=800, n_features=8, n_informative=6, noise=5.0, random_state=1)
    return x[:600], x[600:], y[:600], y[600:]
