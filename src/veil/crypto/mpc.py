"""Two-party secure computation over additive shares in Z_2^64 with fixed point.

One :class:`MPC` object is one party's view. Every operation is vectorised over numpy arrays and
batched: an operation on N elements costs the same number of rounds as on one element. The
communication primitive is :meth:`MPC.exchange` (both parties send one :class:`MpcOpen` frame,
then receive the peer's), counted by the channel's ``stats.rounds``.

Protocols (semi-honest, see docs/protocols/mpc.md for the cost table and error bounds):

* ``mul``: Beaver triples; fixed-point results are truncated with :meth:`MPC.trunc`.
* ``trunc``: exact up to one ulp (result is ``floor(x / 2^s)`` or one less) for any
  ``|x| < 2^62``: add ``2^62`` so the value is non-negative, each party shifts its own share
  and the wrap-around bit ``w = msb(x0') OR msb(x1')`` is removed with one Beaver product
  (1 round). No probabilistic large errors (unlike SecureML's local truncation).
* ``ltz``: with ``y = x + 2^l`` (``|x| < 2^l``, l = 63 by default), ``x < 0`` iff bit l of y is
  0; bit l = both shares' bit l XOR the carry of ``low_l(y0) + low_l(y1)`` (a millionaires'
  circuit on XOR-shared bit planes, Kogge-Stone reduction, boolean AND triples), then
  bit-to-arithmetic with one Beaver product: 8 rounds and 181 AND gates/element for l = 63
  (112 for l = 40).
* ``argmax``: tournament of ``ltz`` + ``select``, log2(m) levels, shared one-hot + max.
* ``reciprocal`` / ``div``: bit-length normalisation into [0.5, 1) with one batch of
  comparisons against the powers of two in ``[lo, hi)``, linear initial guess, 3 Newton steps.
* ``sigmoid``: ``1 / (1 + exp(-|x|))`` with ``exp`` by 12 squarings of ``1 - |x|/4096`` at 30
  fractional bits, reciprocal by Newton, sign restored with one select; ``|x|`` clamped at 32.
* :class:`PublicMatrix`: ``M^T X`` where one party holds ``M`` in plaintext; ``E = M - A`` is
  sent once, each product costs one one-way message and local products.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.comm import Channel, Message
from veil.crypto.encoding import FixedPoint, as_u64
from veil.crypto.mpc_ring import U8, U64, RingMatrix, ring_matmul
from veil.crypto.random import random_u64
from veil.crypto.sharing import AShare
from veil.crypto.triples import TripleSource
from veil.errors import ConfigError, InputError, ProtocolError

__all__ = ["MPC", "MpcOpen", "OneHotMatrix", "PublicMatrix"]

log = logging.getLogger("veil.crypto")

_ONE = np.uint64(1)
_S63 = np.uint64(63)
_EXP_SQUARINGS = 5
_SIGMOID_CLAMP = 32
_RECIP_CUBIC = (5.6567629873717555, -11.75708106858929, 10.64787137779821, -3.5492886683201412)


class MpcOpen(Message, frozen=True):
    """One frame of an MPC exchange; ``seq`` must match on both sides (stage check)."""

    seq: int
    arrays: list[np.ndarray]


_I64 = npt.NDArray[np.int64]


class OneHotMatrix:
    """A plaintext 0/1 matrix with one 1 per row per feature: ``bins`` (n, F) in [0, n_bins).

    Column ``f * n_bins + b`` is 1 for the rows whose feature ``f`` falls in bin ``b``
    (feature-major, like ``CiphertextArray.bucket_sums``). A bin index of ``-1`` means "no bin"
    (e.g. a missing value): the row contributes to no column of that feature.
    """

    def __init__(self, bins: Any, n_bins: int) -> None:
        b = np.asarray(bins)
        if b.ndim == 1:
            b = b[:, None]
        if b.ndim != 2 or not np.issubdtype(b.dtype, np.integer):
            raise InputError("OneHotMatrix needs integer bin indices of shape (n,) or (n, F)")
        if n_bins <= 0 or (b.size and (int(b.max()) >= n_bins or int(b.min()) < -1)):
            raise InputError(f"bin indices must lie in [-1, {n_bins})")
        self.bins = b.astype(np.int64)
        self.n_bins = int(n_bins)
        self._sorted: list[tuple[_I64, _I64, _I64]] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.bins.shape[0]), int(self.bins.shape[1]) * self.n_bins)

    def to_dense(self) -> U64:
        n, k = self.shape
        out = np.zeros((n, k), dtype=np.uint64)
        rows = np.arange(n)
        for f in range(self.bins.shape[1]):
            ok = self.bins[:, f] >= 0
            out[rows[ok], f * self.n_bins + self.bins[ok, f]] = 1
        return out

    def t_matmul(self, x: U64) -> U64:
        """``M^T x mod 2^64`` for x of shape (n,) or (n, c), by sparse bucket sums (rows sorted
        by bin once per feature, then ``np.add.reduceat``)."""
        vec = x.ndim == 1
        xx = x[:, None] if vec else x
        k = self.shape[1]
        c = xx.shape[1]
        out = np.zeros((k, c), dtype=np.uint64)
        if self._sorted is None:
            self._sorted = []
            for f in range(self.bins.shape[1]):
                col = self.bins[:, f]
                order = np.argsort(col, kind="stable")
                order = order[col[order] >= 0]
                sb = col[order]
                present, starts = np.unique(sb, return_index=True)
                self._sorted.append((order, present, starts))
        for f, (order, present, starts) in enumerate(self._sorted):
            if order.size == 0:
                continue
            sums = np.add.reduceat(xx[order], starts, axis=0, dtype=np.uint64)
            out[f * self.n_bins + present] = sums
        return out[:, 0] if vec else out


class MPC:
    """One party's side of a 2-party computation over ``channel``."""

    def __init__(
        self,
        channel: Channel,
        party: int,
        triples: TripleSource,
        fxp: FixedPoint | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        if party not in (0, 1):
            raise ConfigError(f"party must be 0 or 1, got {party!r}")
        if getattr(triples, "party", party) != party:
            raise ConfigError("the triple source belongs to the other party")
        self.channel = channel
        self.party = party
        self.triples = triples
        self.fxp = fxp or FixedPoint(20)
        self.frac = self.fxp.frac_bits
        self.timeout = timeout
        self._seq = 0
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"mul": 0, "ltz": 0, "and_gates": 0, "trunc": 0}

    # ------------------------------------------------------------------ communication
    def _next_seq(self) -> int:
        with self._lock:
            s = self._seq
            self._seq += 1
        return s

    def _send(self, arrays: Sequence[np.ndarray]) -> None:
        self.channel.send(MpcOpen(self._next_seq(), [_contig(a) for a in arrays]))

    def _recv(self, count: int) -> list[np.ndarray]:
        seq = self._next_seq()
        msg = self.channel.recv(MpcOpen, timeout=self.timeout)
        if msg.seq != seq:
            raise ProtocolError(f"MPC stage mismatch: peer sent step {msg.seq}, expected {seq}")
        if len(msg.arrays) != count:
            raise ProtocolError(f"MPC step {seq}: expected {count} arrays, got {len(msg.arrays)}")
        return list(msg.arrays)

    def exchange(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Send ``arrays`` and receive the peer's arrays of the same shapes and dtypes (1 round)."""
        seq = self._next_seq()
        self.channel.send(MpcOpen(seq, [_contig(a) for a in arrays]))
        msg = self.channel.recv(MpcOpen, timeout=self.timeout)
        if msg.seq != seq:
            raise ProtocolError(f"MPC stage mismatch: peer sent step {msg.seq}, expected {seq}")
        if len(msg.arrays) != len(arrays):
            raise ProtocolError(f"MPC step {seq}: expected {len(arrays)} arrays, got {len(msg.arrays)}")
        out = []
        for mine, theirs in zip(arrays, msg.arrays, strict=True):
            if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
                raise ProtocolError(
                    f"MPC step {seq}: peer array {theirs.dtype}{theirs.shape} does not match "
                    f"{mine.dtype}{mine.shape}"
                )
            out.append(theirs)
        return out

    def open(self, xs: Sequence[AShare]) -> list[U64]:
        """Reconstruct several shared values in one round (both parties learn them)."""
        theirs = self.exchange([x.values for x in xs])
        return [x.values + t for x, t in zip(xs, theirs, strict=True)]

    # ------------------------------------------------------------------ sharing / reveal
    def share(
        self, x: Any | None, owner: int, shape: tuple[int, ...] | None = None, frac_bits: int | None = None
    ) -> AShare:
        """Secret-share ``owner``'s ring elements (uint64) ``x``; the other party passes ``shape``.

        If ``x`` is a float array it is fixed-point encoded first (frac = ``fxp.frac_bits``).
        """
        frac = self.frac if frac_bits is None else frac_bits
        if self.party == owner:
            if x is None:
                raise InputError("the owner must provide the value to share")
            arr = np.asarray(x)
            if np.issubdtype(arr.dtype, np.floating):
                vals = FixedPoint(frac).encode(arr)
            else:
                vals = as_u64(arr)
            r = random_u64(vals.shape)
            self._send([vals - r])
            return AShare(r, self.party, frac)
        if shape is None:
            raise InputError("the non-owner must pass the shape of the shared value")
        (v,) = self._recv(1)
        if v.dtype != np.uint64 or tuple(v.shape) != tuple(shape):
            raise ProtocolError(f"shared value has {v.dtype}{v.shape}, expected uint64{tuple(shape)}")
        return AShare(v, self.party, frac)

    def reveal(self, x: AShare, to: int | None = None) -> U64 | None:
        """Reconstruct ``x`` (uint64) for ``to`` (a party) or both (``None``)."""
        if to is None:
            return self.open([x])[0]
        if to not in (0, 1):
            raise InputError(f"reveal: 'to' must be 0, 1 or None, got {to!r}")
        if self.party == to:
            (v,) = self._recv(1)
            if v.shape != x.values.shape or v.dtype != np.uint64:
                raise ProtocolError("reveal: peer share has the wrong shape")
            return x.values + v
        self._send([x.values])
        return None

    def reveal_float(self, x: AShare, to: int | None = None) -> npt.NDArray[np.float64] | None:
        v = self.reveal(x, to)
        return None if v is None else FixedPoint(x.frac_bits).decode(v)

    # ------------------------------------------------------------------ local helpers
    def public(self, value: Any, frac_bits: int | None = None) -> AShare:
        """A public constant as a (trivial) share; floats are encoded with ``frac_bits``."""
        frac = self.frac if frac_bits is None else frac_bits
        arr = np.asarray(value)
        vals = FixedPoint(frac).encode(arr) if np.issubdtype(arr.dtype, np.floating) else as_u64(arr)
        return AShare.from_public(vals, self.party, frac)

    def mul_public(self, x: AShare, k: Any) -> AShare:
        """``x * k`` for a public float/array ``k`` (fixed point, truncated) — 1 round for
        truncation; for an integer ``k`` use ``x * k`` (local, no truncation)."""
        arr = np.asarray(k)
        if not np.issubdtype(arr.dtype, np.floating):
            return x * as_u64(arr)
        enc = self.fxp.encode(arr)
        prod = AShare(
            np.broadcast_to(x.values, np.broadcast_shapes(x.shape, enc.shape)) * enc,
            self.party,
            x.frac_bits + self.frac,
        )
        return self.trunc(prod, self.frac)

    def _bit(self, values: U64) -> AShare:
        return AShare(values, self.party, 0)

    # ------------------------------------------------------------------ multiplication
    def mul(self, x: AShare, y: AShare, *, out_frac: int | None = None) -> AShare:
        """Elementwise product (broadcasting) of two shared values (Beaver; 1 round, +1 round if
        the fixed-point scale has to be truncated back to ``out_frac`` (default ``fxp.frac_bits``))."""
        return self.mul_many([(x, y)], out_frac=out_frac)[0]

    def mul_many(
        self, pairs: Sequence[tuple[AShare, AShare]], *, out_frac: int | None = None
    ) -> list[AShare]:
        """Several independent products in one round (plus one shared truncation round)."""
        if not pairs:
            return []
        xs, ys, shapes = [], [], []
        for x, y in pairs:
            if not isinstance(x, AShare) or not isinstance(y, AShare):
                raise InputError("mul needs two AShare operands (use mul_public for constants)")
            shp = np.broadcast_shapes(x.shape, y.shape)
            xs.append(np.broadcast_to(x.values, shp).ravel())
            ys.append(np.broadcast_to(y.values, shp).ravel())
            shapes.append(shp)
        xv, yv = np.concatenate(xs), np.concatenate(ys)
        a, b, c = self.triples.beaver(xv.shape)
        e_mine, f_mine = xv - a, yv - b
        e_t, f_t = self.exchange([e_mine, f_mine])
        e, f = e_mine + e_t, f_mine + f_t
        z = c + e * b + f * a
        if self.party == 0:
            z += e * f
        self.counters["mul"] += int(xv.size)
        out: list[AShare] = []
        pos = 0
        to_trunc: list[tuple[int, int]] = []
        for i, ((x, y), shp) in enumerate(zip(pairs, shapes, strict=True)):
            cnt = int(np.prod(shp, dtype=np.int64))
            frac = x.frac_bits + y.frac_bits
            out.append(AShare(z[pos : pos + cnt].reshape(shp), self.party, frac))
            pos += cnt
            target = self.frac if out_frac is None else out_frac
            if frac > target:
                to_trunc.append((i, frac - target))
        if to_trunc:
            truncated = self.trunc_many([(out[i], s) for i, s in to_trunc])
            for (i, _), t in zip(to_trunc, truncated, strict=True):
                out[i] = t
        return out

    def _online(self, name: str) -> Any:
        """The triple source's online OT protocol ``name`` if it offers (and enables) one."""
        if not getattr(self.triples, "online_ot", False):
            return None
        return getattr(self.triples, name, None)

    def mul_bits(self, pairs: Sequence[tuple[AShare, AShare]]) -> list[AShare]:
        """Products ``bit * x`` where each ``bit`` is a shared 0/1 value (frac 0, e.g. from
        :meth:`ltz`, or an indicator), all in one batch; results keep ``x``'s scale (no
        truncation). With a triple source offering ``bit_mul`` (dealer-free OT) this costs one
        OT per element and direction instead of a Beaver triple; otherwise it is :meth:`mul_many`.
        The caller promises the bits are 0/1 (anything else gives a wrong result)."""
        if not pairs:
            return []
        direct = self._online("bit_mul")
        if direct is None:
            return self.mul_many(pairs)
        bs, xs, shapes = [], [], []
        for b, x in pairs:
            if not isinstance(b, AShare) or not isinstance(x, AShare):
                raise InputError("mul_bits needs AShare operands")
            if b.frac_bits != 0:
                raise InputError("mul_bits: the bit operand must have frac_bits 0")
            shp = np.broadcast_shapes(b.shape, x.shape)
            bs.append(np.broadcast_to(b.values, shp).ravel())
            xs.append(np.broadcast_to(x.values, shp).ravel())
            shapes.append(shp)
        z: U64 = direct(np.concatenate(bs), np.concatenate(xs))
        self.counters["mul"] += int(z.size)
        out, pos = [], 0
        for (_, x), shp in zip(pairs, shapes, strict=True):
            cnt = int(np.prod(shp, dtype=np.int64))
            out.append(AShare(z[pos:pos + cnt].reshape(shp), self.party, x.frac_bits))
            pos += cnt
        return out

    def square(self, x: AShare, *, out_frac: int | None = None) -> AShare:
        """``x * x`` (truncated to ``out_frac``). Dealer-free with online OT:
        ``x0^2 + x1^2 + 2 x0 x1`` with the cross term by :meth:`cross_product` (64 OTs per
        element instead of a Beaver triple's 128); otherwise a Beaver product."""
        direct = self._online("cross_product")
        if direct is None:
            return self.mul(x, x, out_frac=out_frac)
        cross: U64 = direct(x.values)
        z = x.values * x.values + (cross << _ONE)
        self.counters["mul"] += int(x.size)
        res = AShare(z, self.party, 2 * x.frac_bits)
        target = self.frac if out_frac is None else out_frac
        return self.trunc(res, res.frac_bits - target) if res.frac_bits > target else res

    def bits_matvec(self, ind: AShare, w: AShare) -> AShare:
        """``ind @ w`` for a shared 0/1 matrix ``ind`` (n, L; frac 0) and a shared vector ``w`` (L,),
        e.g. leaf indicators times leaf weights; the result keeps ``w``'s scale.

        With online OT (dealer-free) it is one bit x value product per element (:meth:`mul_bits`,
        one OT per element and direction) and a local row sum: a matrix triple by Gilboa OTs
        would move 64 L correction vectors of n ring elements each way (819 MB at n = 50,000,
        L = 32; over the 1 GiB message limit at L = 320). With a dealer, :meth:`matmul`.
        """
        if ind.ndim != 2 or w.ndim != 1 or ind.shape[1] != w.shape[0]:
            raise InputError(f"bits_matvec: shapes {ind.shape} @ {w.shape} do not match")
        if self._online("bit_mul") is None:
            return self.matmul(ind, w)
        wide = AShare(np.broadcast_to(w.values, ind.shape), self.party, w.frac_bits)
        (prod,) = self.mul_bits([(ind, wide)])
        return AShare(prod.values.sum(axis=1, dtype=np.uint64), self.party, w.frac_bits)

    def matmul(self, x: AShare, y: AShare, *, out_frac: int | None = None) -> AShare:
        """Shared matrix product ``x @ y`` (2-D; 1-D ``y`` allowed) with a matrix triple."""
        xv = x.values
        yv = y.values[:, None] if y.ndim == 1 else y.values
        if xv.ndim != 2 or xv.shape[1] != yv.shape[0]:
            raise InputError(f"matmul: shapes {x.shape} and {y.shape} do not align")
        m, k = xv.shape
        n = yv.shape[1]
        a, b, c = self.triples.matmul_triple(m, k, n)
        e_t, f_t = self.exchange([xv - a, yv - b])
        e, f = xv - a + e_t, yv - b + f_t
        z = c + ring_matmul(e, b) + ring_matmul(a, f)
        if self.party == 0:
            z += ring_matmul(e, f)
        if y.ndim == 1:
            z = z[:, 0]
        res = AShare(z, self.party, x.frac_bits + y.frac_bits)
        target = self.frac if out_frac is None else out_frac
        if res.frac_bits > target:
            res = self.trunc(res, res.frac_bits - target)
        return res

    def public_matrix(
        self,
        matrix: Any | None,
        holder: int,
        shape: tuple[int, int] | None = None,
        *,
        cache_limbs: bool | None = None,
    ) -> PublicMatrix:
        """Prepare products ``M^T X`` with ``M`` (n, k) held in plaintext by ``holder``.

        ``matrix`` is a uint64/int array or a :class:`OneHotMatrix` (holder only); the other party
        passes ``shape``. Sends the masked matrix ``E = M - A`` once; see :class:`PublicMatrix`.
        """
        return PublicMatrix(self, matrix, holder, shape, cache_limbs)

    # ------------------------------------------------------------------ truncation
    def trunc(self, x: AShare, bits: int | None = None) -> AShare:
        """Arithmetic shift right by ``bits`` (default: down to ``fxp.frac_bits``); exact up to
        -1 ulp for ``|x| < 2^62`` (1 round)."""
        s = x.frac_bits - self.frac if bits is None else bits
        if s <= 0:
            return x
        return self.trunc_many([(x, s)])[0]

    def trunc_many(self, items: Sequence[tuple[AShare, int]]) -> list[AShare]:
        if not items:
            return []
        for _, s in items:
            if not 0 < s < 62:
                raise InputError(f"truncation by {s} bits is out of range (1..61)")
        flat = np.concatenate([x.values.ravel() for x, _ in items])
        shifts = np.concatenate([np.full(x.size, s, dtype=np.uint64) for x, s in items])
        zp = flat + np.uint64(1 << 62) if self.party == 0 else flat
        m = zp >> _S63
        # w = m0 OR m1 = m0 + m1 - m0*m1 ; the product of the two private bits with one triple
        p = self.private_bit_product(m)
        w = m - p
        res = (zp >> shifts) - (w << (np.uint64(64) - shifts))
        if self.party == 0:
            res -= np.uint64(1) << (np.uint64(62) - shifts)
        self.counters["trunc"] += int(flat.size)
        out, pos = [], 0
        for x, s in items:
            out.append(AShare(res[pos : pos + x.size].reshape(x.shape), self.party, x.frac_bits - s))
            pos += x.size
        return out

    def private_bit_product(self, mine: U64) -> U64:
        """Shares of ``m0 * m1`` where party i privately holds the bit ``m_i``: the triple
        source's ``bit_product`` (one OT per element, dealer-free) if it has one, else a Beaver
        triple."""
        direct = self._online("bit_product")
        if direct is not None:
            out: U64 = direct(mine)
            return out
        a, b, c = self.triples.beaver(mine.shape)
        xs = mine if self.party == 0 else np.zeros_like(mine)
        ys = mine if self.party == 1 else np.zeros_like(mine)
        e_t, f_t = self.exchange([xs - a, ys - b])
        e, f = xs - a + e_t, ys - b + f_t
        z = c + e * b + f * a
        if self.party == 0:
            z += e * f
        self.counters["mul"] += int(mine.size)
        return z

    # ------------------------------------------------------------------ boolean layer
    def _and(self, x: U8, y: U8) -> U8:
        """AND of XOR-shared packed bit arrays (flat uint8), one round."""
        a, b, c = self.triples.bit_triples(int(x.size))
        e_m, f_m = x ^ a, y ^ b
        e_t, f_t = self.exchange([e_m, f_m])
        e, f = e_m ^ e_t, f_m ^ f_t
        z = c ^ (e & b) ^ (f & a)
        if self.party == 0:
            z ^= e & f
        self.counters["and_gates"] += int(x.size) * 8
        return z

    def _and_private(self, mine: U8) -> U8:
        """XOR shares of ``x0 AND x1`` for packed bit vectors that party i holds privately: the
        source's ``and_private`` (one random OT per bit, dealer-free) if it has one, else an AND
        of the XOR sharings ``(x0, 0)`` and ``(0, x1)`` with a boolean triple."""
        direct = self._online("and_private")
        if direct is not None:
            out: U8 = direct(mine)
            self.counters["and_gates"] += int(mine.size) * 8
            return out
        zeros = np.zeros_like(mine)
        return self._and(mine if self.party == 0 else zeros, mine if self.party == 1 else zeros)

    def _carry(self, values: U64, bits: int) -> U8:
        """XOR shares (packed) of the carry into bit ``bits`` of ``low(x0) + low(x1)`` (low
        ``bits`` bits of each party's share): a Kogge-Stone reduction over bit planes."""
        low = values & np.uint64((1 << bits) - 1)
        shifts = np.arange(bits, dtype=np.uint64)[:, None]
        planes = ((low[None, :] >> shifts) & _ONE).astype(np.uint8)  # (bits, n)
        packed = np.packbits(planes, axis=1)  # (bits, nb)
        nb = packed.shape[1]
        g = self._and_private(packed.ravel()).reshape(bits, nb)
        p = packed  # XOR sharing of a_j ^ b_j is (a_j, b_j)
        # Kogge-Stone style reduction; an unpaired top group passes through unchanged
        while g.shape[0] > 1:
            cnt = g.shape[0]
            half = cnt // 2
            g_lo, g_hi = g[0:2 * half:2], g[1:2 * half:2]
            p_lo, p_hi = p[0:2 * half:2], p[1:2 * half:2]
            if cnt == 2:
                t = self._and(p_hi.ravel(), g_lo.ravel()).reshape(1, nb)
                g = g_hi ^ t
                break
            # the lowest group's P is never needed (nothing carries into bit 0)
            both = self._and(
                np.concatenate([p_hi, p_hi[1:]]).ravel(), np.concatenate([g_lo, p_lo[1:]]).ravel()
            ).reshape(2 * half - 1, nb)
            new_g = g_hi ^ both[:half]
            new_p = np.concatenate([np.zeros((1, nb), np.uint8), both[half:]])
            if cnt % 2:
                new_g = np.concatenate([new_g, g[-1:]])
                new_p = np.concatenate([new_p, p[-1:]])
            g, p = new_g, new_p
        return g[0]

    def ltz(self, x: AShare, *, bits: int = 63) -> AShare:
        """Shared bit ``[x < 0]`` (signed; frac 0). ``bits``: promise that ``|x| < 2^bits``
        (default 63 = any ring element); smaller values need fewer AND gates (181 for 63, 112
        for 40). About ``2 + ceil(log2 bits)`` rounds."""
        if not 1 <= bits <= 63:
            raise InputError("ltz: bits must be in [1, 63]")
        flat = x.values.ravel()
        n = flat.size
        if n == 0:
            return AShare(np.zeros(x.shape, np.uint64), self.party, 0)
        # y = x + 2^bits lies in [0, 2^(bits+1)); x < 0  <=>  bit `bits` of y is 0
        y = flat + np.uint64(1 << bits) if self.party == 0 else flat
        carry = np.unpackbits(self._carry(y, bits))[:n].astype(np.uint64)
        top = (y >> np.uint64(bits)) & _ONE
        bit = carry ^ top
        if self.party == 0:
            bit ^= _ONE
        p = self.private_bit_product(bit)
        res = bit - (p << _ONE)  # b0 + b1 - 2 b0 b1
        self.counters["ltz"] += n
        return self._bit(res.reshape(x.shape))

    def lt(self, x: AShare, y: AShare) -> AShare:
        return self.ltz(x - y)

    def ge(self, x: AShare, y: AShare) -> AShare:
        return 1 - self.ltz(x - y)

    def select(self, bit: AShare, x: AShare, y: AShare) -> AShare:
        """``bit ? x : y`` for a shared 0/1 ``bit`` (frac 0), 1 round."""
        return y + self.mul_bits([(bit, x - y)])[0]

    def relu(self, x: AShare) -> AShare:
        return self.mul_bits([(1 - self.ltz(x), x)])[0]

    # ------------------------------------------------------------------ argmax
    def argmax(self, x: AShare, axis: int = -1, *, bits: int = 63) -> tuple[AShare, AShare]:
        """Tournament argmax along ``axis``: (shared one-hot (frac 0), shared max).

        Ties go to the lower index. log2(m) levels of (ltz + one batched multiplication).
        ``bits``: promise that every pairwise difference satisfies ``|d| < 2^bits`` (cheaper).
        """
        xv = np.moveaxis(x.values, axis, -1)
        m = xv.shape[-1]
        if m == 0:
            raise InputError("argmax of an empty axis")
        lead = xv.shape[:-1]
        vals = AShare(xv, self.party, x.frac_bits)
        owner = np.arange(m)  # candidate index of each original position
        onehot: AShare | None = None  # None == all ones (public)
        cur = m
        while cur > 1:
            k = cur // 2
            left = vals[..., 0 : 2 * k : 2]
            right = vals[..., 1 : 2 * k : 2]
            b = self.ltz(left - right, bits=bits)  # 1 -> right wins
            # factor for each original position: left member -> 1-b, right -> b, leftover -> 1
            pair = np.minimum(owner // 2, k - 1)
            is_left = (owner % 2 == 0) & (owner < 2 * k)
            is_right = owner % 2 == 1
            minus_one = np.uint64(2**64 - 1)
            coef = np.where(is_left, minus_one, np.where(is_right, _ONE, np.uint64(0))).astype(np.uint64)
            const = is_left.astype(np.uint64) + (owner >= 2 * k).astype(np.uint64)
            bg = b[..., pair]
            factor = AShare(bg.values * coef, self.party, 0) + const
            diff = right - left
            if onehot is None:
                (prod,) = self.mul_bits([(b, diff)])
                onehot = factor
            else:
                prod, onehot = self.mul_bits([(b, diff), (factor, onehot)])
            winners = left + prod
            if cur % 2 == 1:
                winners = AShare.concatenate([winners, vals[..., cur - 1 : cur]], axis=-1)
            vals = winners
            owner = owner // 2
            cur = k + (cur % 2)
        if onehot is None:
            onehot = AShare.from_public(np.ones((*lead, 1), np.uint64), self.party, 0)
        oh = AShare(np.moveaxis(onehot.values, -1, axis), self.party, 0)
        return oh, vals[..., 0]

    def max(self, x: AShare, axis: int = -1, *, bits: int = 63) -> AShare:
        return self.argmax(x, axis, bits=bits)[1]

    # ------------------------------------------------------------------ reciprocal / division
    def _bit_window(self, values: U64, lo: int, hi: int) -> U8:
        """XOR shares (unpacked 0/1, shape (hi - lo, n)) of bits ``lo .. hi-1`` of ``x0 + x1 mod
        2^64``: bit = ``a_i xor b_i xor c_i`` with the carry ``c_lo`` into bit ``lo`` from
        :meth:`_carry` and the carries inside the window by a Kogge-Stone prefix scan over
        (generate, propagate) pairs. About ``3 lo + 3 w log2 w`` AND gates for ``w = hi - lo``."""
        n = values.size
        w = hi - lo
        shifts = np.arange(lo, hi, dtype=np.uint64)[:, None]
        planes = np.packbits(((values[None, :] >> shifts) & _ONE).astype(np.uint8), axis=1)  # (w, nb)
        nb = planes.shape[1]
        zeros = np.zeros_like(planes)
        # element 0 of the scan = (carry into `lo`, P = 0); element k = (g, p) of window bit k-1
        c_lo = self._carry(values, lo) if lo > 0 else np.zeros(nb, np.uint8)
        if w > 1:
            g_win = self._and_private(planes[: w - 1].ravel()).reshape(w - 1, nb)
            g = np.concatenate([c_lo[None, :], g_win])
            p = np.concatenate([zeros[:1], planes[: w - 1]])
        else:
            g, p = c_lo[None, :], zeros[:1]
        d = 1
        while d < w:
            # G_k ^= P_k & G_{k-d} (k >= d); P_k &= P_{k-d} (k >= 2d); P_k = 0 for k < 2d
            nd, n2 = w - d, max(0, w - 2 * d)
            both = self._and(
                np.concatenate([p[d:], p[2 * d:]]).ravel(), np.concatenate([g[:nd], p[d:d + n2]]).ravel()
            ).reshape(nd + n2, nb)
            g = np.concatenate([g[:d], g[d:] ^ both[:nd]])
            p = np.concatenate([np.zeros((min(w, 2 * d), nb), np.uint8), both[nd:]])
            d *= 2
        bits = planes ^ g  # g_k = carry into window bit k
        return np.unpackbits(bits, axis=1)[:, :n]

    def _suffix_or(self, bits: U8) -> U8:
        """XOR shares (0/1, (w, n)) of ``OR_{k >= i} bit_k`` for every row ``i`` (Kogge-Stone on
        the complements: ``~OR = AND of ~bit``)."""
        w, n = bits.shape
        nots = np.packbits(bits ^ np.uint8(1) if self.party == 0 else bits, axis=1)
        nb = nots.shape[1]
        d = 1
        while d < w:
            t = self._and(nots[: w - d].ravel(), nots[d:].ravel()).reshape(w - d, nb)
            nots = np.concatenate([t, nots[w - d:]])
            d *= 2
        out = np.unpackbits(nots, axis=1)[:, :n]
        return out ^ np.uint8(1) if self.party == 0 else out

    def _normaliser_bits(self, x: AShare, lo: float, hi: float) -> tuple[U8, U64, int]:
        """For ``x`` in ``[lo, hi)``: XOR-shared bits ``ge_j = [x >= 2^j]`` (0/1, (J, n)) for
        ``j`` in ``(log2 lo, log2 hi)``, their weights ``2^-(j+1)`` (frac f) and the base
        ``2^-(e_lo+1)`` (frac f), so that ``s = base - sum_j ge_j w_j = 2^-(e+1)`` for
        ``2^e <= x < 2^(e+1)``. One bit decomposition of the integer part of ``x`` and a
        suffix OR (not one comparison per threshold)."""
        if not 0 < lo < hi:
            raise InputError("reciprocal needs 0 < lo < hi")
        if x.frac_bits != self.frac:
            raise InputError("reciprocal expects a value at the default fixed-point scale")
        e_lo = int(np.floor(np.log2(lo)))
        e_hi = int(np.ceil(np.log2(hi)))
        f = self.frac
        if e_hi > f:
            raise ConfigError(f"reciprocal range hi={hi} needs frac_bits >= {e_hi} (have {f})")
        if e_lo + 1 < -(62 - 2 * f):
            raise ConfigError(f"reciprocal range lo={lo} is too small for frac_bits={f}")
        js = list(range(e_lo + 1, e_hi))
        base = 1 << (f - (e_lo + 1)) if e_lo + 1 <= f else 0
        if not js:
            return np.zeros((0, x.size), np.uint8), np.zeros(0, np.uint64), base
        # [x >= 2^j] = OR of the bits of x at positions >= f + j (x < 2^(f + e_hi) by promise;
        # for f + j <= 0 that is [x != 0], i.e. [x >= 1 ulp])
        w_lo = max(0, f + js[0])
        bits = self._bit_window(x.values.ravel(), w_lo, f + e_hi)
        suffix = self._suffix_or(bits)
        ge = suffix[[max(0, f + j) - w_lo for j in js]]
        weights = np.array([1 << (f - (j + 1)) for j in js], dtype=np.uint64)
        return ge, weights, base

    def _scale(self, ge: U8, weights: U64, base: int, shape: tuple[int, ...],
               targets: Sequence[AShare]) -> tuple[list[AShare], AShare | None]:
        """``t * s`` (frac f, truncated) for every target (broadcast to ``shape``), with
        ``s = base - sum_j ge_j weights_j``. Dealer-free with online OT: ``J`` bit-times-value
        OTs per element (the XOR-shared bits are used directly: no conversion, no Beaver
        triple). Otherwise the bits become arithmetic shares (one private bit product each) and
        ``s`` is multiplied by Beaver. Returns the products and ``s`` (``None`` on the OT path,
        where it is never formed)."""
        f = self.frac
        n_j = ge.shape[0]
        tvs = [np.broadcast_to(t.values, shape).ravel() for t in targets]
        if self._online("bit_mul") is not None:
            bit = AShare(ge.astype(np.uint64), self.party, 0)
            prods = self.mul_bits(
                [(bit, AShare(np.broadcast_to(tv, (n_j, tv.size)), self.party, 0)) for tv in tvs]
            ) if n_j else []
            raw = []
            for i, (t, tv) in enumerate(zip(targets, tvs, strict=True)):
                acc = tv * np.uint64(base)
                if n_j:
                    acc = acc - (prods[i].values * weights[:, None]).sum(axis=0, dtype=np.uint64)
                raw.append((AShare(acc.reshape(shape), self.party, t.frac_bits + f), f))
            return self.trunc_many(raw), None
        # dealer: bit-to-arithmetic, then s as a linear function of the bits
        s = AShare.from_public(np.full(shape, base, np.uint64), self.party, f)
        if n_j:
            flat = ge.astype(np.uint64).ravel()
            prod = self.private_bit_product(flat)
            arith = (flat - (prod << _ONE)).reshape(ge.shape)
            acc = (arith * weights[:, None]).sum(axis=0, dtype=np.uint64)
            s = s - AShare(acc.reshape(shape), self.party, f)
        return self.mul_many([(AShare(tv.reshape(shape), self.party, t.frac_bits), s)
                              for t, tv in zip(targets, tvs, strict=True)]), s

    def _recip_unit(self, xn: AShare) -> AShare:
        """``1/xn`` for ``xn`` in [0.5, 1]: a cubic initial guess (relative error 1.7e-3, fitted
        to minimise ``|1 - x p(x)|``) and one Newton step ``y (2 - xn y)`` (error 3e-6 plus
        fixed-point rounding). 4 multiplications."""
        f = self.frac
        x2 = self.square(xn)
        x3 = self.mul(x2, xn)
        c = self.fxp.encode(np.array(_RECIP_CUBIC))
        lin = xn.values * c[1] + x2.values * c[2] + x3.values * c[3]
        y = self.trunc(AShare(lin, self.party, 2 * f), f) + c[0]
        t = self.mul(xn, y)
        two = self.fxp.encode(np.array(2.0))
        return self.mul(y, two - t)

    def reciprocal(self, x: AShare, *, lo: float = 2.0**-8, hi: float = 2.0**16) -> AShare:
        """``1/x`` for shared ``x`` in ``[lo, hi)`` (positive). Cost: one bit decomposition of
        ``x``'s ``log2(hi/lo)``-bit window + a suffix OR (boolean triples), the scaling by
        ``2^-(e+1)`` (bit x value OTs dealer-free, 1 Beaver product with a dealer) and 4-5
        multiplications. Relative error about ``2^-(frac-2)``."""
        ge, w, base = self._normaliser_bits(x, lo, hi)
        (xn,), s = self._scale(ge, w, base, x.shape, [x])
        y = self._recip_unit(xn)
        if s is not None:
            return self.mul(y, s)
        (out,), _ = self._scale(ge, w, base, x.shape, [y])
        return out

    def div(self, a: AShare, b: AShare, *, lo: float = 2.0**-8, hi: float = 2.0**16) -> AShare:
        """``a / b`` for shared ``b`` in ``[lo, hi)``: ``(a * 2^-(e+1)) * (1 / normalised b)``."""
        shape = np.broadcast_shapes(a.shape, b.shape)
        if shape != b.shape:
            b = AShare(np.broadcast_to(b.values, shape).copy(), self.party, b.frac_bits)
        ge, w, base = self._normaliser_bits(b, lo, hi)
        (bn, a_s), _ = self._scale(ge, w, base, shape, [b, a])
        y = self._recip_unit(bn)
        return self.mul(a_s, y)

    # ------------------------------------------------------------------ sigmoid
    def sigmoid(self, x: AShare, *, bits: int = 63) -> AShare:
        """Logistic function; max abs error ~1e-5 (tested < 2e-4) for the default 20 frac bits.
        ``bits``: promise that ``|x| + 32 < 2^bits`` (cheaper comparisons, like :meth:`ltz`)."""
        if x.frac_bits != self.frac:
            raise InputError("sigmoid expects a value at the default fixed-point scale")
        shp = x.shape
        c_enc = self.fxp.encode(np.array(float(_SIGMOID_CLAMP)))
        # s = [x < 0], |x| = x - 2 s x, c = [|x| > C], t = min(|x|, C) = |x| - c (|x| - C)
        s = self.ltz(x, bits=bits)
        (sx,) = self.mul_bits([(s, x)])
        ax = x - AShare(sx.values << _ONE, self.party, self.frac)
        c = self.ltz(-(ax - c_enc), bits=bits)
        (cx,) = self.mul_bits([(c, ax - c_enc)])
        t = ax - cx
        # exp(-t) = p(t / 2^n)^(2^n), p = cubic Taylor polynomial of exp(-u) on [0, 1] (n = 5:
        # absolute error 6.6e-6 over t in [0, 32]), at F fractional bits
        big_f = 30
        n = _EXP_SQUARINGS
        shift = big_f - self.frac - n
        if shift >= 0:
            u = AShare(t.values << np.uint64(shift), self.party, big_f)
        else:
            u = self.trunc(AShare(t.values, self.party, big_f - shift), -shift)
        u2 = self.square(u, out_frac=big_f)
        u3 = self.mul(u2, u, out_frac=big_f)
        half, sixth = FixedPoint(big_f).encode(np.array([0.5, 1.0 / 6.0]))
        poly = self.trunc(AShare(u2.values * half - u3.values * sixth, self.party, 2 * big_f), big_f)
        z = (1 << big_f) - u + poly
        for _ in range(n):
            z = self.square(z, out_frac=big_f)
        e = self.trunc(z, big_f - self.frac)  # exp(-|x|) at frac bits
        one = self.fxp.encode(np.array(1.0))
        # xn = (1 + e) / 2 in [0.5, 1]; sigmoid(|x|) = 1/(1+e) = y/2
        onepe = e + one
        xn = self.trunc(AShare(onepe.values, self.party, self.frac + 1), 1)
        y = self._recip_unit(xn)
        q = self.trunc(AShare(y.values, self.party, self.frac + 1), 1)
        # sigmoid(x) = s ? 1 - q : q
        res = q + self.mul_bits([(s, one - AShare(q.values * np.uint64(2), self.party, self.frac))])[0]
        return AShare(res.values.reshape(shp), self.party, self.frac)


def _contig(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` would make them 1-d)."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _bcast(arr: U64, ndim: int) -> U64:
    return arr.reshape(arr.shape + (1,) * ndim)


class PublicMatrix:
    """Products ``M^T X`` where party ``holder`` knows ``M`` (n, k) in plaintext, X is shared.

    Setup (once per matrix): the triple source gives the holder a uniform mask ``A`` (n, k); it
    sends ``E = M - A`` (uniform, reveals nothing) and forgets ``A``. Columns of correlation
    ``(B, C = A^T B)`` (B uniform at the other party) are fetched by :meth:`prepare` — B is
    data-independent, so the other party's dense ``Z = E^T B + C_other`` is computed there, ahead
    of the data (e.g. once per tree). Each :meth:`t_matmul` on X (n, c) consumes c columns: the
    other party sends ``F = X_other - B`` (one one-way message) and

    * holder:     ``M^T (X_holder + F) + C_holder``  (sparse bucket sums for a :class:`OneHotMatrix`)
    * non-holder: ``Z``

    which sum to ``M^T X - M^T B + (M - A)^T B + A^T B = M^T X``. The only dense work is the
    non-holder's ``(k x n)(n x c)`` ring product (float64 limb GEMMs) and the dealer's ``A^T B``.
    """

    def __init__(
        self,
        mpc: MPC,
        matrix: Any | None,
        holder: int,
        shape: tuple[int, int] | None,
        cache_limbs: bool | None = None,
    ) -> None:
        if holder not in (0, 1):
            raise InputError("holder must be 0 or 1")
        self.mpc = mpc
        self.holder = holder
        self._sparse: OneHotMatrix | None = None
        self._dense: U64 | None = None
        if mpc.party == holder:
            if matrix is None:
                raise InputError("the holder must provide the matrix")
            if isinstance(matrix, OneHotMatrix):
                self._sparse = matrix
                shp = matrix.shape
            else:
                self._dense = as_u64(np.asarray(matrix))
                if self._dense.ndim != 2:
                    raise InputError("public matrix must be 2-D")
                shp = (int(self._dense.shape[0]), int(self._dense.shape[1]))
            mpc._send([np.array(shp, dtype=np.int64)])
        else:
            (shp_arr,) = mpc._recv(1)
            shp = (int(shp_arr[0]), int(shp_arr[1]))
            if shape is not None and tuple(shape) != shp:
                raise ProtocolError(f"public matrix shape {shp} differs from the expected {tuple(shape)}")
        self.shape = shp
        n, k = shp
        self.ctx, a = mpc.triples.matrix_mask(n, k, holder)
        self._et: RingMatrix | None = None
        if mpc.party == holder:
            if a is None:
                raise ProtocolError("triple source gave the holder no mask")
            dense = self._sparse.to_dense() if self._sparse is not None else self._dense
            if dense is None:
                raise ProtocolError("missing matrix")
            _send_chunked(mpc, dense - a)
            del dense, a
        else:
            e = _recv_chunked(mpc, n, k)
            self._et = RingMatrix(e.T, cache=cache_limbs)  # F-ordered view: contiguous row chunks
        self._b: U64 | None = None
        self._c: U64 | None = None
        self._z: U64 | None = None
        self._used = 0

    @property
    def available(self) -> int:
        """Prepared correlation columns not yet consumed."""
        return 0 if self._c is None else int(self._c.shape[1]) - self._used

    def prepare(self, cols: int) -> None:
        """Fetch ``cols`` correlation columns (both parties, same point); unused ones are dropped."""
        b, c = self.mpc.triples.matrix_vector_triple(self.ctx, int(cols))
        self._b, self._c, self._used = b, c, 0
        if self.mpc.party != self.holder:
            if b is None or self._et is None:
                raise ProtocolError("triple source gave no vector mask")
            self._z = self._et.matmul(b) + c

    def t_matmul(self, x: AShare) -> AShare:
        """Shares of ``M^T x`` for shared ``x`` of shape (n,) or (n, c); frac unchanged.
        Uses prepared columns, or prepares exactly ``c`` now if too few are left."""
        mpc = self.mpc
        n = self.shape[0]
        vec = x.ndim == 1
        xv = x.values[:, None] if vec else x.values
        if xv.shape[0] != n:
            raise InputError(f"t_matmul: x has {xv.shape[0]} rows, the matrix {n}")
        cols = int(xv.shape[1])
        if self.available < cols:
            self.prepare(cols)
        if self._c is None:
            raise ProtocolError("public matrix correlation missing")
        sl = slice(self._used, self._used + cols)
        self._used += cols
        if mpc.party == self.holder:
            (f,) = mpc._recv(1)
            if f.shape != (n, cols) or f.dtype != np.uint64:
                raise ProtocolError("t_matmul: malformed masked vector")
            y = xv + f
            if self._sparse is not None:
                own = self._sparse.t_matmul(y)
            elif self._dense is not None:
                own = ring_matmul(self._dense.T, y)
            else:
                raise ProtocolError("missing matrix")
            z = own + self._c[:, sl]
        else:
            if self._b is None or self._z is None:
                raise ProtocolError("public matrix correlation missing")
            mpc._send([xv - self._b[:, sl]])
            z = self._z[:, sl]
        return AShare(np.ascontiguousarray(z[:, 0] if vec else z), mpc.party, x.frac_bits)


_CHUNK_ELEMS = 1 << 22  # 32 MiB of uint64 per frame


def _send_chunked(mpc: MPC, arr: U64) -> None:
    flat = np.ascontiguousarray(arr).ravel()
    for start in range(0, max(flat.size, 1), _CHUNK_ELEMS):
        mpc._send([flat[start : start + _CHUNK_ELEMS]])


def _recv_chunked(mpc: MPC, n: int, k: int) -> U64:
    total = n * k
    parts: list[U64] = []
    got = 0
    while got < total or (total == 0 and not parts):
        (p,) = mpc._recv(1)
        if p.dtype != np.uint64 or p.ndim != 1:
            raise ProtocolError("masked matrix chunk is malformed")
        parts.append(p)
        got += p.size
        if total == 0:
            break
    if got != total:
        raise ProtocolError("masked matrix has the wrong size")
    return np.concatenate(parts).reshape(n, k) if parts else np.zeros((n, k), np.uint64)
