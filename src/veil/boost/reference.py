"""Plaintext reference of the secure algorithm (same binning, same complete trees, same rules).

Used by tests as the oracle for the secure protocol and to check that our tree semantics match
xgboost's ``hist`` method; never used on real multi-party data (it needs both parties' columns).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from veil.boost.params import BoostParams
from veil.boost.split import INVALID_GAIN, candidate_sums, gains, leaf_weight, objective_grad_hess
from veil.boost.tree import SplitInfo, candidate_layout, child_left_bits, leaf_indicator

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]

#: splits are taken only when loss reduction exceeds gamma by this much (xgboost's kRtEps-like)
SPLIT_EPS = 1e-5


@dataclasses.dataclass
class PlainTree:
    """Splits of both parties (node -> (party, split)) and effective leaf weights."""

    splits: dict[int, tuple[int, SplitInfo]]
    leaf_weights: F64


@dataclasses.dataclass(frozen=True)
class NodeTrace:
    """What the reference decided at one internal node (tests compare the secure trainer to it).

    ``gains`` are the gains of every candidate of both parties (party 0's first, ``n_cand0`` of
    them; INVALID_GAIN where ``min_child_weight`` is violated) without the parent term;
    ``winner`` is the index of the (first) maximum, ``chosen`` the candidate taken (``winner``
    unless forced); ``split`` is True when the node really splits (``gains[chosen] - parent >
    gamma + SPLIT_EPS`` and every ancestor really split).
    """

    tree: int
    node: int
    gains: F64
    parent: float
    winner: int
    chosen: int
    n_cand0: int
    split: bool

    def index_of(self, owner: int, split: SplitInfo, max_bin: int, dirs: tuple[bool, bool]) -> int:
        """Global candidate index of ``owner``'s ``split`` (inverse of :meth:`candidate`)."""
        local = (split.feature * (2 if dirs[owner] else 1) + int(split.missing_left)) * max_bin + split.bin
        return local + (self.n_cand0 if owner == 1 else 0)

    def candidate(self, index: int, max_bin: int, dirs: tuple[bool, bool]) -> tuple[int, SplitInfo]:
        """Global candidate index -> (owner party, split without threshold)."""
        p, local = (0, index) if index < self.n_cand0 else (1, index - self.n_cand0)
        f, ml, b = candidate_layout(local, max_bin, dirs[p])
        return p, SplitInfo(f, b, ml, 0.0)


@dataclasses.dataclass
class PlainModel:
    """A whole model in plaintext (reference / debug reconstruction only)."""

    depth: int
    base_margin: float
    objective: str
    trees: list[PlainTree]

    def predict_margin_bins(self, bins: list[I32], max_bin: int) -> F64:
        """Margins of binned rows (``bins[p]`` is party p's binned columns)."""
        n = bins[0].shape[0]
        out = np.full(n, self.base_margin)
        for tree in self.trees:
            inds = []
            for p in range(len(bins)):
                lb = {
                    node: child_left_bits(bins[p], s, max_bin)
                    for node, (owner, s) in tree.splits.items()
                    if owner == p
                }
                inds.append(leaf_indicator(lb, n, self.depth))
            ind = inds[0] & inds[1]
            out += ind.astype(np.float64) @ tree.leaf_weights
        return out


def base_margin_of(params: BoostParams, y: F64) -> float:
    """The starting margin: logit(base_score) for logistic, base_score for regression."""
    if params.objective == "binary:logistic":
        p = float(np.mean(y)) if params.base_score is None else float(params.base_score)
        p = min(max(p, 1e-6), 1 - 1e-6)
        return float(np.log(p / (1 - p)))
    return float(np.mean(y)) if params.base_score is None else float(params.base_score)


def row_subsample(params: BoostParams, n: int, tree: int) -> F64:
    """Active party's per-tree row sample (data randomness, not a secret: it is secret-shared)."""
    if params.subsample >= 1.0:
        return np.ones(n)
    rng = np.random.default_rng([params.seed, tree, 1])
    return (rng.random(n) < params.subsample).astype(np.float64)


def col_subsample(params: BoostParams, n_features: int, tree: int, party: int) -> npt.NDArray[np.bool_]:
    """Each party samples its own columns per tree; at least one column is kept."""
    keep = np.ones(n_features, dtype=np.bool_)
    if params.colsample_bytree >= 1.0 or n_features == 0:
        return keep
    rng = np.random.default_rng([params.seed, tree, 2, party])
    k = max(1, round(params.colsample_bytree * n_features))
    keep[:] = False
    keep[rng.choice(n_features, size=k, replace=False)] = True
    return keep


def masked_bins(bins: I32, keep: npt.NDArray[np.bool_]) -> I32:
    """Unsampled columns put every row in bin 0, so none of their candidates can win a split."""
    if keep.all():
        return bins
    out = bins.copy()
    out[:, ~keep] = 0
    return out


def histogram(bins: I32, vals: F64, n_bins: int) -> F64:
    """(nodes, features, n_bins) bucket sums of ``vals`` (rows x nodes)."""
    _, feats = bins.shape
    nodes = vals.shape[1]
    out = np.zeros((nodes, feats, n_bins))
    for f in range(feats):
        for j in range(nodes):
            out[j, f] = np.bincount(bins[:, f], weights=vals[:, j], minlength=n_bins)
    return out


