"""Dealer-free correlated randomness: the two parties make it themselves with additive HE.

AND triples (the comparison circuit's bits) come by default from OT extension
(:mod:`veil.crypto.triples_ot`: IKNP over base OTs on edwards25519), ``bits="he"`` makes them
with one ciphertext per bit instead (orders of magnitude slower). Arithmetic correlations:

Gilboa-style: party 0 owns an HE key pair (OU or Paillier, :mod:`veil.crypto.he`). For a cross
term ``u * v`` with ``u`` private to party 0 and ``v`` private to party 1, party 0 sends
``Enc(u)``; party 1 answers ``rerandomize(Enc(u) * v + ...) + s`` with a mask ``s`` 40 bits wider
than the sum, packing several outputs into one plaintext (Horner with ``* 2^w``) to cut
decryptions; party 0 decrypts ``sum + s`` and keeps it mod 2^64 (mod 2 for bits), party 1
keeps ``-s``. Beaver triples need two cross terms per element (``a0*b1 + b0*a1``), matrix
triples ``A0 @ B1 + A1 @ B0``, AND triples the same over bits.

Trust: no third party; security rests on the HE scheme (semi-honest). Cost: per element two
encryptions, two ciphertext-scalar products and a fraction of a decryption — orders of
magnitude slower than :class:`~veil.crypto.triples.TrustedDealer` (measured numbers in
docs/protocols/mpc.md). ``prefetch(...)`` generates in bulk ahead of use.

The masked-matrix correlation (``matrix_mask`` / ``matrix_vector_triple``) costs
``n * k * cols`` ciphertext products here: fine for small matrices, infeasible at boost's
histogram sizes. Dealer-free bucket sums use :mod:`veil.crypto.onehot` (the one-hot product over
this source's OT engine, :meth:`HomomorphicTriples.ot_engine`) or the HE path (``ss_to_he`` +
``bucket_sums`` + ``he_to_ss``) instead.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from veil.comm import Channel, Message
from veil.crypto import he
from veil.crypto.he import CiphertextArray, HEKeyPair, HEPublicKey
from veil.crypto.mpc_ring import U8, U64, ring_matmul
from veil.crypto.random import random_int_array, random_u64
from veil.errors import ConfigError, HEError, InputError, ProtocolError

__all__ = ["HomomorphicTriples", "HtMsg"]

log = logging.getLogger("veil.crypto")

_SIGMA = 40
_BIT_POOL = 1 << 12  # bytes of AND triples generated at least per OT-extension call
_MOD64 = 1 << 64


class HtMsg(Message, frozen=True):
    """One message of the dealer-free triple generation (``seq`` is a stage check)."""

    seq: int
    blobs: list[bytes]


class HomomorphicTriples:
    """Dealer-free :class:`~veil.crypto.triples.TripleSource` (``trust = "homomorphic"``).

    ``HomomorphicTriples(channel, party, scheme="ou", key_bits=2048, backend=None)``; party 0
    generates the key pair (or pass ``keypair``) and sends the public key. ``channel`` may be the
    MPC channel itself (calls happen in the same order on both sides) or a dedicated one.

    ``arith``: ``"ot"`` (default) makes Beaver and matrix triples by Gilboa multiplication over
    OT extension — measured 10x (elementwise) to 30x (matrix) faster than ``"he"``, Gilboa with
    the OU/Paillier key. ``bits``: ``"ot"`` (default, IKNP) or ``"he"`` (one ciphertext per bit).
    Both are dealer-free and semi-honest; the masked-matrix correlation always uses HE.
    """

    trust = "homomorphic"

    def __init__(
        self,
        channel: Channel,
        party: int,
        *,
        scheme: str = "ou",
        key_bits: int = 2048,
        backend: str | None = None,
        keypair: HEKeyPair | None = None,
        timeout: float | None = None,
        bits: str = "ot",
        arith: str = "ot",
    ) -> None:
        if party not in (0, 1):
            raise ConfigError(f"party must be 0 or 1, got {party!r}")
        if bits not in ("ot", "he"):
            raise ConfigError("bits must be 'ot' (OT extension) or 'he' (one ciphertext per bit)")
        if arith not in ("ot", "he"):
            raise ConfigError("arith must be 'he' (Gilboa with OU/Paillier) or 'ot' (Gilboa with OTs)")
        self.bits_via = bits
        self.arith_via = arith
        # MPC uses the online OT protocols (bit_product, bit_mul) only when this is set
        self.online_ot = bits == "ot" or arith == "ot"
        empty = np.zeros(0, dtype=np.uint8)
        self._bitpool: tuple[U8, U8, U8] = (empty, empty.copy(), empty.copy())
        self._ot: Any = None
        self.channel = channel
        self.party = party
        self.timeout = timeout
        self._seq = 0
        self._lock = threading.Lock()
        self._masks: dict[int, tuple[int, int, int, U64 | None, U64 | None]] = {}
        self._ctx = 0
        self._pool: dict[str, list[tuple[Any, ...]]] = {}
        self.generated = {"beaver": 0, "bits": 0, "matmul": 0}
        if party == 0:
            kp = keypair or he.keygen(scheme=scheme, key_bits=key_bits, backend=backend)
            self._kp: HEKeyPair | None = kp
            self.pk: HEPublicKey = kp.public
            self._send([self.pk.to_bytes()])
        else:
            self._kp = None
            (raw,) = self._recv(1)
            self.pk = HEPublicKey.from_bytes(raw)
        self.slot_bits_arith = 128 + 2 + _SIGMA + 1
        log.info("dealer-free (homomorphic) triples, %s %d-bit key, party %d", self.pk.scheme,
                 self.pk.key_bits, party)

    # ------------------------------------------------------------------ messaging
    def _send(self, blobs: Sequence[bytes]) -> None:
        with self._lock:
            seq = self._seq
            self._seq += 1
        self.channel.send(HtMsg(seq, list(blobs)))

    def _recv(self, count: int) -> list[bytes]:
        with self._lock:
            seq = self._seq
            self._seq += 1
        msg = self.channel.recv(HtMsg, timeout=self.timeout)
        if msg.seq != seq or len(msg.blobs) != count:
            raise ProtocolError(f"triple generation out of step (got {msg.seq}, expected {seq})")
        return list(msg.blobs)

    def _ct(self, raw: bytes) -> CiphertextArray:
        return CiphertextArray.from_bytes(self.pk, raw)

    # ------------------------------------------------------------------ the cross-term engine
    def _cross(
        self,
        u: list[list[int]],
        v: list[list[int]] | None,
        combine: Any,
        out_count: int,
        bound_bits: int,
    ) -> list[int]:
        """Shares (python ints, unreduced: P0 gets ``value + s``, P1 gets ``-s``) of ``out`` where
        ``out = combine(cts_of_u, v)`` is computed by party 1 on party 0's encrypted vectors ``u``.

        ``bound_bits``: every output is a non-negative integer ``< 2^bound_bits``.
        """
        w = bound_bits + _SIGMA + 1
        slots = max(1, (self.pk.plaintext_bits - 1) // w)
        if w > self.pk.plaintext_bits - 1:
            raise ConfigError("HE key too small for this correlation")
        if self.party == 0:
            if self._kp is None:
                raise ProtocolError("missing key pair")
            self._send([self.pk.encrypt(vec).to_bytes() if vec else b"" for vec in u])
            (raw,) = self._recv(1)
            packed = self._ct(raw) if raw else None
            plain = self._kp.secret.decrypt(packed) if packed is not None and len(packed) else []
            lim = 1 << (slots * w)
            out: list[int] = []
            mask = (1 << w) - 1
            for p in plain:
                if p < 0 or p >= lim:
                    raise HEError("triple generation: decrypted value out of range")
                for _ in range(slots):
                    out.append(p & mask)
                    p >>= w
            return out[:out_count]
        if v is None:
            raise ProtocolError("missing multipliers")
        raws = self._recv(len(u))
        cts = [self._ct(r) if r else None for r in raws]
        res: CiphertextArray = combine(cts, v)
        if len(res) != out_count:
            raise ProtocolError("cross-term engine: wrong output count")
        masks = random_int_array(out_count, bound_bits + _SIGMA) if out_count else []
        if out_count == 0:
            self._send([b""])
            return []
        # pack `slots` outputs per ciphertext: acc = sum_j res[j] * 2^(w j) (Horner)
        pad = (-out_count) % slots
        if pad:
            res = type(res)._concat([res, self.pk.encrypt([0] * pad)])
        masks_p = masks + [0] * pad
        acc = res[slots - 1::slots]
        for j in range(slots - 2, -1, -1):
            acc = acc * (1 << w) + res[j::slots]
        packed_masks = []
        for i in range(0, len(masks_p), slots):
            m = 0
            for j in range(slots - 1, -1, -1):
                m = (m << w) + masks_p[i + j]
            packed_masks.append(m)
        acc = acc.rerandomize() + packed_masks
        self._send([acc.to_bytes()])
        return [-m for m in masks]

    # ------------------------------------------------------------------ TripleSource API
    def prefetch(self, beaver: int = 0) -> None:
        """Generate ``beaver`` elementwise triples ahead of use (both parties call it at the same
        point); later :meth:`beaver` calls draw from this pool first."""
        if beaver > 0:
            a, b, c = self._gen_beaver(beaver)
            pool = self._pool.setdefault("beaver", [])
            pool.append((a, b, c))

    def beaver(self, shape: int | tuple[int, ...]) -> tuple[U64, U64, U64]:
        shp = (shape,) if isinstance(shape, int) else tuple(shape)
        n = int(np.prod(shp, dtype=np.int64)) if shp else 1
        pool = self._pool.get("beaver", [])
        have = sum(len(t[0]) for t in pool)
        if n and have >= n:
            a, b, c = (np.concatenate([t[i] for t in pool]) for i in range(3))
            rest = (a[n:], b[n:], c[n:])
            self._pool["beaver"] = [rest] if len(rest[0]) else []
            return a[:n].reshape(shp), b[:n].reshape(shp), c[:n].reshape(shp)
        a, b, c = self._gen_beaver(n)
        return a.reshape(shp), b.reshape(shp), c.reshape(shp)

    def ot_engine(self) -> Any:
        """The OT-extension engine between the two parties (created, with its base OTs, at first use)."""
        return self._ot_engine()

    def _ot_engine(self) -> Any:
        if self._ot is None:
            from veil.crypto.triples_ot import OTExtension

            self._ot = OTExtension(self.channel, self.party, timeout=self.timeout)
        return self._ot

    def _gen_beaver(self, n: int) -> tuple[U64, U64, U64]:
        if self.arith_via == "ot":
            if n == 0:
                z = np.zeros(0, np.uint64)
                return z, z.copy(), z.copy()
            out: tuple[U64, U64, U64] = self._ot_engine().beaver(n)
            self.generated["beaver"] += n
            return out
        a, b = random_u64(n), random_u64(n)
        al, bl = a.tolist(), b.tolist()

        def combine(cts: list[CiphertextArray | None], v: list[list[int]]) -> CiphertextArray:
            ca, cb = cts
            if ca is None or cb is None:
                raise ProtocolError("missing ciphertexts")
            return ca * v[0] + cb * v[1]

        if self.party == 0:
            cross = self._cross([al, bl], None, combine, n, 129)
        else:
            cross = self._cross([[], []], [bl, al], combine, n, 129) if n else []
        cr = np.array([x % _MOD64 for x in cross], dtype=np.uint64) if n else np.zeros(0, np.uint64)
        c = a * b + cr
        self.generated["beaver"] += n
        return a, b, c

    def bit_product(self, mine: U64) -> U64:
        """Shares of ``x0 * x1`` for private bits (truncation wrap bits, bit-to-arithmetic):
        one OT per element instead of a whole Beaver triple. Used by :class:`MPC` when present."""
        out: U64 = self._ot_engine().bit_product(mine)
        return out

    def and_private(self, mine: U8) -> U8:
        """XOR shares of ``x0 AND x1`` for privately held packed bits (one OT per bit instead of
        an AND triple's two). Used by the comparison circuit's first layer when present."""
        out: U8 = self._ot_engine().and_private(mine)
        return out

    def cross_product(self, mine: U64) -> U64:
        """Shares of ``x0 * x1`` for private ring values (64 OTs per element in total, half a
        Beaver triple's). Used by :meth:`MPC.square` when present."""
        out: U64 = self._ot_engine().cross_product(mine)
        return out

    def bit_mul(self, bit_share: U64, x_share: U64) -> U64:
        """Shares of ``b * x`` for a shared bit ``b`` (one OT per element and direction instead
        of a Beaver triple). Used by :meth:`MPC.mul_bits` when present."""
        out: U64 = self._ot_engine().bit_mul(bit_share, x_share)
        return out

    def bit_triples(self, nbytes: int) -> tuple[U8, U8, U8]:
        if self.bits_via == "ot":
            # small requests (late argmax levels, few elements) draw from a pool generated in
            # batches of >= _BIT_POOL bytes: an OT extension call has a fixed cost
            pool = self._bitpool
            if pool[0].size < nbytes:
                fresh = self._ot_engine().and_triples(max(nbytes - pool[0].size, _BIT_POOL))
                self.generated["bits"] += fresh[0].size * 8
                pool = (np.concatenate([pool[0], fresh[0]]), np.concatenate([pool[1], fresh[1]]),
                        np.concatenate([pool[2], fresh[2]]))
            out = (pool[0][:nbytes], pool[1][:nbytes], pool[2][:nbytes])
            self._bitpool = (pool[0][nbytes:], pool[1][nbytes:], pool[2][nbytes:])
            return out
        n = nbytes * 8
        x = np.unpackbits(np.frombuffer(random_u64(-(-nbytes // 8)).tobytes()[:nbytes], dtype=np.uint8))
        y = np.unpackbits(np.frombuffer(random_u64(-(-nbytes // 8)).tobytes()[:nbytes], dtype=np.uint8))
        xl, yl = x.astype(int).tolist(), y.astype(int).tolist()

        def combine(cts: list[CiphertextArray | None], v: list[list[int]]) -> CiphertextArray:
            ca, cb = cts
            if ca is None or cb is None:
                raise ProtocolError("missing ciphertexts")
            return ca * v[0] + cb * v[1]

        if self.party == 0:
            cross = self._cross([xl, yl], None, combine, n, 2)
        else:
            cross = self._cross([[], []], [yl, xl], combine, n, 2) if n else []
        cr = np.array([c & 1 for c in cross], dtype=np.uint8)
        z = (x & y) ^ cr
        self.generated["bits"] += n
        return np.packbits(x), np.packbits(y), np.packbits(z)

    def matmul_triple(self, m: int, k: int, n: int) -> tuple[U64, U64, U64]:
        if self.arith_via == "ot":
            res: tuple[U64, U64, U64] = self._ot_engine().matmul_triple(m, k, n)
            self.generated["matmul"] += m * n
            return res
        a, b = random_u64((m, k)), random_u64((k, n))
        al, bl = a.ravel().tolist(), b.ravel().tolist()
        groups = [list(range(i * k, (i + 1) * k)) for i in range(m)]

        def combine(cts: list[CiphertextArray | None], v: list[list[int]]) -> CiphertextArray:
            ca, cb = cts  # Enc(A0) (m*k), Enc(B0) (k*n); v = [B1 (k*n), A1 (m*k)]
            if ca is None or cb is None:
                raise ProtocolError("missing ciphertexts")
            b1 = np.array(v[0], dtype=object).reshape(k, n)
            a1 = np.array(v[1], dtype=object).reshape(m, k)
            cols = []
            for j in range(n):
                t1 = (ca * np.tile(b1[:, j], m).tolist()).select_sums(groups)  # (A0 B1)[:, j]
                rows = [list(range(jj, k * n, n)) for jj in [j]]
                cbj = cb[rows[0]]  # B0[:, j] (k,)
                t2 = (type(cbj)._concat([cbj] * m) * a1.ravel().tolist()).select_sums(groups)
                cols.append(t1 + t2)
            # row-major (m, n) order
            flat = type(cols[0])._concat(cols)  # column-major: j*m + i
            order = [j * m + i for i in range(m) for j in range(n)]
            return flat[order]

        bound = 128 + max(1, int(np.ceil(np.log2(max(2 * k, 2))))) + 1
        if self.party == 0:
            cross = self._cross([al, bl], None, combine, m * n, bound)
        else:
            cross = self._cross([[], []], [bl, al], combine, m * n, bound)
        cr = np.array([x % _MOD64 for x in cross], dtype=np.uint64).reshape(m, n)
        c = ring_matmul(a, b) + cr
        self.generated["matmul"] += m * n
        return a, b, c

    def matrix_mask(self, n: int, k: int, holder: int) -> tuple[int, U64 | None]:
        if holder not in (0, 1):
            raise InputError("holder must be 0 or 1")
        ctx = self._ctx
        self._ctx += 1
        a = random_u64((n, k)) if self.party == holder else None
        self._masks[ctx] = (n, k, holder, a, None)
        return ctx, a

    def matrix_vector_triple(self, ctx: int, cols: int) -> tuple[U64 | None, U64]:
        """Shares of ``A^T B`` with ``A`` at the holder, fresh ``B`` at the other party. The
        encrypting side is always party 0 (the key owner); the multiplier side party 1."""
        if ctx not in self._masks:
            raise InputError(f"unknown matrix context {ctx}")
        n, k, holder, a, _ = self._masks[ctx]
        b = random_u64((n, cols)) if self.party != holder else None
        # party 0's private matrix is encrypted; party 1's is the multiplier
        mine = a if self.party == holder else b
        if mine is None:
            raise ProtocolError("missing local matrix")
        groups_a = holder == 0  # is A encrypted (party 0 holds A)?

        def combine(cts: list[CiphertextArray | None], v: list[list[int]]) -> CiphertextArray:
            (ce,) = cts
            if ce is None:
                raise ProtocolError("missing ciphertexts")
            mult = np.array(v[0], dtype=object)
            outs = []
            if groups_a:  # Enc(A) (n*k), multiplier B (n*cols): out[j, c] = sum_i A[i, j] B[i, c]
                bm = mult.reshape(n, cols)
                for c in range(cols):
                    prod = ce * np.repeat(bm[:, c], k).tolist()
                    outs.append(prod.select_sums([list(range(j, n * k, k)) for j in range(k)]))
            else:  # Enc(B) (n*cols), multiplier A (n*k)
                am = mult.reshape(n, k)
                for c in range(cols):
                    col = ce[list(range(c, n * cols, cols))]
                    for j in range(k):
                        outs.append((col * am[:, j].tolist()).sum())
                flat = type(outs[0])._concat(outs)  # c*k + j
                return flat[[c * k + j for j in range(k) for c in range(cols)]]
            flat = type(outs[0])._concat(outs)  # c*k + j
            return flat[[c * k + j for j in range(k) for c in range(cols)]]

        bound = 128 + max(1, int(np.ceil(np.log2(max(n, 2))))) + 1
        if self.party == 0:
            cross = self._cross([mine.ravel().tolist()], None, combine, k * cols, bound)
        else:
            cross = self._cross([[]], [mine.ravel().tolist()], combine, k * cols, bound)
        c_share = np.array([x % _MOD64 for x in cross], dtype=np.uint64).reshape(k, cols)
        return b, c_share

    def close(self) -> None:
        pass
