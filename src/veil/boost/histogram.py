"""Secret-shared bucket sums ("histograms") of shared vectors over one party's private bins.

All aggregators compute, for the feature owner ``holder`` with plaintext bin indices
``bins`` (n, F) and a secret-shared matrix ``V`` (n, c), shares of ``M^T V`` where ``M`` is the
owner's one-hot bucket matrix (n, F * n_bins), feature-major. Neither party learns ``V``;
the non-owner learns nothing about ``bins``.

* :class:`OneHotAggregator` (``ss-agg`` without a dealer): the one-hot product of
  :mod:`veil.crypto.onehot` (punctured PRFs set up once by OT; one masked message per level).
* :class:`SSAggregator` (``ss-agg`` with a dealer): correlated randomness with a mask ``A`` for ``M``. The
  owner sends ``E = M - A`` once per tree (uniform); for each batch the non-owner sends
  ``F = V_other - B`` (uniform); owner: ``M^T (V_own + F) + C_own`` (sparse bucket sums),
  non-owner: ``E^T B + C_other`` (dense, independent of the data). ``C = A^T B``.
* :class:`HEAggregator` (``he-agg``): the non-owner encrypts its share of ``V`` under its own
  key (several values packed per ciphertext), the owner sums the ciphertexts per bucket with its
  plaintext bins (``CiphertextArray.bucket_sums``), adds the bucket sums of its own share (in
  plaintext, K additions instead of n) and a statistically hiding mask (40 bits wider than the
  sum, never reduced mod 2^64 before decryption), re-randomises and
  returns them; the non-owner decrypts and keeps ``sum + r mod 2^64``, the owner ``-r``.

  Narrowed ring: when the caller knows a public bound ``|every bucket sum| < 2^(k-1)``
  (``bound_bits=k``; logistic training: ``|g| <= 1``, ``0 <= h <= 1/4``, so ``k = f + 2 +
  ceil(log2 n)``, 38 bits at 50k rows), both parties reduce their shares mod 2^k (exact: shares
  of the sum mod 2^k), the non-owner encrypts k-bit instead of 64-bit shares, so a slot needs
  ``k + log2 n + 1 + 41`` bits (96 instead of 122 at 50k: 7 values per OU-2048 plaintext instead
  of 5, and OU's encryption cost grows with the plaintext width), and :func:`lift_narrow` brings
  the k-bit shares back to Z_2^64 with one ``ltz`` of width k + 1 per bucket-sum value
  (data-size independent: 2 x K x columns per level).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.boost.errors import BoostProtocolError
from veil.boost.messages import CiphertextBatch, Opening, expect_stage
from veil.crypto.mpc import MPC
from veil.crypto.mpc_ring import ring_matmul
from veil.crypto.onehot import OneHotProduct, OneHotSums
from veil.crypto.random import random_int_array
from veil.crypto.sharing import AShare

__all__ = [
    "HEAggregator",
    "OneHotAggregator",
    "OneHotSums",
    "SSAggregator",
    "build_onehot_aggs",
    "he_slot_layout",
    "level_sums",
    "lift_narrow",
    "onehot_bucket_sums",
    "sum_bound_bits",
]

U64 = npt.NDArray[np.uint64]
I32 = npt.NDArray[np.int32]

_CHUNK = 1 << 22
STAT_BITS = 40


def sum_bound_bits(objective: str, frac_bits: int, n_rows: int) -> int | None:
    """``k`` with ``|every bucket sum of g or h| < 2^(k-1)``, when the objective bounds them
    publicly: logistic ``|g| <= 1`` (+ the sigmoid's error), ``0 <= h <= 1/4``, so a sum over at
    most n rows is below ``2^(f + 1 + ceil(log2 n))``. None (no bound) for regression."""
    if objective != "binary:logistic":
        return None
    return frac_bits + 2 + max(1, math.ceil(math.log2(max(n_rows, 2))))


def he_slot_layout(n_rows: int, plaintext_bits: int, bound_bits: int | None) -> tuple[int, int, int]:
    """``(ring, slot_bits, slots)`` of :class:`HEAggregator`'s packing: a slot holds the sum of n
    shares in Z_2^ring plus the owner's sum (``ring + 1 + ceil(log2 n)`` bits) and a mask
    STAT_BITS wider; the narrowed ring ``bound_bits`` is used only where it buys more slots."""
    log_n = max(1, math.ceil(math.log2(max(n_rows, 2))))

    def slot_bits(ring: int) -> int:
        return ring + 1 + log_n + STAT_BITS + 1

    ring = 64
    if bound_bits is not None and 2 <= bound_bits <= 61:
        if (plaintext_bits - 1) // slot_bits(bound_bits) > (plaintext_bits - 1) // slot_bits(64):
            ring = bound_bits
    return ring, slot_bits(ring), max(1, (plaintext_bits - 1) // slot_bits(ring))


def onehot_bucket_sums(bins: I32, n_bins: int, x: U64) -> U64:
    """``M^T x mod 2^64`` for the one-hot matrix of ``bins`` (n, F) and ``x`` (n, c)."""
    return OneHotSums(bins, n_bins)(x)


def _dense_onehot(bins: I32, n_bins: int) -> U64:
    n, feats = bins.shape
    m = np.zeros((n, feats * n_bins), dtype=np.uint64)
    rows = np.arange(n)
    for f in range(feats):
        m[rows, f * n_bins + bins[:, f]] = 1
    return m


class _Timed:
    """Accumulates seconds per category (he, triples, network...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.he_ops = 0

    def add(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt


class _Aggregator:
    """What both aggregators share: the feature owner ``holder``, its bins (owner only, with a
    precomputed :class:`OneHotSums`), sizes, the stage prefix and the timing sink. ``keys`` =
    (this party's HE key pair, the peer's public key) and ``bound_bits`` are only used by
    :class:`HEAggregator`."""

    def __init__(
        self,
        mpc: MPC,
        holder: int,
        bins: I32 | None,
        n_rows: int,
        n_features: int,
        n_bins: int,
        stage: str,
        timing: _Timed,
        keys: tuple[Any, Any] = (None, None),
        *,
        bound_bits: int | None = None,
    ) -> None:
        self.mpc = mpc
        self.bound_bits = bound_bits
        self.holder = holder
        self.n = n_rows
        self.n_features = n_features
        self.k = n_features * n_bins
        self.n_bins = n_bins
        self.stage = stage
        self.timing = timing
        self.bins = bins
        self.summer = OneHotSums(bins, n_bins) if bins is not None else None
        self.my_keys, self.peer_pk = keys
        self._setup()

    def _setup(self) -> None:
        """Per-algorithm set-up (runs at the end of ``__init__``)."""

    def _own_sums(self, x: U64) -> U64:
        if self.summer is None:
            raise BoostProtocolError("feature owner has no bins")
        return self.summer(x)


class SSAggregator(_Aggregator):
    """``ss-agg`` bucket sums for one feature owner (see module docstring)."""

    def _setup(self) -> None:
        mpc, holder, bins, n_bins, stage = self.mpc, self.holder, self.bins, self.n_bins, self.stage
        self._et: U64 | None = None
        if self.k == 0:
            return
        t0 = time.perf_counter()
        self.ctx, a = mpc.triples.matrix_mask(self.n, self.k, holder)
        self.timing.add("triples", time.perf_counter() - t0)
        ch = mpc.channel
        if mpc.party == holder:
            if bins is None or a is None:
                raise BoostProtocolError("feature owner has no bins or no mask")
            e = (_dense_onehot(bins, n_bins) - a).ravel()
            for start in range(0, e.size, _CHUNK):
                ch.send(Opening(f"{stage}/E", [e[start : start + _CHUNK]]))
        else:
            parts: list[U64] = []
            got = 0
            while got < self.n * self.k:
                msg = ch.recv(Opening)
                expect_stage(msg.stage, f"{stage}/E")
                if len(msg.values) != 1 or msg.values[0].dtype != np.uint64 or msg.values[0].ndim != 1:
                    raise BoostProtocolError("malformed masked bucket matrix")
                parts.append(msg.values[0])
                got += msg.values[0].size
            if got != self.n * self.k:
                raise BoostProtocolError("masked bucket matrix has the wrong size")
            self._et = np.ascontiguousarray(np.concatenate(parts).reshape(self.n, self.k).T)
        self._b: U64 | None = None
        self._c: U64 | None = None
        self._z: U64 | None = None
        self._used = 0

    def new_tree(self, columns: int, stage: str) -> None:
        """Fetch the vector correlation for all ``columns`` bucket-sum columns of one tree.

        ``B`` is data-independent, so the non-owner's dense ``E^T B`` is computed here once per
        tree (one big product instead of one per level).
        """
        self.stage = stage
        self._used = 0
        if self.k == 0:
            return
        t0 = time.perf_counter()
        self._b, self._c = self.mpc.triples.matrix_vector_triple(self.ctx, columns)
        self.timing.add("triples", time.perf_counter() - t0)
        if self.mpc.party != self.holder:
            if self._b is None or self._et is None:
                raise BoostProtocolError("bucket-sum correlation missing")
            self._z = ring_matmul(self._et, self._b) + self._c

    def sums(self, v: AShare) -> AShare:
        """Shares of ``M^T v`` for shared ``v`` (n, c); result (F * n_bins, c), same scale."""
        mpc = self.mpc
        c = v.shape[1]
        if self.k == 0:
            return AShare(np.zeros((0, c), np.uint64), mpc.party, v.frac_bits)
        if self._c is None or self._used + c > self._c.shape[1]:
            raise BoostProtocolError("bucket-sum correlation exhausted (call new_tree first)")
        cols = slice(self._used, self._used + c)
        self._used += c
        ch = mpc.channel
        if mpc.party == self.holder:
            msg = ch.recv(Opening)
            expect_stage(msg.stage, f"{self.stage}/F{cols.start}")
            f = msg.values[0] if len(msg.values) == 1 else None
            if f is None or f.dtype != np.uint64 or f.shape != (self.n, c) or self.bins is None:
                raise BoostProtocolError("malformed masked vector in bucket sums")
            z = self._own_sums(v.values + f) + self._c[:, cols]
        else:
            if self._b is None or self._z is None:
                raise BoostProtocolError("bucket-sum correlation missing")
            ch.send(
                Opening(f"{self.stage}/F{cols.start}", [np.ascontiguousarray(v.values - self._b[:, cols])])
            )
            z = self._z[:, cols]
        return AShare(np.ascontiguousarray(z), mpc.party, v.frac_bits)


class OneHotAggregator(_Aggregator):
    """``ss-agg`` bucket sums without a dealer (see :mod:`veil.crypto.onehot`).

    The dealer's masked-matrix correlation has no affordable dealer-free construction (a
    Beaver matrix triple of ``n x F n_bins`` by ``n x c`` needs Gilboa OTs for every entry), so
    dealer-free ``ss-agg`` uses the one-hot structure of the owner's bucket matrix instead: one
    punctured PRF per (row, feature), set up once with ``ceil(log2 n_bins)`` OTs, then one
    message of ``n x F x c`` masked values per level and direction. Both holders' aggregators
    share one :class:`~veil.crypto.onehot.OneHotProduct` (``shared``, which also holds the
    owner's bins), and one exchange per level gives both holders' sums (:meth:`both`).
    """

    def __init__(
        self, mpc: MPC, holder: int, shared: OneHotProduct, n_rows: int, n_features: int, n_bins: int,
        stage: str, timing: _Timed,
    ) -> None:
        self.shared = shared
        super().__init__(mpc, holder, None, n_rows, n_features, n_bins, stage, timing)

    def new_tree(self, columns: int, stage: str) -> None:
        """Nothing to prepare per tree (the PRF keys are set up once)."""
        self.stage = stage

    def both(self, v: AShare) -> list[AShare]:
        """Both holders' bucket sums of ``v`` (one exchange): ``[holder 0's, holder 1's]``."""
        t0 = time.perf_counter()
        s0, s1 = self.shared.sums(v.values)
        self.timing.add("onehot", time.perf_counter() - t0)
        return [AShare(s0, self.mpc.party, v.frac_bits), AShare(s1, self.mpc.party, v.frac_bits)]

    def sums(self, v: AShare) -> AShare:
        """Shares of ``M^T v`` for this holder (both holders' sums are computed: :func:`level_sums`
        gets both from one call)."""
        return self.both(v)[self.holder]


def build_onehot_aggs(
    mpc: MPC, party: int, bins: I32, n_rows: int, n_features: tuple[int, int], n_bins: int, stage: str,
    timing: _Timed,
) -> list[OneHotAggregator]:
    """Dealer-free ``ss-agg``: both holders' aggregators over one set-up (the OT engine of the
    dealer-free triple source ``mpc.triples``)."""
    engine = getattr(mpc.triples, "ot_engine", None)
    if engine is None:
        raise BoostProtocolError("dealer-free ss-agg needs a triple source with an OT engine")
    t0 = time.perf_counter()
    shared = OneHotProduct(engine(), party, bins, n_rows, n_features, n_bins)
    timing.add("onehot", time.perf_counter() - t0)
    return [
        OneHotAggregator(mpc, holder, shared, n_rows, n_features[holder], n_bins, stage, timing)
        for holder in (0, 1)
    ]


class HEAggregator(_Aggregator):
    """``he-agg`` bucket sums for one feature owner (see module docstring).

    ``my_keys`` is this party's key pair (used when it is the non-owner), ``peer_pk`` the
    peer's public key (used when this party owns the features).
    """

    def _setup(self) -> None:
        self.calls = 0
        pk = self.peer_pk if self.mpc.party == self.holder else self.my_keys.public
        # narrowed ring Z_2^k where a public bound allows it (see module docstring)
        layout = he_slot_layout(self.n, int(pk.plaintext_bits), self.bound_bits)
        self.ring, self.slot_bits, self.slots = layout
        self._ring_mask = np.uint64((1 << self.ring) - 1) if self.ring < 64 else np.uint64(2**64 - 1)

    def new_tree(self, columns: int, stage: str) -> None:
        """Nothing to prepare per tree (keys are set up once)."""
        self.stage = stage

    def _pack(self, vals: U64) -> list[int]:
        """Rows of ``vals`` (r, c) -> r * ceil(c / slots) packed ints (row-major)."""
        r, c = vals.shape
        per = math.ceil(c / self.slots)
        pad = per * self.slots - c
        if pad:
            vals = np.concatenate([vals, np.zeros((r, pad), np.uint64)], axis=1)
        grouped = vals.reshape(r * per, self.slots)
        out = [0] * (r * per)
        cols = [grouped[:, s].tolist() for s in range(self.slots)]
        sb = self.slot_bits
        for s in range(self.slots - 1, -1, -1):
            col = cols[s]
            out = [(o << sb) | v for o, v in zip(out, col, strict=True)]
        return out

    def _unpack(self, ints: list[int], rows: int, c: int) -> U64:
        per = math.ceil(c / self.slots)
        mask = (1 << self.slot_bits) - 1
        m64 = (1 << 64) - 1
        out = np.empty((rows * per, self.slots), dtype=np.uint64)
        for s in range(self.slots):
            sh = s * self.slot_bits
            out[:, s] = np.array([((v >> sh) & mask) & m64 for v in ints], dtype=np.uint64)
        return out.reshape(rows, per * self.slots)[:, :c]

    def sums(self, v: AShare) -> AShare:
        """Shares of ``M^T v`` (one direction; :func:`level_sums` runs both at once)."""
        if self.mpc.party != self.holder:
            self.send_share(v)
            out = self.receive_sums(v)
        else:
            out = self.answer(v)
        return lift_narrow(self.mpc, [out], [self.ring])[0]

    def _begin(self, v: AShare) -> tuple[str, int] | None:
        """Next call's stage and ciphertexts per row; None when the owner has no features."""
        if self.k == 0:
            return None
        self.calls += 1
        return f"{self.stage}/{self.calls}", math.ceil(v.shape[1] / self.slots)

    def send_share(self, v: AShare) -> None:
        """Non-owner, step 1: encrypt this party's share of ``v`` (packed) and send it."""
        st = self._begin(v)
        if st is None:
            return
        t0 = time.perf_counter()
        ct = self.my_keys.public.encrypt(self._pack(v.values & self._ring_mask))
        data = ct.to_bytes()
        self.timing.add("he", time.perf_counter() - t0)
        self.timing.he_ops += len(ct)
        self.mpc.channel.send(CiphertextBatch(f"{st[0]}/enc", data, len(ct)))

    def receive_sums(self, v: AShare) -> AShare:
        """Non-owner, step 2: decrypt the masked bucket sums; keeps ``sum + r mod 2^64``."""
        c, k = v.shape[1], self.k
        if k == 0:
            return AShare(np.zeros((0, c), np.uint64), self.mpc.party, v.frac_bits)
        from veil.crypto.he.base import CiphertextArray

        per = math.ceil(c / self.slots)
        msg = self.mpc.channel.recv(CiphertextBatch)
        expect_stage(msg.stage, f"{self.stage}/{self.calls}/sums")
        t0 = time.perf_counter()
        back = CiphertextArray.from_bytes(self.my_keys.public, msg.data)
        if len(back) != k * per:
            raise BoostProtocolError(f"expected {k * per} bucket-sum ciphertexts, got {len(back)}")
        ints = self.my_keys.secret.decrypt(back)
        bound = 1 << (self.slots * self.slot_bits)
        if any(x < 0 or x >= bound for x in ints):
            raise BoostProtocolError("decrypted bucket sum out of range")
        self.timing.add("he", time.perf_counter() - t0)
        self.timing.he_ops += len(back)
        got = self._unpack(ints, k, c) & self._ring_mask
        return AShare(np.ascontiguousarray(got), self.mpc.party, v.frac_bits)

    def answer(self, v: AShare) -> AShare:
        """Owner: bucket-sum the peer's ciphertexts, add its own share's sums and a mask, reply."""
        c, k = v.shape[1], self.k
        st = self._begin(v)
        if st is None:
            return AShare(np.zeros((0, c), np.uint64), self.mpc.party, v.frac_bits)
        stage, per = st
        from veil.crypto.he.base import CiphertextArray

        if self.bins is None:
            raise BoostProtocolError("feature owner has no bins")
        msg = self.mpc.channel.recv(CiphertextBatch)
        expect_stage(msg.stage, f"{stage}/enc")
        t0 = time.perf_counter()
        ct = CiphertextArray.from_bytes(self.peer_pk, msg.data)
        if len(ct) != self.n * per:
            raise BoostProtocolError(f"expected {self.n * per} ciphertexts, got {len(ct)}")
        # the owner's own share is added after aggregation: sum(x_own) per bucket in plaintext
        # (K plaintext additions instead of n)
        cols = []
        for j in range(per):
            cols.append(ct[np.arange(j, self.n * per, per)].bucket_sums(self.bins, self.n_bins))
        # interleave back to (k, per) row-major
        joined = CiphertextArray.concat(cols)
        order = np.arange(k * per).reshape(per, k).T.ravel()
        summed = joined[order]
        own = self._own_sums(v.values) & self._ring_mask  # (k, c)
        pad = per * self.slots - c
        if pad:
            own = np.concatenate([own, np.zeros((k, pad), np.uint64)], axis=1)
        own_flat = own.reshape(k * per * self.slots).tolist()
        r = random_int_array(k * per * self.slots, self.slot_bits - 1)
        rr = np.array([x & ((1 << 64) - 1) for x in r], dtype=np.uint64).reshape(k * per, self.slots)
        masks = self._pack_ints([a + b for a, b in zip(own_flat, r, strict=True)], k * per)
        out = (summed + masks).rerandomize()
        self.timing.add("he", time.perf_counter() - t0)
        self.timing.he_ops += len(ct) * self.n_features + 2 * len(out)
        self.mpc.channel.send(CiphertextBatch(f"{stage}/sums", out.to_bytes(), len(out)))
        z = (np.zeros_like(rr) - rr).reshape(k, per * self.slots)[:, :c]
        if self.ring < 64:  # shares of S + 2^(ring-1) mod 2^ring (lift_narrow expects the offset)
            z = (z + np.uint64(1 << (self.ring - 1))) & self._ring_mask
        return AShare(np.ascontiguousarray(z), self.mpc.party, v.frac_bits)

    def _pack_ints(self, r: list[int], count: int) -> list[int]:
        out = []
        sb = self.slot_bits
        for i in range(count):
            acc = 0
            for s in range(self.slots - 1, -1, -1):
                acc = (acc << sb) | r[i * self.slots + s]
            out.append(acc)
        return out


def level_sums(aggs: list[Any], v: AShare) -> list[AShare]:
    """Bucket sums of ``v`` over both parties' features: ``[holder 0's, holder 1's]``.

    For ``he-agg`` both directions run at once (each party encrypts its share for the peer's
    features while the peer does the same, then each answers as owner, then each decrypts), so
    the two parties' HE work overlaps instead of taking turns.
    """
    if isinstance(aggs[0], OneHotAggregator):
        return aggs[0].both(v)
    if not all(isinstance(a, HEAggregator) for a in aggs):
        return [agg.sums(v) for agg in aggs]
    party = aggs[0].mpc.party
    mine, theirs = aggs[party], aggs[1 - party]
    theirs.send_share(v)
    own = mine.answer(v)
    other = theirs.receive_sums(v)
    sums = [own, other] if party == 0 else [other, own]
    return lift_narrow(aggs[0].mpc, sums, [a.ring for a in aggs])


def lift_narrow(mpc: MPC, sums: list[AShare], rings: list[int]) -> list[AShare]:
    """Shares in Z_2^64 of bucket sums that :class:`HEAggregator` returned in a narrowed ring.

    For ``ring = k < 64`` the two shares ``a, b`` lie in ``[0, 2^k)`` with ``a + b = S + 2^(k-1)
    + w 2^k`` (the owner added the offset; ``|S| < 2^(k-1)`` is the caller's public bound), so
    ``S = a + b - 2^(k-1) - 2^k + 2^k [a + b - 2^k < 0]``: one ``ltz`` of width ``k + 1`` per
    value, all sums of the call in one batch. Sums already in Z_2^64 pass through.
    """
    todo = [i for i, r in enumerate(rings) if r < 64 and sums[i].values.size]
    if not todo:
        return sums
    flat = np.concatenate([sums[i].values.ravel() for i in todo])
    ks = np.concatenate([np.full(sums[i].values.size, rings[i], dtype=np.uint64) for i in todo])
    x = AShare(flat, mpc.party, 0)
    two_k = np.uint64(1) << ks
    lt = mpc.ltz(x - two_k, bits=int(max(rings[i] for i in todo)) + 1)
    lifted = (x - (two_k >> np.uint64(1)) - two_k).values + (lt.values << ks)
    out = list(sums)
    pos = 0
    for i in todo:
        size = sums[i].values.size
        out[i] = AShare(lifted[pos : pos + size].reshape(sums[i].shape), mpc.party, sums[i].frac_bits)
        pos += size
    return out
