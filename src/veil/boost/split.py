"""Split finding as pure functions on plaintext arrays.

The secure trainer runs the same arithmetic on secret shares (:mod:`veil.boost.train`); these
functions are the plaintext reference and the place where the candidate layout is defined.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["INVALID_GAIN", "candidate_sums", "gains", "leaf_weight", "objective_grad_hess"]

#: Gain given to candidates that violate ``min_child_weight`` (below any real gain).
INVALID_GAIN = -float(2**30)

F64 = npt.NDArray[np.float64]


def candidate_sums(hist: F64, max_bin: int, both_dirs: bool = True) -> F64:
    """Left-child sums of every candidate.

    ``hist`` has shape (nodes, features, max_bin + 1) with the NaN bin last; the result has shape
    (nodes, features * 2 * max_bin) in the order (feature, missing_left, bin) of
    :func:`veil.boost.tree.candidate_layout`.
    """
    nodes, feats, _ = hist.shape
    cum = np.cumsum(hist[:, :, :max_bin], axis=2)
    miss = hist[:, :, max_bin : max_bin + 1]
    if not both_dirs:
        return cum.reshape(nodes, feats * max_bin)
    both = np.stack([cum, cum + miss], axis=2)  # (nodes, F, 2, max_bin)
    return both.reshape(nodes, feats * 2 * max_bin)


def gains(gl: F64, hl: F64, g: F64, h: F64, reg_lambda: float, min_child_weight: float) -> F64:
    """Gain of every candidate without the parent term; INVALID_GAIN where a child is too light."""
    gr = g[:, None] - gl
    hr = h[:, None] - hl
    out = gl * gl / (hl + reg_lambda) + gr * gr / (hr + reg_lambda)
    ok = (hl >= min_child_weight) & (hr >= min_child_weight)
    return np.where(ok, out, INVALID_GAIN)


def leaf_weight(g: F64, h: F64, reg_lambda: float, learning_rate: float) -> F64:
    """xgboost's leaf value ``-G / (H + lambda)`` times the learning rate."""
    return -g / (h + reg_lambda) * learning_rate


def objective_grad_hess(objective: str, margin: F64, y: F64) -> tuple[F64, F64]:
    """First and second derivative of the loss at ``margin``."""
    if objective == "binary:logistic":
        p = 1.0 / (1.0 + np.exp(-margin))
        return p - y, np.maximum(p * (1.0 - p), 1e-16)
    return margin - y, np.ones_like(margin)
