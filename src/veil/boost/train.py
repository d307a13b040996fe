"""The two secure training algorithms (``he-agg`` and ``ss-agg``), one function for both roles.

Party 0 is the *active* party (labels + features), party 1 the *passive* party (features).
Everything secret stays additively shared over Z_2^64 (fixed point, ``frac_bits``):
gradients/hessians, the instance-space indicator of every node, bucket sums, gains, the
"is this split worth it" bit and the leaf weights. Per tree level:

1. bucket sums of the left children's masked gradients (``ind * g``, ``ind * h``) over each
   party's private bins (:mod:`veil.boost.histogram`), right children by subtraction;
2. cumulative sums -> left/right sums of every (feature, NaN direction, bin) candidate (local);
3. gains ``GL * GL/(HL+lambda) + GR * GR/(HR+lambda)`` with ``div``, candidates violating
   ``min_child_weight`` pushed to ``-2^30`` with one comparison + product;
4. one batched tournament ``argmax`` over all candidates of all nodes of the level;
5. the one-hot of the winner is revealed block-wise: party p learns only the part covering its
   own candidates (so the owner learns feature + threshold, the other party learns only that
   the split is not its own);
6. the owner computes its plaintext go-left bits ``c`` and enters them as a trivial sharing;
   children indicators ``ind * c`` (Beaver) and ``ind - ind * c`` (local).

Leaves: ``w = -eta G/(H+lambda)`` for every node; the shared bit ``v = best - parent > gamma``
makes every leaf below an unsplit node carry that node's weight (so the tree is always complete
and its shape reveals nothing). Predictions during training stay shared:
``margin += leaf_indicator @ w``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.boost.binning import QuantileBinner
from veil.boost.errors import BoostConfigError, BoostProtocolError
from veil.boost.histogram import (
    HEAggregator,
    SSAggregator,
    _Timed,
    build_onehot_aggs,
    level_sums,
    sum_bound_bits,
)
from veil.boost.messages import BOOST_PROTOCOL_VERSION, EarlyStop, Hello, HelloAck, TreeDone
from veil.boost.model import PartyModel, PartyTree
from veil.boost.params import BoostParams
from veil.boost.reference import (
    SPLIT_EPS,
    base_margin_of,
    col_subsample,
    eval_metric,
    masked_bins,
    row_subsample,
)
from veil.boost.tree import SplitInfo, candidate_layout, child_left_bits, leaf_indicator, n_candidates
from veil.comm import Channel
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC
from veil.crypto.random import random_bytes
from veil.crypto.sharing import AShare
from veil.crypto.triples import TripleSource

__all__ = ["INVALID_GAIN_BITS", "TrainResult", "secure_train"]

log = logging.getLogger("veil.boost")

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
U64 = npt.NDArray[np.uint64]

ROLES = ("active", "passive")
#: invalid candidates get gain -2^30 (real units)
INVALID_GAIN_BITS = 30
DEFAULT_FRAC_BITS = 20


@dataclasses.dataclass
class TrainResult:
    """This party's model plus what the run cost."""

    model: PartyModel
    seconds: float
    bytes_sent: int
    bytes_received: int
    rounds: int
    he_ops: int
    time_split: dict[str, float]
    valid_history: list[float]
    best_iteration: int | None


class _TimedTriples:
    """Wraps a TripleSource and times every request (the 'triples' share of the time split)."""

    def __init__(self, inner: TripleSource, timing: _Timed) -> None:
        self._inner = inner
        self._timing = timing
        self.trust = inner.trust
        self.party = inner.party

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return attr(*a, **kw)
            finally:
                self._timing.add("triples", time.perf_counter() - t0)

        return timed


class _TimedChannel:
    """Wraps a Channel and times blocking receives (network + waiting for the peer)."""

    def __init__(self, inner: Channel, timing: _Timed) -> None:
        self._inner = inner
        self._timing = timing
        self.stats = inner.stats
        self.default_timeout = inner.default_timeout

    def send(self, msg: Any) -> None:
        t0 = time.perf_counter()
        try:
            self._inner.send(msg)
        finally:
            self._timing.add("network", time.perf_counter() - t0)

    def recv(self, msg_type: Any, timeout: float | None = None) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner.recv(msg_type, timeout=timeout)
        finally:
            self._timing.add("network", time.perf_counter() - t0)

    def abort(self, reason: str) -> None:
        self._inner.abort(reason)

    def close(self) -> None:
        self._inner.close()


