"""Secure two-party prediction with a distributed model (the paper's protocol).

Each party evaluates only its own splits on its own columns and gets a plaintext leaf-indicator
matrix ``I_p`` (rows x leaves): 1 where the row is consistent with every split it owns on the
path to that leaf. The true leaf of a row is the only one where ``I_0 * I_1 = 1``. The product
is computed with Beaver triples on trivially shared private inputs (each party sees only
uniformly masked values), then multiplied with the secret-shared leaf weights:
``margin = base + sum_t (I_0 * I_1) @ w_t``. Only the margin is revealed, to the active party
(or to both when asked); nobody learns the other's splits, the path a row takes, or a leaf value.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from veil.boost.binning import as_float_matrix
from veil.boost.errors import BoostConfigError, BoostInputError, BoostProtocolError
from veil.boost.messages import BOOST_PROTOCOL_VERSION, PredictHello
from veil.boost.model import PartyModel
from veil.boost.reference import PlainModel, PlainTree
from veil.boost.tree import child_left_bits_values, leaf_indicator
from veil.comm import Channel
from veil.crypto.encoding import FixedPoint
from veil.crypto.mpc import MPC
from veil.crypto.sharing import AShare
from veil.crypto.triples import TripleSource

__all__ = ["own_leaf_indicators", "reconstruct_plain", "secure_predict_margin"]

F64 = npt.NDArray[np.float64]
U64 = npt.NDArray[np.uint64]

ROW_BLOCK = 8192


def own_leaf_indicators(model: PartyModel, x: F64) -> npt.NDArray[np.uint8]:
    """This party's leaf indicators of every tree, concatenated: (rows, trees * 2**depth)."""
    n = x.shape[0]
    parts = []
    for t in model.trees:
        lb = {node: child_left_bits_values(x, s) for node, s in t.splits.items()}
        parts.append(leaf_indicator(lb, n, model.depth))
    if not parts:
        return np.zeros((n, 0), dtype=np.uint8)
    return np.concatenate(parts, axis=1)


def secure_predict_margin(
    channel: Channel, model: PartyModel, x: F64, triples: TripleSource, *, reveal_to: str = "active"
) -> F64 | None:
    """Run the prediction protocol; the margins go to the active party (or ``both``), else None."""
    from veil.boost.train import abort_peer

    try:
        return _secure_predict_margin(channel, model, x, triples, reveal_to=reveal_to)
    except BaseException as exc:
        abort_peer(channel, exc)
        raise


def _secure_predict_margin(
    channel: Channel, model: PartyModel, x: F64, triples: TripleSource, *, reveal_to: str = "active"
) -> F64 | None:
    x = as_float_matrix(x)
    if x.shape[1] != len(model.binner.cuts):
        raise BoostInputError(f"model expects {len(model.binner.cuts)} feature columns, got {x.shape[1]}")
    if reveal_to not in ("active", "both"):
        raise BoostConfigError("reveal_to must be 'active' or 'both'")
    party = model.party
    n = x.shape[0]
    mine = PredictHello(BOOST_PROTOCOL_VERSION, model.role, model.model_id, n, len(model.trees), model.depth)
    channel.send(mine)
    peer = channel.recv(PredictHello)
    problems = []
    if peer.role == model.role:
        problems.append(f"both parties are {model.role!r}")
    if peer.model_id != model.model_id:
        problems.append("the two model files belong to different training runs")
    if peer.n_rows != n:
        problems.append(f"row counts differ ({n} here, {peer.n_rows} at the peer)")
    if peer.n_trees != len(model.trees) or peer.depth != model.depth:
        problems.append("tree counts or depths differ")
    if problems:
        raise BoostInputError("prediction refused: " + "; ".join(problems))
    fxp = FixedPoint(model.frac_bits)
    mpc = MPC(channel, party, triples, fxp)
    w = np.concatenate([t.leaf_shares for t in model.trees]) if model.trees else np.zeros(0, np.uint64)
    ws = AShare(w, party, model.frac_bits)
    ind = own_leaf_indicators(model, x).astype(np.uint64)
    base = np.uint64(model.base_share) if party == 0 else np.uint64(0)
    out = np.empty(n, dtype=np.uint64)
    for start in range(0, max(n, 1), ROW_BLOCK):
        blk = ind[start : start + ROW_BLOCK]
        if blk.shape[0] == 0:
            break
        # I_0 * I_1: a product of two privately held bits, one OT per element dealer-free
        # (a Beaver product would cost 128)
        leaf = AShare(mpc.private_bit_product(blk), party, 0)
        m = (
            mpc.bits_matvec(leaf, ws)
            if w.size
            else AShare(np.zeros(blk.shape[0], np.uint64), party, model.frac_bits)
        )
        out[start : start + blk.shape[0]] = m.values + base
    margin = AShare(out, party, model.frac_bits)
    got = mpc.reveal(margin, to=None if reveal_to == "both" else 0)
    if got is None:
        return None
    return fxp.decode(got)


def reconstruct_plain(a: PartyModel, b: PartyModel) -> PlainModel:
    """DEBUG / TESTS ONLY: join both parties' files into a plaintext model (needs both secrets)."""
    if a.model_id != b.model_id or a.party == b.party:
        raise BoostProtocolError("these files are not the two halves of one model")
    if a.party == 1:
        a, b = b, a
    fxp = FixedPoint(a.frac_bits)
    trees = []
    for ta, tb in zip(a.trees, b.trees, strict=True):
        splits = {k: (0, s) for k, s in ta.splits.items()} | {k: (1, s) for k, s in tb.splits.items()}
        trees.append(PlainTree(splits, fxp.decode(ta.leaf_shares + tb.leaf_shares)))
    base = float(fxp.decode(np.array([np.uint64(a.base_share) + np.uint64(b.base_share)]))[0])
    return PlainModel(a.depth, base, a.objective, trees)


def plain_predict_values(model: PlainModel, xs: list[F64]) -> F64:
    """Margins of a reconstructed model on raw feature values (party p's columns in ``xs[p]``)."""
    n = xs[0].shape[0]
    out = np.full(n, model.base_margin)
    for tree in model.trees:
        inds = []
        for p in range(2):
            lb = {
                node: child_left_bits_values(xs[p], s)
                for node, (owner, s) in tree.splits.items()
                if owner == p
            }
            inds.append(leaf_indicator(lb, n, model.depth))
        out += (inds[0] & inds[1]).astype(np.float64) @ tree.leaf_weights
    return out
