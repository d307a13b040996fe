"""Per-party quantile binning (xgboost ``hist`` semantics, computed locally by each party).

A feature's cut points ``cuts`` are increasing; a value ``v`` falls in bin
``searchsorted(cuts, v, side="right")`` (the first cut strictly greater than ``v``), so the split
"bin <= b goes left" is exactly xgboost's ``v < cuts[b]``. Missing values (NaN) get the extra
bin ``max_bin``; every feature has ``max_bin + 1`` bins so the histogram layout reveals nothing
about how many distinct values a feature has.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from veil.boost.errors import BoostInputError

__all__ = ["QuantileBinner"]


class QuantileBinner:
    """Quantile sketch per column with at most ``max_bin`` bins (plus one bin for NaN)."""

    def __init__(self, max_bin: int) -> None:
        self.max_bin = int(max_bin)
        self.cuts: list[npt.NDArray[np.float64]] = []

    @property
    def n_bins(self) -> int:
        """Bins per feature including the missing-value bin."""
        return self.max_bin + 1

    def fit(self, x: npt.NDArray[np.float64]) -> QuantileBinner:
        """Compute cut points for every column of ``x`` (rows x features)."""
        x = as_float_matrix(x)
        self.cuts = []
        for j in range(x.shape[1]):
            col = x[:, j]
            col = col[~np.isnan(col)]
            if col.size == 0:
                self.cuts.append(np.array([np.inf]))
                continue
            uniq = np.unique(col)
            if uniq.size <= self.max_bin:
                cuts = np.append(uniq[1:], np.inf)
            else:
                qs = np.quantile(col, np.linspace(0.0, 1.0, self.max_bin + 1)[1:-1], method="linear")
                inner = np.unique(qs)
                inner = inner[inner > uniq[0]]
                cuts = np.append(inner, np.inf)
            self.cuts.append(cuts.astype(np.float64))
        return self

    def transform(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
        """Bin index of every value; NaN maps to ``max_bin``."""
        x = as_float_matrix(x)
        if x.shape[1] != len(self.cuts):
            raise BoostInputError(f"expected {len(self.cuts)} feature columns, got {x.shape[1]}")
        out = np.empty(x.shape, dtype=np.int32)
        for j, cuts in enumerate(self.cuts):
            col = x[:, j]
            b = np.searchsorted(cuts, col, side="right").astype(np.int32)
            np.minimum(b, self.max_bin - 1, out=b)
            b[np.isnan(col)] = self.max_bin
            out[:, j] = b
        return out

    def threshold(self, feature: int, b: int) -> float:
        """The value ``t`` such that "bin <= b" is "value < t"."""
        cuts = self.cuts[feature]
        return float(cuts[b]) if b < len(cuts) else float("inf")

    def to_lists(self) -> list[list[float]]:
        """Cut points as plain lists (for the model file)."""
        return [[float(v) for v in c] for c in self.cuts]

    @classmethod
    def from_lists(cls, max_bin: int, cuts: list[list[float]]) -> QuantileBinner:
        """Rebuild from :meth:`to_lists`."""
        b = cls(max_bin)
        b.cuts = [np.asarray(c, dtype=np.float64) for c in cuts]
        return b


def as_float_matrix(x: object) -> npt.NDArray[np.float64]:
    """A 2-D float64 copy of ``x``; non-numeric data raises :class:`BoostInputError`."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BoostInputError(f"feature columns must be numeric: {exc}") from None
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        raise BoostInputError(f"features must be a 2-D table, got {arr.ndim} dimensions")
    if np.isinf(arr).any():
        raise BoostInputError("features contain infinite values")
    return arr