def handshake(
    channel: Channel,
    party: int,
    n_rows: int,
    n_features: int,
    params: BoostParams,
    triples_trust: str,
    frac_bits: int,
    has_missing: bool,
) -> tuple[int, bytes, bool]:
    """Exchange and compare public parameters; returns (peer's feature count, model id, peer has NaN)."""
    pub = {k: repr(v) for k, v in params.public_dict().items()}
    model_id = random_bytes(16) if party == 0 else b""
    mine = Hello(
        BOOST_PROTOCOL_VERSION,
        ROLES[party],
        n_rows,
        n_features,
        pub,
        triples_trust,
        frac_bits,
        model_id,
        has_missing,
    )
    channel.send(mine)
    peer = channel.recv(Hello)
    problems = []
    if peer.version != BOOST_PROTOCOL_VERSION:
        problems.append(f"protocol version {peer.version} != {BOOST_PROTOCOL_VERSION}")
    if peer.role == ROLES[party]:
        problems.append(f"both parties are {peer.role!r}: one must be active, the other passive")
    if peer.n_rows != n_rows:
        problems.append(f"row counts differ ({n_rows} here, {peer.n_rows} at the peer): align rows first")
    problems += _limit_problems(peer.n_rows, peer.n_features)  # hardening (issue 9): VEIL_LIMIT_*
    if peer.params != pub:
        diff = sorted(k for k in set(pub) | set(peer.params) if pub.get(k) != peer.params.get(k))
        problems.append(f"parameters differ: {', '.join(diff)}")
    if peer.triples.split(" ")[0] != triples_trust.split(" ")[0]:
        problems.append(f"triple sources differ ({triples_trust} here, {peer.triples} at the peer)")
    if peer.frac_bits != frac_bits:
        problems.append("fixed-point precision differs")
    channel.send(HelloAck(not problems, "; ".join(problems), ROLES[party], n_rows, n_features))
    ack = channel.recv(HelloAck)
    if problems:
        raise BoostConfigError("training refused: " + "; ".join(problems))
    if not ack.ok:
        raise BoostConfigError("the peer refused training: " + ack.reason)
    mid = model_id if party == 0 else peer.model_id
    if len(mid) != 16:
        raise BoostProtocolError("malformed model id from the active party")
    return peer.n_features, mid, peer.has_missing


def _limit_problems(n_rows: int, n_features: int) -> list[str]:
    """Shared resource limits (veil.limits) on what the peer announces in its Hello."""
    from veil.limits import get_limits

    lim = get_limits()
    out = []
    if not 0 <= n_rows <= lim.max_rows:
        out.append(f"peer announces {n_rows} rows, limit {lim.max_rows} (VEIL_LIMIT_MAX_ROWS)")
    if not 0 <= n_features <= lim.max_features:
        out.append(
            f"peer announces {n_features} features, limit {lim.max_features} (VEIL_LIMIT_MAX_FEATURES)"
        )
    return out


def _interleave(left: U64, right: U64, axis: int) -> U64:
    shp = list(left.shape)
    shp[axis] *= 2
    out = np.empty(shp, dtype=np.uint64)
    idx: list[Any] = [slice(None)] * len(shp)
    idx[axis] = slice(0, None, 2)
    out[tuple(idx)] = left
    idx[axis] = slice(1, None, 2)
    out[tuple(idx)] = right
    return out


def _cand_sums(hist: U64, max_bin: int, both_dirs: bool) -> U64:
    """(2, nodes, F, nb) shares -> (2, nodes, C) candidate left sums (local)."""
    two, nodes, feats, _ = hist.shape
    cum = np.cumsum(hist[..., :max_bin], axis=3, dtype=np.uint64)
    if not both_dirs:
        return np.ascontiguousarray(cum.reshape(two, nodes, feats * max_bin))
    miss = hist[..., max_bin : max_bin + 1]
    both = np.stack([cum, cum + miss], axis=3)
    return both.reshape(two, nodes, feats * 2 * max_bin)


