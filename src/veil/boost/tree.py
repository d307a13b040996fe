"""Tree layout shared by the plaintext reference, the secure trainer and prediction.

Every tree is complete: depth ``D`` has internal nodes ``0 .. 2**D - 2`` in heap order (children of
``j`` are ``2j+1`` / ``2j+2``) and ``2**D`` leaves. A node whose best split is not worth it
(gain <= gamma, or min_child_weight violated) still gets a split, but all leaves below it carry the
node's own weight, so the function is the same as xgboost's pruned tree while the shape reveals
nothing. Each party stores only the splits it owns.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

__all__ = ["SplitInfo", "candidate_layout", "child_left_bits", "leaf_indicator", "n_candidates"]


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """A split owned by this party: local feature, bin threshold, NaN direction, value threshold."""

    feature: int
    bin: int
    missing_left: bool
    threshold: float


def n_candidates(n_features: int, max_bin: int, both_dirs: bool = True) -> int:
    """Split candidates of one party for one node: (feature, missing direction, bin).

    A party whose training columns have no missing value uses only "missing goes right"
    (``both_dirs=False``): the other direction would give identical gains.
    """
    return n_features * (2 if both_dirs else 1) * max_bin


def candidate_layout(index: int, max_bin: int, both_dirs: bool = True) -> tuple[int, bool, int]:
    """Candidate index -> (feature, missing_left, bin)."""
    f, rest = divmod(int(index), (2 if both_dirs else 1) * max_bin)
    d, b = divmod(rest, max_bin)
    return f, bool(d), b


def child_left_bits(bins: npt.NDArray[np.int32], split: SplitInfo, max_bin: int) -> npt.NDArray[np.bool_]:
    """Rows that go left at ``split`` (``bins`` is the owner's binned column of that feature)."""
    col = bins[:, split.feature]
    left = col <= split.bin
    if split.missing_left:
        left |= col == max_bin
    return np.asarray(left, dtype=np.bool_)


def child_left_bits_values(x: npt.NDArray[np.float64], split: SplitInfo) -> npt.NDArray[np.bool_]:
    """Rows that go left, from raw values (prediction on new data): ``v < threshold`` or NaN-left."""
    col = x[:, split.feature]
    nan = np.isnan(col)
    with np.errstate(invalid="ignore"):
        left = col < split.threshold
    return np.where(nan, split.missing_left, left)


def leaf_indicator(
    left_bits: dict[int, npt.NDArray[np.bool_]], n_rows: int, depth: int
) -> npt.NDArray[np.uint8]:
    """This party's leaf-indicator matrix (rows x 2**depth).

    ``left_bits`` maps each internal node this party owns to its go-left vector; nodes owned by the
    peer are unconstrained here (both children stay possible). The true leaf of a row is the one
    leaf where both parties' indicators are 1.
    """
    ind = np.ones((n_rows, 1), dtype=np.uint8)
    for level in range(depth):
        first = 2**level - 1
        nxt = np.empty((n_rows, 2 ** (level + 1)), dtype=np.uint8)
        for k in range(2**level):
            node = first + k
            if node in left_bits:
                lb = left_bits[node].astype(np.uint8)
                nxt[:, 2 * k] = ind[:, k] & lb
                nxt[:, 2 * k + 1] = ind[:, k] & (1 - lb)
            else:
                nxt[:, 2 * k] = ind[:, k]
                nxt[:, 2 * k + 1] = ind[:, k]
        ind = nxt
    return ind