def train_reference(
    bins: list[I32],
    y: F64,
    params: BoostParams,
    *,
    valid: tuple[list[I32], F64] | None = None,
    trace: list[NodeTrace] | None = None,
    force: dict[tuple[int, int], int] | None = None,
) -> PlainModel:
    """Train in plaintext with exactly the secure algorithm's rules.

    ``trace``: when given, one :class:`NodeTrace` per internal node of every tree is appended.
    ``force``: (tree, node) -> global candidate index taken there instead of the argmax (tests
    replay the secure trainer's choice at a near-tie to keep comparing the trees after it).
    """
    params.validate()
    n = y.shape[0]
    mb = params.max_bin
    depth = params.max_depth
    model = PlainModel(depth, base_margin_of(params, y), params.objective, [])
    margin = np.full(n, model.base_margin)
    dirs = [bool(np.any(b == mb)) for b in bins]
    best: tuple[float, int] = (np.inf, 0)
    for t in range(params.n_estimators):
        g, h = objective_grad_hess(params.objective, margin, y)
        tbins = [masked_bins(b, col_subsample(params, b.shape[1], t, p)) for p, b in enumerate(bins)]
        ind = row_subsample(params, n, t)[:, None]
        splits: dict[int, tuple[int, SplitInfo]] = {}
        node_w: list[F64] = []
        node_v: list[F64] = []
        for level in range(depth + 1):
            gsum = (ind * g[:, None]).sum(0)
            hsum = (ind * h[:, None]).sum(0)
            node_w.append(leaf_weight(gsum, hsum, params.reg_lambda, params.learning_rate))
            if level == depth:
                break
            all_gains = []
            for b, both in zip(tbins, dirs, strict=True):
                hg = histogram(b, ind * g[:, None], mb + 1)
                hh = histogram(b, ind * h[:, None], mb + 1)
                gl = candidate_sums(hg, mb, both)
                hl = candidate_sums(hh, mb, both)
                all_gains.append(gains(gl, hl, gsum, hsum, params.reg_lambda, params.min_child_weight))
            cat = np.concatenate(all_gains, axis=1)
            win = np.argmax(cat, axis=1)
            argmax_win = win.copy()
            for k in range(2**level):
                forced = (force or {}).get((t, 2**level - 1 + k))
                if forced is not None:
                    win[k] = forced
            best_gain = cat[np.arange(cat.shape[0]), win]
            parent = gsum * gsum / (hsum + params.reg_lambda)
            v = ((best_gain > INVALID_GAIN / 2) & (best_gain - parent > params.gamma + SPLIT_EPS)).astype(
                float
            )
            node_v.append(v)
            if trace is not None:
                alive = effective_alive(node_v)
                for k in range(2**level):
                    trace.append(
                        NodeTrace(
                            t,
                            2**level - 1 + k,
                            cat[k].copy(),
                            float(parent[k]),
                            int(argmax_win[k]),
                            int(win[k]),
                            all_gains[0].shape[1],
                            bool(alive[k] > 0),
                        )
                    )
            nxt = np.empty((n, 2 ** (level + 1)))
            n0 = all_gains[0].shape[1]
            for k in range(2**level):
                node = 2**level - 1 + k
                w = int(win[k])
                p, local = (0, w) if w < n0 else (1, w - n0)
                f, ml, bb = candidate_layout(local, mb, dirs[p])
                s = SplitInfo(f, bb, ml, 0.0)
                splits[node] = (p, s)
                c = child_left_bits(tbins[p], s, mb).astype(float)
                nxt[:, 2 * k] = ind[:, k] * c
                nxt[:, 2 * k + 1] = ind[:, k] * (1 - c)
            ind = nxt
        weights = effective_weights(node_w, node_v)
        model.trees.append(PlainTree(splits, weights))
        margin = margin + ind @ weights
        if valid is not None and params.early_stopping_rounds:
            vm = model.predict_margin_bins(valid[0], mb)
            score = eval_metric(params.objective, vm, valid[1])
            if score < best[0] - 1e-12:
                best = (score, t)
            elif t - best[1] >= params.early_stopping_rounds:
                model.trees = model.trees[: best[1] + 1]
                break
    return model


def effective_weights(node_w: list[F64], node_v: list[F64]) -> F64:
    """Leaf weights where every leaf below an unsplit node carries that node's weight."""
    eff = node_w[0]
    alive = np.ones(1)
    for level, v in enumerate(node_v):
        real = alive * v
        child = node_w[level + 1]
        par = np.repeat(eff, 2)
        eff = par + np.repeat(real, 2) * (child - par)
        alive = np.repeat(real, 2)
    return eff


def effective_alive(node_v: list[F64]) -> F64:
    """1 for each node of the last level in ``node_v`` that splits and whose ancestors all split."""
    alive = np.ones(1)
    for v in node_v[:-1]:
        alive = np.repeat(alive * v, 2)
    return alive * node_v[-1]


def eval_metric(objective: str, margin: F64, y: F64) -> float:
    """logloss for binary:logistic, rmse for regression (lower is better)."""
    if objective == "binary:logistic":
        p = np.clip(1.0 / (1.0 + np.exp(-margin)), 1e-15, 1 - 1e-15)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(np.sqrt(np.mean((margin - y) ** 2)))