def _comparison_bits(frac: int, n: int, p: BoostParams, div_lo: float, div_hi: float) -> dict[str, int]:
    """Bit bounds promised to ``ltz`` / ``argmax`` / ``sigmoid`` (fewer AND gates than 63).

    * ``hess``: ``|H_child - min_child_weight| < div_hi + mcw`` (child hessian sums lie in
      ``[0, div_hi)``);
    * ``gain``: a gain is ``G^2 / (H + lambda) <= n^2 / lambda`` (``|g| <= 1`` per row for
      logistic loss) or the invalid marker ``-2^30``; differences stay below twice the sum;
      regression gradients have no a-priori bound, so it keeps 63 bits;
    * ``margin``: ``|margin| <= |base| + trees * eta * n / lambda`` plus sigmoid's clamp 32;
    * ``gain`` also covers ``parent + gamma - best`` (the "split is worth it" comparison).
    Each bound gets one spare bit; never above 63.
    """

    def at(real: float) -> int:
        return min(63, frac + max(1, math.ceil(math.log2(real + 1.0))) + 1)

    lam = max(p.reg_lambda, div_lo)
    hess = at(div_hi + p.min_child_weight + 1.0)
    if p.objective != "binary:logistic":
        return {"hess": hess, "gain": 63, "margin": 63}
    gain = at(2.0 * (float(n) ** 2 / lam + 2.0**INVALID_GAIN_BITS) + p.gamma)
    # |logit(base_score)| <= log(1e6) < 16 (base_score is clipped to [1e-6, 1 - 1e-6]); the
    # bound uses public parameters only, so both parties promise the same widths
    margin = at(16.0 + p.n_estimators * p.learning_rate * n / lam + 32.0)
    return {"hess": hess, "gain": gain, "margin": margin}


class _Trainer:
    def __init__(
        self,
        mpc: MPC,
        party: int,
        bins: I32,
        n_feats: tuple[int, int],
        params: BoostParams,
        timing: _Timed,
        dirs: tuple[bool, bool],
        he_keys: Any = None,
        peer_pk: Any = None,
    ) -> None:
        self.mpc = mpc
        self.party = party
        self.bins = bins
        self.n = bins.shape[0]
        self.n_feats = n_feats
        self.p = params
        self.fxp = mpc.fxp
        self.timing = timing
        self.he_keys = he_keys
        self.peer_pk = peer_pk
        self.nb = params.max_bin + 1
        self._aggs: list[Any] | None = None
        self.dirs = dirs
        self.n_cand = tuple(n_candidates(f, params.max_bin, d) for f, d in zip(n_feats, dirs, strict=True))
        hmax = float(self.n) if params.objective == "reg:squarederror" else self.n / 4.0
        self.div_hi = 2.0 ** max(4, math.ceil(math.log2(hmax + params.reg_lambda + 2)))
        self.div_lo = 2.0 ** math.floor(math.log2(max(params.reg_lambda, 2.0**-8)))
        if params.reg_lambda <= 0:
            self.div_lo = 2.0**-8
        if math.log2(self.div_hi) > self.fxp.frac_bits:
            raise BoostConfigError(
                f"{self.n} rows need more fixed-point fraction bits; use fewer rows per run"
            )
        self.cmp_bits = _comparison_bits(self.fxp.frac_bits, self.n, params, self.div_lo, self.div_hi)

    # -- helpers
    def enc(self, x: float) -> U64:
        return self.fxp.encode(np.array(x))

    def share0(self, values: U64, frac: int) -> AShare:
        """Trivial sharing of a value known to party 0 (party 1 holds zeros)."""
        return AShare(values if self.party == 0 else np.zeros_like(values), self.party, frac)

    def make_aggs(self, tbins: I32, tree: int) -> list[Any]:
        """Aggregators for this tree: built once per training, or per tree with colsample."""
        if self._aggs is not None and self.p.colsample_bytree >= 1.0:
            aggs = self._aggs
        else:
            aggs = self._build_aggs(tbins, tree)
            self._aggs = aggs
        for holder, agg in enumerate(aggs):
            agg.new_tree(2**self.p.max_depth, f"t{tree}/agg{holder}")
        return aggs

    def _build_aggs(self, tbins: I32, tree: int) -> list[Any]:
        if self.p.algorithm == "ss-agg" and getattr(self.mpc.triples, "trust", None) == "homomorphic":
            # dealer-free ss-agg: one-hot product by punctured PRFs over OT (veil.crypto.onehot)
            return build_onehot_aggs(
                self.mpc, self.party, tbins, self.n, self.n_feats, self.nb, f"t{tree}/agg", self.timing
            )
        cls = SSAggregator if self.p.algorithm == "ss-agg" else HEAggregator
        # he-agg aggregates in a narrower ring when every bucket sum has a public bound
        bound = sum_bound_bits(self.p.objective, self.fxp.frac_bits, self.n)
        return [
            cls(
                self.mpc,
                holder,
                tbins if holder == self.party else None,
                self.n,
                self.n_feats[holder],
                self.nb,
                f"t{tree}/agg{holder}",
                self.timing,
                (self.he_keys, self.peer_pk),
                bound_bits=bound,
            )
            for holder in (0, 1)
        ]

    def grad_hess(self, margin: AShare, y: AShare) -> AShare:
        """Shares of (g, h) stacked as (2, n)."""
        mpc = self.mpc
        if self.p.objective == "binary:logistic":
            prob = mpc.sigmoid(margin, bits=self.cmp_bits["margin"])
            g = prob - y
            h = prob - mpc.square(prob)  # p (1 - p); dealer-free half the OTs of a Beaver product
            return AShare(np.stack([g.values, h.values]), self.party, self.fxp.frac_bits)
        g = margin - y
        h = self.share0(np.full(self.n, self.enc(1.0), dtype=np.uint64), self.fxp.frac_bits)
        return AShare(np.stack([g.values, h.values]), self.party, self.fxp.frac_bits)

    def tree(
        self, t: int, gh_all: AShare, binner: QuantileBinner
    ) -> tuple[dict[int, SplitInfo], AShare, AShare]:
        """Grow one tree; returns (own splits, leaf-weight shares (2^D,), leaf indicator (n, 2^D))."""
        mpc, p, n, f = self.mpc, self.p, self.n, self.fxp.frac_bits
        mb, nb, depth = p.max_bin, self.nb, p.max_depth
        keep = col_subsample(p, self.bins.shape[1], t, self.party)
        tbins = masked_bins(self.bins, keep)
        aggs = self.make_aggs(tbins, t)
        if p.subsample < 1.0:
            sample = row_subsample(p, n, t).astype(np.uint64) if self.party == 0 else np.zeros(n, np.uint64)
            ind = AShare(sample[:, None], self.party, 0)
            (gh,) = mpc.mul_bits(
                [(AShare(ind.values[None], self.party, 0), AShare(gh_all.values[:, :, None], self.party, f))]
            )
        else:
            ind = self.share0(np.ones((n, 1), np.uint64), 0)
            gh = AShare(gh_all.values[:, :, None].copy(), self.party, f)
        splits: dict[int, SplitInfo] = {}
        weights: list[AShare] = []
        valids: list[AShare] = []
        parent_hist: list[U64] = []
        lam = self.enc(p.reg_lambda)
        for level in range(depth + 1):
            k = ind.shape[1]
            node_gh = gh.sum(axis=1)  # (2, k)
            if level == depth:
                q = mpc.div(node_gh[0], node_gh[1] + lam, lo=self.div_lo, hi=self.div_hi)
                weights.append(mpc.mul_public(q, -p.learning_rate))
                break
            # 1. histograms of the left children (the root at level 0)
            sel = gh if level == 0 else gh[:, :, 0::2]
            kk = sel.shape[2]
            v = AShare(np.ascontiguousarray(sel.values.transpose(1, 0, 2).reshape(n, 2 * kk)), self.party, f)
            hists = []
            for holder, summed in enumerate(level_sums(aggs, v)):
                fh = self.n_feats[holder]
                hist = summed.values.reshape(fh, nb, 2, kk).transpose(2, 3, 0, 1)
                if level > 0:
                    hist = _interleave(hist, parent_hist[holder] - hist, axis=1)
                hists.append(np.ascontiguousarray(hist))
            parent_hist = hists
            # 2. candidate sums (2, k, C)
            cs = np.concatenate([_cand_sums(h, mb, d) for h, d in zip(hists, self.dirs, strict=True)], axis=2)
            n_c = cs.shape[2]
            gl = cs[0]
            hl = cs[1]
            g_node = np.broadcast_to(node_gh.values[0][:, None], (k, n_c))
            h_node = np.broadcast_to(node_gh.values[1][:, None], (k, n_c))
            gr = g_node - gl
            hr = h_node - hl
            # 3. gains: numerators/denominators of candidates and of the node itself in one div
            num = np.concatenate([gl.ravel(), gr.ravel(), node_gh.values[0]])
            den = np.concatenate([hl.ravel(), hr.ravel(), node_gh.values[1]])
            num_s = AShare(num, self.party, f)
            den_s = AShare(den, self.party, f) + lam
            inv_in = AShare(np.stack([hl, hr]), self.party, f) - self.enc(p.min_child_weight)
            bits = mpc.ltz(inv_in, bits=self.cmp_bits["hess"])  # [HL < mcw], [HR < mcw]
            (inv_both,) = mpc.mul_bits([(bits[0], bits[1])])
            q = mpc.div(num_s, den_s, lo=self.div_lo, hi=self.div_hi)
            prod = mpc.mul(num_s, q)
            m = k * n_c
            gain = AShare(prod.values[:m] + prod.values[m : 2 * m], self.party, f).reshape(k, n_c)
            parent_term = prod[2 * m :]
            weights.append(mpc.mul_public(q[2 * m :], -p.learning_rate))
            inv = bits[0] + bits[1] - inv_both
            big = self.enc(float(2**INVALID_GAIN_BITS))
            gain = gain - mpc.mul_bits([(inv, gain + big)])[0]
            # 4. argmax over all candidates of every node
            onehot, best = mpc.argmax(gain, axis=-1, bits=self.cmp_bits["gain"])
            thr = parent_term + self.enc(p.gamma + SPLIT_EPS) - best
            valids.append(mpc.ltz(thr, bits=self.cmp_bits["gain"]))  # 1 iff best - parent > gamma + eps
            # 5. reveal each party's block of the one-hot only to that party
            off = (0, self.n_cand[0])
            mine: U64 | None = None
            for owner in (0, 1):
                block = onehot[:, off[owner] : off[owner] + self.n_cand[owner]]
                got = mpc.reveal(block, to=owner)
                if got is not None:
                    mine = got
            if mine is None:
                raise BoostProtocolError("split reveal failed")
            if mine.size and (np.any(mine > 1) or np.any(mine.sum(axis=1) > 1)):
                raise BoostProtocolError("revealed split selector is not a one-hot vector")
            # 6. children
            cmat = np.zeros((n, k), dtype=np.uint64)
            first = 2**level - 1
            for j in range(k):
                hit = np.nonzero(mine[j])[0] if mine.size else np.array([])
                if hit.size == 0:
                    continue
                feat, ml, b = candidate_layout(int(hit[0]), mb, self.dirs[self.party])
                s = SplitInfo(feat, b, ml, binner.threshold(feat, b))
                splits[first + j] = s
                cmat[:, j] = child_left_bits(tbins, s, mb)
            cshare = AShare(cmat, self.party, 0)
            # 0/1 split matrix times indicator and g, h: bit x value products (2 OTs dealer-free)
            lind, lgh = mpc.mul_bits([(cshare, ind), (AShare(cmat[None], self.party, 0), gh)])
            ind = AShare(_interleave(lind.values, (ind - lind).values, axis=1), self.party, 0)
            gh = AShare(_interleave(lgh.values, (gh - lgh).values, axis=2), self.party, f)
        leaf_w = self.effective_weights(weights, valids)
        return splits, leaf_w, ind

    def effective_weights(self, weights: list[AShare], valids: list[AShare]) -> AShare:
        mpc = self.mpc
        eff = weights[0]
        alive: AShare | None = None
        for level, v in enumerate(valids):
            real = v if alive is None else mpc.mul_bits([(alive, v)])[0]
            par = AShare(np.repeat(eff.values, 2), self.party, eff.frac_bits)
            child = weights[level + 1]
            rep = AShare(np.repeat(real.values, 2), self.party, 0)
            eff = par + mpc.mul_bits([(rep, child - par)])[0]
            alive = rep
        return eff


def secure_train(
    channel: Channel,
    role: str,
    x: F64,
    y: F64 | None,
    params: BoostParams,
    triples: TripleSource,
    **kwargs: Any,
) -> TrainResult:
    """Train as ``role`` ("active" with labels ``y``, or "passive") against the peer on ``channel``.

    ``x`` are this party's feature columns, rows already aligned with the peer's. Keyword
    arguments: ``feature_names``, ``valid`` = (features, labels or None) for early stopping,
    ``frac_bits``, ``he_scheme``, ``he_key_bits``, ``he_backend``, ``progress(done, total)``.
    On any failure the peer is told at once (``channel.abort``) so it does not wait for a timeout.
    """
    try:
        return _secure_train(channel, role, x, y, params, triples, **kwargs)
    except BaseException as exc:
        abort_peer(channel, exc)
        raise


def abort_peer(channel: Channel, exc: BaseException) -> None:
    """Best-effort: tell the peer we failed (not when the failure came from the peer)."""
    from veil.errors import ChannelClosed, PeerError

    if isinstance(exc, (PeerError, ChannelClosed)):
        return
    try:
        channel.abort(f"{type(exc).__name__}: {exc}")
    except Exception as err:
        log.debug("could not abort the channel: %s", err)


def _secure_train(
    channel: Channel,
    role: str,
    x: F64,
    y: F64 | None,
    params: BoostParams,
    triples: TripleSource,
    *,
    feature_names: list[str] | None = None,
    valid: tuple[F64, F64 | None] | None = None,
    frac_bits: int = DEFAULT_FRAC_BITS,
    he_scheme: str = "ou",
    he_key_bits: int = 2048,
    he_backend: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train as ``role`` ("active" with labels ``y``, or "passive") against the peer on ``channel``.

    ``x`` are this party's feature columns, rows already aligned with the peer's. ``valid`` is
    (features, labels) of a validation set (labels only at the active party) for early stopping.
    """
    from veil.boost.binning import as_float_matrix
    from veil.boost.errors import BoostInputError

    params.validate()
    if role not in ROLES:
        raise BoostConfigError(f"role must be 'active' or 'passive', got {role!r}")
    party = ROLES.index(role)
    x = as_float_matrix(x)
    n = x.shape[0]
    if n < 2:
        raise BoostInputError("need at least 2 training rows")
    if party == 0:
        if y is None:
            raise BoostInputError("the active party must provide labels")
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.shape[0] != n:
            raise BoostInputError(f"{y.shape[0]} labels for {n} rows")
        if not np.all(np.isfinite(y)):
            raise BoostInputError("labels contain NaN or infinity")
        if params.objective == "binary:logistic" and not np.all((y == 0) | (y == 1)):
            raise BoostInputError("binary:logistic needs labels 0 or 1")
    timing = _Timed()
    t_start = time.perf_counter()
    ch = _TimedChannel(channel, timing)
    trust = str(getattr(triples, "trust", "unknown"))
    has_missing = bool(np.isnan(x).any())
    n_peer, model_id, peer_missing = handshake(
        ch,
        party,
        n,
        x.shape[1],
        params,
        trust,  # type: ignore[arg-type]
        frac_bits,
        has_missing,
    )
    n_feats = (x.shape[1], n_peer) if party == 0 else (n_peer, x.shape[1])
    dirs = (has_missing, peer_missing) if party == 0 else (peer_missing, has_missing)
    fxp = FixedPoint(frac_bits)
    mpc = MPC(ch, party, _TimedTriples(triples, timing), fxp)  # type: ignore[arg-type]
    binner = QuantileBinner(params.max_bin).fit(x)
    bins = binner.transform(x)
    he_keys = peer_pk = None
    if params.algorithm == "he-agg":
        he_keys, peer_pk = _he_setup(ch, he_scheme, he_key_bits, he_backend, timing)
    tr = _Trainer(mpc, party, bins, n_feats, params, timing, dirs, he_keys, peer_pk)
    base = base_margin_of(params, y) if party == 0 and y is not None else 0.0
    base_u = fxp.encode(np.array(base))
    margin = tr.share0(np.full(n, base_u, dtype=np.uint64), frac_bits)
    ys = tr.share0(fxp.encode(y) if party == 0 and y is not None else np.zeros(n, np.uint64), frac_bits)
    vbins: I32 | None = None
    vmargin: AShare | None = None
    yv: F64 | None = None
    if valid is not None:
        vx = as_float_matrix(valid[0])
        vbins = binner.transform(vx)
        vmargin = tr.share0(np.full(vx.shape[0], base_u, dtype=np.uint64), frac_bits)
        yv = None if valid[1] is None else np.asarray(valid[1], dtype=np.float64).ravel()
    trees: list[PartyTree] = []
    history: list[float] = []
    best: tuple[float, int] = (math.inf, -1)
    depth = params.max_depth
    for t in range(params.n_estimators):
        gh = tr.grad_hess(margin, ys)
        splits, leaf_w, ind = tr.tree(t, gh, binner)
        margin = margin + mpc.bits_matvec(ind, leaf_w)
        trees.append(PartyTree(splits, leaf_w.values.copy()))
        ch.send(TreeDone(t, len(trees)))
        done = ch.recv(TreeDone)
        if done.tree != t or done.requests != len(trees):
            raise BoostProtocolError(f"peer is at tree {done.tree}, this party at {t}")
        if progress is not None:
            progress(t + 1, params.n_estimators)
        if vbins is not None and vmargin is not None and params.early_stopping_rounds:
            lb = {node: child_left_bits(vbins, s, params.max_bin) for node, s in splits.items()}
            own = leaf_indicator(lb, vbins.shape[0], depth).astype(np.uint64)
            leaf = AShare(mpc.private_bit_product(own), party, 0)
            vmargin = vmargin + mpc.bits_matvec(leaf, leaf_w)
            revealed = mpc.reveal(vmargin, to=0)
            if party == 0:
                if revealed is None or yv is None:
                    raise BoostInputError("early stopping needs validation labels at the active party")
                score = eval_metric(params.objective, fxp.decode(revealed), yv)
                history.append(score)
                if score < best[0] - 1e-12:
                    best = (score, t)
                stop = t - best[1] >= params.early_stopping_rounds
                ch.send(EarlyStop(stop, best[1] + 1))
                decision = EarlyStop(stop, best[1] + 1)
            else:
                decision = ch.recv(EarlyStop)
                if not 1 <= decision.keep_trees <= len(trees):
                    raise BoostProtocolError("peer asked to keep an impossible number of trees")
            if decision.stop:
                trees = trees[: decision.keep_trees]
                break
    seconds = time.perf_counter() - t_start
    model = PartyModel(
        role=role,
        party=party,
        model_id=model_id,
        objective=params.objective,
        depth=depth,
        max_bin=params.max_bin,
        frac_bits=frac_bits,
        base_share=int(base_u) if party == 0 else 0,
        feature_names=list(feature_names) if feature_names else [f"f{i}" for i in range(x.shape[1])],
        binner=binner,
        trees=trees,
        algorithm=params.algorithm,
        triples=trust,
        metadata={"n_features_peer": int(n_peer), "n_rows": int(n)},
    )
    split = dict(timing.seconds)
    split["ss_compute"] = max(0.0, seconds - sum(split.values()))
    stats = channel.stats
    return TrainResult(
        model=model,
        seconds=seconds,
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        rounds=stats.rounds,
        he_ops=timing.he_ops,
        time_split=split,
        valid_history=history,
        best_iteration=best[1] if best[1] >= 0 else None,
    )


def _he_setup(ch: Any, scheme: str, key_bits: int, backend: str | None, timing: _Timed) -> tuple[Any, Any]:
    """Each party makes a key pair (it decrypts the bucket sums of the peer's features)."""
    from veil.boost.messages import CiphertextBatch
    from veil.crypto import he
    from veil.crypto.he.base import HEPublicKey

    t0 = time.perf_counter()
    kp = he.keygen(scheme=scheme, key_bits=key_bits, backend=backend)
    timing.add("he", time.perf_counter() - t0)
    ch.send(CiphertextBatch("he/pk", kp.public.to_bytes(), 0))
    msg = ch.recv(CiphertextBatch)
    if msg.stage != "he/pk":
        raise BoostProtocolError("expected the peer's HE public key")
    peer_pk = HEPublicKey.from_bytes(msg.data)
    if peer_pk.key_bits < 2048 and key_bits >= 2048:
        raise BoostConfigError("peer's HE key is weaker than required")
    return kp, peer_pk
