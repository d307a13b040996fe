"""Dealer-free boolean AND triples by oblivious-transfer extension (semi-honest IKNP).

Used by :class:`veil.crypto.triples_he.HomomorphicTriples` for the bit correlations of the
comparison circuit, where one HE ciphertext per bit would be ~10^4 times slower.

* Base OTs: 128 per direction, "simplest OT" (Chou-Orlandi) on the edwards25519 prime-order
  group (PyNaCl): the base sender publishes ``Y = yB``; the receiver with choice ``s`` sends
  ``X = xB + sY`` and keeps ``H(xY)``; the sender derives ``H(yX)`` and ``H(y(X - Y))``.
  Scalars from :mod:`veil.crypto.random`; keys hash the index and the transcript.
* Extension (Ishai-Kilian-Nissim-Petrank): column seeds expanded with AES-256-CTR; the
  receiver sends ``u_j = G(k_j^0) xor G(k_j^1) xor r``; rows are hashed with a tweakable
  correlation-robust hash ``H(i, x) = pi(pi(x) xor i) xor pi(x)`` (``pi`` = fixed-key AES-128,
  Guo et al. 2020), giving random OTs.
* Native kernel (:mod:`veil.crypto._native`, ``otkernel.c``): CTR expansion, transposes and
  hashes with SSE2 / AES-NI, byte-identical to the numpy functions here, which stay the reference
  and the fallback (no x86 AES-NI, no C compiler, or ``VEIL_OT_NATIVE=0``). :data:`NATIVE` /
  :func:`native_status` say which path runs; the two parties may run different paths.
* AND triple from two random OTs, one per direction: with ROT outputs ``(m0, m1)`` at the
  sender and ``m_c`` at the receiver, ``c * (m0 xor m1) = m0 xor m_c``. So each party's
  random choice bit ``a_i`` times the other's ``b_j = m0 xor m1`` is XOR-shared, giving
  ``c = (a0 xor a1)(b0 xor b1)``. One round per batch, 2 x 16 bytes per triple on the wire.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nacl import bindings as nb

from veil.comm import Channel, Message
from veil.crypto import _native
from veil.crypto._native import OtKernel
from veil.crypto.mpc_ring import U8, U64
from veil.crypto.random import random_bytes
from veil.errors import ProtocolError

__all__ = ["OTExtension", "OtMsg", "native_status"]  # and NATIVE (lazy, module __getattr__)

log = logging.getLogger("veil.crypto")

KAPPA = 128
_CHUNK = 1 << 20  # OTs per transpose block
_PI_KEY = hashlib.sha256(b"veil-ot-tccr-fixed-key").digest()[:16]


_native_lock = threading.Lock()
_native_state: tuple[OtKernel | None, str] | None = None


def _self_test(k: OtKernel) -> bool:
    """The native kernel against the numpy reference on a fixed input with a tail block."""
    nbytes = 82  # m = 656: one full 64-byte (512-OT) kernel block, then 16 bytes and a 2-byte tail
    m = 8 * nbytes
    data = np.frombuffer(hashlib.shake_128(b"veil-ot-native-selftest").digest(3 * KAPPA * nbytes + 16),
                         dtype=np.uint8)
    t, q, u = (data[i * KAPPA * nbytes:(i + 1) * KAPPA * nbytes].reshape(KAPPA, nbytes) for i in range(3))
    s_row = data[-16:]
    s_bits = np.unpackbits(s_row, bitorder="little")
    start = (1 << 40) + 3  # tweaks above 2^32
    ref = _finish_numpy(t, q.copy(), u, s_bits, s_row, m, start)
    got = k.finish(t, q, u, s_row, m, start, _PI_KEY)
    rows = _transpose(t, m)
    keys = t[:3].reshape(-1)[:96].reshape(3, 32)
    ctr_ok = all(
        k.ctr(keys, off, n)[i].tobytes() == _stream(keys[i].tobytes()).update(bytes(off + n))[off:]
        for off, n in ((0, 16), (5, 300), (160, 29)) for i in range(3))
    return (ctr_ok and all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))
            and np.array_equal(k.transpose(t, m), rows)
            and np.array_equal(k.tccr(rows, start, _PI_KEY), _tccr(rows, start)))


def _load_native() -> tuple[OtKernel | None, str]:
    global _native_state
    with _native_lock:
        if _native_state is None:
            kernel, why = _native.load()
            if kernel is not None and not _self_test(kernel):
                log.warning("OT extension: native kernel %s disagrees with numpy; using numpy", kernel.path)
                kernel, why = None, "native kernel failed its self-test"
            log.debug("OT extension: %s path (%s)", "native" if kernel else "numpy", why)
            _native_state = (kernel, why)
        return _native_state


def native_status() -> dict[str, Any]:
    """Which path :class:`OTExtension` uses for CTR expansion, transposes, hashes: ``{"native": bool,
    "reason": str}`` (loads, and on first use compiles, the kernel)."""
    kernel, why = _load_native()
    return {"native": kernel is not None, "reason": why}


def __getattr__(name: str) -> Any:
    if name == "NATIVE":  # lazy: compiling the kernel is not an import side effect
        return _load_native()[0] is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class OtMsg(Message, frozen=True):
    seq: int
    arrays: list[np.ndarray]


def _scalar() -> bytes:
    while True:
        k = bytes(nb.crypto_core_ed25519_scalar_reduce(random_bytes(64)))
        if any(k):
            return k


def _kdf(*parts: bytes) -> bytes:
    h = hashlib.sha256(b"veil-base-ot")
    for p in parts:
        h.update(len(p).to_bytes(4, "little") + p)
    return h.digest()


def _prg(key: bytes, nonce: int, nbytes: int) -> U8:
    enc = Cipher(algorithms.AES(key), modes.CTR(nonce.to_bytes(16, "little"))).encryptor()
    return np.frombuffer(enc.update(b"\x00" * nbytes), dtype=np.uint8)


def _stream(key: bytes, offset: int = 0) -> Any:
    """An AES-256-CTR keystream reader (``.update(zeros)``) for one base-OT key (counter block 0
    = byte 0), positioned at byte ``offset``."""
    enc = Cipher(algorithms.AES(key), modes.CTR((offset // 16).to_bytes(16, "big"))).encryptor()
    if offset % 16:
        enc.update(bytes(offset % 16))
    return enc


def _pi(blocks: U8) -> U8:
    # fixed-key AES as a public random permutation inside a correlation-robust hash; ECB is
    # the right mode for a blockwise permutation (this is not encryption of data)
    enc = Cipher(algorithms.AES(_PI_KEY), modes.ECB()).encryptor()  # noqa: S305
    out = np.empty(blocks.size + 15, dtype=np.uint8)  # update_into may want a block of slack
    enc.update_into(np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1).data, out.data)
    return out[:blocks.size].reshape(blocks.shape)


def _tccr(rows: U8, start: int) -> U8:
    """``H(i, x) = pi(pi(x) ^ i) ^ pi(x)`` for rows (m, 16) with tweaks ``start + i`` (the
    tweak is XORed into the low 8 bytes, little-endian)."""
    m = rows.shape[0]
    p = _pi(rows)
    x = p.copy()
    x.view("<u8").reshape(m, 2)[:, 0] ^= np.arange(start, start + m, dtype=np.uint64)
    out = _pi(x)
    out ^= p
    return out


_T8 = ((np.uint64(7), np.uint64(0x00AA00AA00AA00AA)), (np.uint64(14), np.uint64(0x0000CCCC0000CCCC)),
       (np.uint64(28), np.uint64(0x00000000F0F0F0F0)))


def _t8(v: np.ndarray) -> np.ndarray:
    """Transpose, in place, the 8x8 bit matrix in every uint64 (bit 8r+c -> 8c+r), Hacker's
    Delight 7-3."""
    t = np.empty_like(v)
    for sh, mask in _T8:
        np.right_shift(v, sh, out=t)
        t ^= v
        t &= mask
        v ^= t
        t <<= sh
        v ^= t
    return v


def _transpose(cols: U8, m: int) -> U8:
    """(128, m/8) column bit-matrix -> (m, 16) rows; ``m % 8 == 0``. Bit order is little-endian
    throughout (``np.packbits(..., bitorder="little")``): bit ``c`` of column byte ``b`` is OT
    ``8 b + c``, bit ``r`` of row byte ``J`` is column ``8 J + r``, so the 8x8 block transposes
    need no bit reversal."""
    if m % 8:
        raise ProtocolError("OT batch size must be a multiple of 8")
    out = np.empty((m, 16), dtype=np.uint8)
    step = _CHUNK // 8
    total = m // 8
    for s in range(0, total, step):
        e = min(total, s + step)
        nbk = e - s
        # u64 word (J, b): byte r = column 8J + r at column byte b
        # a copy (ascontiguousarray would return a view for nbk == 1, and _t8 works in place)
        x = cols[:, s:e].reshape(16, 8, nbk).transpose(0, 2, 1).copy()
        w = _t8(x.view("<u8").reshape(16, nbk))
        # after the transpose, byte c of word (J, b) is byte J of row 8b + c
        out[8 * s:8 * e] = w.view(np.uint8).reshape(16, nbk, 8).transpose(1, 2, 0).reshape(8 * nbk, 16)
    return out


def _finish_numpy(t_cols: U8, q_cols: U8, peer_u: U8, s_bits: U8, s_row: U8, m: int,
                  start: int) -> tuple[U8, U8, U8]:
    """The end of an extension call (numpy reference of ``OtKernel.finish``): ``Q = q ^ (s & u)``
    (``q_cols`` is overwritten), ``(H(Q), H(Q ^ s), H(T))`` on the transposed rows."""
    np.bitwise_xor(q_cols, peer_u, out=q_cols, where=s_bits[:, None].astype(bool))
    t_rows = _transpose(t_cols, m)
    q_rows = _transpose(q_cols, m)
    mc = _tccr(t_rows, start)
    m0 = _tccr(q_rows, start)
    q_rows ^= s_row[None, :]
    m1 = _tccr(q_rows, start)
    return m0, m1, mc


class OTExtension:
    """Random OTs in both directions between the two parties (one instance per direction)."""

    def __init__(self, channel: Channel, party: int, *, timeout: float | None = None) -> None:
        self.channel = channel
        self.party = party
        self.timeout = timeout
        self._seq = 0
        self._lock = threading.Lock()
        self._nonce = 1
        self._count = 0  # OTs consumed per instance (for hash tweaks)
        # CTR expansion, transposes, hashes: native kernel or numpy (same bytes; either per party,
        # tests set it per instance, even between calls)
        self._native: OtKernel | None = _load_native()[0]
        self._setup()

    # ---- messaging
    def exchange(self, arrays: Sequence[np.ndarray], *, same_shape: bool = True) -> list[np.ndarray]:
        """Send ``arrays`` and receive the peer's in the same step (both parties call it at the same
        point; numbered, so a step out of order is an error). ``same_shape``: the peer's arrays must
        have my shapes and dtypes; otherwise only their number is checked (callers check shapes)."""
        return self._exchange(arrays, same_shape=same_shape)

    def _exchange(self, arrays: Sequence[np.ndarray], *, same_shape: bool = True) -> list[np.ndarray]:
        with self._lock:
            seq = self._seq
            self._seq += 1
        self.channel.send(OtMsg(seq, list(arrays)))
        msg = self.channel.recv(OtMsg, timeout=self.timeout)
        if msg.seq != seq or len(msg.arrays) != len(arrays):
            raise ProtocolError(f"OT extension out of step (got {msg.seq}, expected {seq})")
        for mine, theirs in zip(arrays, msg.arrays, strict=True):
            if not isinstance(theirs, np.ndarray):
                raise ProtocolError("OT extension: peer sent a non-array")
            if same_shape and (mine.shape != theirs.shape or mine.dtype != theirs.dtype):
                raise ProtocolError("OT extension: peer array has the wrong shape")
        return list(msg.arrays)

    # ---- base OTs (both directions at once)
    def _setup(self) -> None:
        # as extension receiver I am the base-OT sender: publish Y
        y = _scalar()
        big_y = bytes(nb.crypto_scalarmult_ed25519_base_noclamp(y))
        (peer_y_arr,) = self._exchange([np.frombuffer(big_y, dtype=np.uint8)])
        peer_y = peer_y_arr.tobytes()
        if not nb.crypto_core_ed25519_is_valid_point(peer_y):
            raise ProtocolError("base OT: invalid point from the peer")
        # as extension sender I am the base-OT receiver with random choices s
        s_bytes = random_bytes(KAPPA // 8)
        self.s_bits = np.unpackbits(np.frombuffer(s_bytes, dtype=np.uint8), bitorder="little")
        self.s_row = np.frombuffer(s_bytes, dtype=np.uint8).copy()  # packed (16,)
        xs, big_xs = [], []
        for j in range(KAPPA):
            x = _scalar()
            xb = bytes(nb.crypto_scalarmult_ed25519_base_noclamp(x))
            if self.s_bits[j]:
                xb = bytes(nb.crypto_core_ed25519_add(xb, peer_y))
            xs.append(x)
            big_xs.append(xb)
        (peer_x_arr,) = self._exchange([np.frombuffer(b"".join(big_xs), dtype=np.uint8)])
        peer_x = peer_x_arr.tobytes()
        if len(peer_x) != 32 * KAPPA:
            raise ProtocolError("base OT: wrong number of points")
        # keys where I am the extension SENDER: k_j^{s_j}
        self.recv_keys = [
            _kdf(j.to_bytes(2, "little"), peer_y, big_xs[j],
                 bytes(nb.crypto_scalarmult_ed25519_noclamp(xs[j], peer_y)))[:32]
            for j in range(KAPPA)
        ]
        # keys where I am the extension RECEIVER: (k_j^0, k_j^1)
        self.send_keys = []
        for j in range(KAPPA):
            xj = peer_x[32 * j:32 * (j + 1)]
            if not nb.crypto_core_ed25519_is_valid_point(xj):
                raise ProtocolError("base OT: invalid point from the peer")
            k0 = _kdf(j.to_bytes(2, "little"), big_y, xj, bytes(nb.crypto_scalarmult_ed25519_noclamp(y, xj)))
            diff = bytes(nb.crypto_core_ed25519_sub(xj, big_y))
            shared1 = bytes(nb.crypto_scalarmult_ed25519_noclamp(y, diff))
            k1 = _kdf(j.to_bytes(2, "little"), big_y, xj, shared1)
            self.send_keys.append((k0, k1))
        # one AES-256-CTR stream per base-OT key, read sequentially by every extension call (both
        # parties read the same lengths in the same order, so the offsets stay in step; no
        # keystream is ever reused): no cipher set-up per call
        self._g_send = [(_stream(k0), _stream(k1)) for k0, k1 in self.send_keys]
        self._g_recv = [_stream(k) for k in self.recv_keys]
        self._g_pos = 0  # where those readers are; the native kernel computes blocks at an offset
        self._off = 0  # keystream bytes used so far, per key (the same for every key)
        self._keys = tuple(np.frombuffer(b"".join(ks), dtype=np.uint8).reshape(KAPPA, 32) for ks in (
            [k0 for k0, _ in self.send_keys], [k1 for _, k1 in self.send_keys], self.recv_keys))
        log.debug("OT extension: %d base OTs per direction done", KAPPA)

    # ---- extension: random OTs in both directions
    def _expand(self, nbytes: int) -> list[U8]:
        """The next ``nbytes`` of every base-OT key's AES-256-CTR keystream: ``G(k^0)``, ``G(k^1)``
        (where I receive) and ``G(k^s)`` (where I send), each (128, nbytes). Native: the blocks at
        the current offset (no GIL held); numpy path: the persistent readers, re-positioned if the
        native path ran in between."""
        off = self._off
        self._off += nbytes
        if self._native is not None:
            return [self._native.ctr(k, off, nbytes) for k in self._keys]
        if self._g_pos != off:
            self._g_send = [(_stream(k0, off), _stream(k1, off)) for k0, k1 in self.send_keys]
            self._g_recv = [_stream(k, off) for k in self.recv_keys]
        self._g_pos = off + nbytes
        zeros = bytes(nbytes)
        out = []
        for streams in ([g0 for g0, _ in self._g_send], [g1 for _, g1 in self._g_send], self._g_recv):
            # written in place (update_into may want up to 15 spare bytes after a row: the flat
            # buffer has them after the last)
            flat = np.empty(KAPPA * nbytes + 15, dtype=np.uint8)
            view = flat.data
            for j, g in enumerate(streams):
                g.update_into(zeros, view[j * nbytes:])
            out.append(flat[:KAPPA * nbytes].reshape(KAPPA, nbytes))
        return out

    def random_ots(self, m: int, choices: U8) -> tuple[U8, U8, U8]:
        """``m`` random OTs per direction. ``choices``: my choice bits (unpacked 0/1, (m,)) for
        the instance where I receive. Returns ``(m0, m1, mc)``: the sender outputs of the
        instance where I send and my receiver outputs, each (m, 16) bytes."""
        if m % 8:
            raise ProtocolError("OT batch size must be a multiple of 8")
        nbytes = m // 8
        r_packed = np.packbits(choices.astype(np.uint8), bitorder="little")
        if r_packed.size != nbytes:
            raise ProtocolError("OT: choice vector has the wrong length")
        t_cols, u_cols, q_cols = self._expand(nbytes)
        u_cols ^= t_cols
        u_cols ^= r_packed[None, :]
        (peer_u,) = self._exchange([u_cols])
        start = self._count
        self._count += m
        if self._native is not None:
            return self._native.finish(t_cols, q_cols, peer_u, self.s_row, m, start, _PI_KEY)
        return _finish_numpy(t_cols, q_cols, peer_u, self.s_bits, self.s_row, m, start)

    def and_triples(self, nbytes: int) -> tuple[U8, U8, U8]:
        """``8 * nbytes`` XOR-shared AND triples, bit-packed like ``TripleSource.bit_triples``."""
        m = nbytes * 8
        a = np.unpackbits(np.frombuffer(random_bytes(nbytes), dtype=np.uint8))
        m0, m1, mc = self.random_ots(m, a)
        lsb0 = m0[:, 0] & 1
        lsb1 = m1[:, 0] & 1
        lsbc = mc[:, 0] & 1
        b = lsb0 ^ lsb1
        c = (a & b) ^ lsb0 ^ lsbc
        return np.packbits(a), np.packbits(b), np.packbits(c)

    def beaver(self, n: int) -> tuple[U64, U64, U64]:
        """``n`` arithmetic Beaver triples over Z_2^64 (Gilboa multiplication with OTs).

        Cross term ``u * v`` (u at the OT sender, v at the receiver): one OT per bit ``v_i``;
        the sender sends ``d_i = m0_i - m1_i + u 2^i``, the receiver keeps ``m_{v_i} + v_i d_i
        = m0_i + v_i u 2^i``, the sender ``-m0_i``. Two rounds, 64 OTs per direction per triple.
        """
        a = np.frombuffer(random_bytes(8 * n), dtype="<u8").astype(np.uint64)
        b = np.frombuffer(random_bytes(8 * n), dtype="<u8").astype(np.uint64)
        shifts = np.arange(64, dtype=np.uint64)
        bits = ((b[:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8).ravel()  # (n*64,)
        m0, m1, mc = self.random_ots(64 * n, bits)
        w0 = m0[:, :8].copy().view("<u8").astype(np.uint64).reshape(n, 64)
        w1 = m1[:, :8].copy().view("<u8").astype(np.uint64).reshape(n, 64)
        wc = mc[:, :8].copy().view("<u8").astype(np.uint64).reshape(n, 64)
        d = w0 - w1 + (a[:, None] << shifts[None, :])
        (peer_d,) = self._exchange([d])
        recv = wc + bits.reshape(n, 64).astype(np.uint64) * peer_d
        c = a * b - w0.sum(axis=1, dtype=np.uint64) + recv.sum(axis=1, dtype=np.uint64)
        return a, b, c

    def _halves(self, n: int) -> tuple[slice, slice, int, int]:
        """Split ``n`` private-input elements over the two OT directions: elements ``[0, h)`` have
        party 1 as receiver (party 0 sends), ``[h, n)`` the reverse. Returns (my receiving
        slice, my sending slice, their lengths)."""
        h = (n + 1) // 2
        recv = slice(h, n) if self.party == 0 else slice(0, h)
        send = slice(0, h) if self.party == 0 else slice(h, n)
        return recv, send, recv.stop - recv.start, send.stop - send.start

    def cross_product(self, mine: U64) -> U64:
        """Arithmetic shares (Z_2^64) of ``x0 * x1`` for private values ``x_i`` of party i (Gilboa
        with random OTs, as in :meth:`beaver`): 64 OTs per element, half the elements in each
        direction, and the sender's 64 corrections ``m0 - m1 + u 2^t``. Two rounds; half the OTs
        of a Beaver triple, so a square ``(x0 + x1)^2 = x0^2 + x1^2 + 2 x0 x1`` costs half a
        product."""
        flat = np.asarray(mine, dtype=np.uint64).ravel()
        n = flat.size
        recv, send, nr, ns = self._halves(n)
        rows = max(nr, ns, 1)
        shifts = np.arange(64, dtype=np.uint64)
        vbits = np.zeros((rows, 64), dtype=np.uint8)
        vbits[:nr] = ((flat[recv][:, None] >> shifts[None, :]) & np.uint64(1)).astype(np.uint8)
        m0, m1, mc = self.random_ots(64 * rows, vbits.ravel())
        w0 = m0[:, :8].copy().view("<u8").reshape(rows, 64)
        w1 = m1[:, :8].copy().view("<u8").reshape(rows, 64)
        wc = mc[:, :8].copy().view("<u8").reshape(rows, 64)
        u = np.zeros(rows, dtype=np.uint64)
        u[:ns] = flat[send]
        (peer_d,) = self._exchange([w0 - w1 + (u[:, None] << shifts[None, :])])
        out = np.empty(n, dtype=np.uint64)
        out[send] = np.uint64(0) - w0[:ns].sum(axis=1, dtype=np.uint64)
        got = wc + vbits.astype(np.uint64) * peer_d
        out[recv] = got[:nr].sum(axis=1, dtype=np.uint64)
        return out.reshape(np.shape(mine))

    def and_private(self, mine: U8) -> U8:
        """XOR shares (packed) of ``x0 AND x1`` for packed bit vectors ``x_i`` private to party i:
        one random OT per bit (half the bits in each direction) and a 1-bit correction
        ``d = lsb(m0) ^ lsb(m1) ^ x_s``; the receiver keeps ``lsb(m_c) ^ c d``, the sender
        ``lsb(m0)``. Half the OTs of an AND triple (which has two cross terms). Two rounds."""
        bits = np.unpackbits(np.asarray(mine, dtype=np.uint8).ravel())
        n = bits.size
        recv, send, nr, ns = self._halves(n)
        m = max(8, ((max(nr, ns) + 7) // 8) * 8)
        choices = np.zeros(m, dtype=np.uint8)
        choices[:nr] = bits[recv]
        m0, m1, mc = self.random_ots(m, choices)
        l0, l1, lc = m0[:, 0] & 1, m1[:, 0] & 1, mc[:, 0] & 1
        u = np.zeros(m, dtype=np.uint8)
        u[:ns] = bits[send]
        (peer_d,) = self._exchange([np.packbits(l0 ^ l1 ^ u)])
        d = np.unpackbits(peer_d)[:m]
        out = np.empty(n, dtype=np.uint8)
        out[send] = l0[:ns]
        out[recv] = (lc ^ (choices & d))[:nr]
        return np.packbits(out)

    def bit_product(self, mine: U64) -> U64:
        """Arithmetic shares (Z_2^64) of ``x0 * x1`` for private bits ``x_i`` (0/1) of party i.

        One random OT per element (half the elements in each direction) plus an 8-byte
        correction: the receiver with choice ``x_r`` keeps ``m_{x_r} + x_r d`` with
        ``d = m0 - m1 + x_s``, the sender keeps ``-m0``. Two rounds.
        """
        flat = np.asarray(mine, dtype=np.uint64).ravel()
        if flat.size and int(flat.max()) > 1:
            raise ProtocolError("bit_product needs 0/1 values")
        n = flat.size
        recv, send, nr, ns = self._halves(n)
        m = max(8, ((max(nr, ns) + 7) // 8) * 8)
        choices = np.zeros(m, dtype=np.uint8)
        choices[:nr] = flat[recv].astype(np.uint8)
        m0, m1, mc = self.random_ots(m, choices)
        w0 = m0[:, :8].copy().view("<u8").astype(np.uint64).ravel()
        w1 = m1[:, :8].copy().view("<u8").astype(np.uint64).ravel()
        wc = mc[:, :8].copy().view("<u8").astype(np.uint64).ravel()
        u = np.zeros(m, dtype=np.uint64)
        u[:ns] = flat[send]
        (peer_d,) = self._exchange([w0 - w1 + u])
        out = np.empty(n, dtype=np.uint64)
        out[send] = np.uint64(0) - w0[:ns]
        out[recv] = wc[:nr] + choices[:nr].astype(np.uint64) * peer_d[:nr]
        return out.reshape(np.shape(mine))

    def matmul_triple(self, m: int, k: int, n: int) -> tuple[U64, U64, U64]:
        """A matrix Beaver triple ``(A (m,k), B (k,n), C = A @ B)`` by Gilboa with OTs: one OT
        per bit of every entry of the right operand; the sender's correction is a whole column
        of the left operand times ``2^t`` (ROT outputs expanded by AES-CTR). ``64 k n`` OTs and
        ``512 m k n`` bytes per direction; for ``n > m`` the transpose is generated instead."""
        if n > m:
            bt, at, ct = self.matmul_triple(n, k, m)  # (B^T, A^T, C^T)
            return np.ascontiguousarray(at.T), np.ascontiguousarray(bt.T), np.ascontiguousarray(ct.T)
        a = np.frombuffer(random_bytes(8 * m * k), dtype="<u8").astype(np.uint64).reshape(m, k)
        b = np.frombuffer(random_bytes(8 * k * n), dtype="<u8").astype(np.uint64).reshape(k, n)
        if m * k * n == 0:
            return a, b, np.zeros((m, n), dtype=np.uint64)
        shifts = np.arange(64, dtype=np.uint64)
        # OT index (l, j, t) -> choice bit t of my B[l, j]
        bits = ((b[:, :, None] >> shifts[None, None, :]) & np.uint64(1)).astype(np.uint8).ravel()
        total = bits.size
        padded = ((total + 7) // 8) * 8
        choices = np.zeros(padded, dtype=np.uint8)
        choices[:total] = bits
        m0, m1, mc = self.random_ots(padded, choices)
        nonce = self._nonce
        self._nonce += 1

        def expand(rows: U8) -> U64:
            out = np.empty((total, m), dtype=np.uint64)
            for o in range(total):
                key = rows[o].tobytes() * 2
                out[o] = _prg(key, nonce, 8 * m).view("<u8")
            return out

        e0, e1, ec = expand(m0), expand(m1), expand(mc)
        # correction: E0 - E1 + A[:, l] * 2^t, for OT (l, j, t)
        col = np.repeat(np.repeat(a.T, n, axis=0), 64, axis=0)  # (k*n*64, m): A[:, l] for (l, j, t)
        tt = np.tile(shifts, k * n)[:, None]
        d = e0 - e1 + (col << tt)
        (peer_d,) = self._exchange([d])
        recv = ec + bits[:, None].astype(np.uint64) * peer_d  # (k*n*64, m)
        send_share = -(e0.reshape(k, n, 64, m).sum(axis=(0, 2), dtype=np.uint64))  # (n, m)
        recv_share = recv.reshape(k, n, 64, m).sum(axis=(0, 2), dtype=np.uint64)
        from veil.crypto.mpc_ring import ring_matmul

        c = ring_matmul(a, b) + (send_share + recv_share).T
        return a, b, np.ascontiguousarray(c)

    def bit_mul(self, bit_share: U64, x_share: U64) -> U64:
        """Shares of ``b * x`` where ``b`` in {0, 1} is arithmetically shared (``bit_share``)
        and ``x`` is shared (``x_share``), both of the same shape.

        ``b = lsb(b0) xor lsb(b1)``; party i's term ``(c0 xor c1) x_i`` is one correlated OT with
        party i as sender (``m0`` kept as ``c_i x_i - m0``, correction
        ``m0 - m1 + (1 - 2 c_i) x_i``) and the other party choosing with its ``c_j``. One OT per
        element per direction + 8 bytes: ~64x cheaper than a Beaver triple from OTs. 2 rounds.
        """
        bflat = np.asarray(bit_share, dtype=np.uint64).ravel()
        xflat = np.asarray(x_share, dtype=np.uint64).ravel()
        if bflat.shape != xflat.shape:
            raise ProtocolError("bit_mul: shapes differ")
        n = bflat.size
        m = max(8, ((n + 7) // 8) * 8)
        c = np.zeros(m, dtype=np.uint8)
        c[:n] = (bflat & np.uint64(1)).astype(np.uint8)
        x = np.zeros(m, dtype=np.uint64)
        x[:n] = xflat
        m0, m1, mc = self.random_ots(m, c)
        w0 = m0[:, :8].copy().view("<u8").astype(np.uint64).ravel()
        w1 = m1[:, :8].copy().view("<u8").astype(np.uint64).ravel()
        wc = mc[:, :8].copy().view("<u8").astype(np.uint64).ravel()
        cu = c.astype(np.uint64)
        corr = w0 - w1 + (np.uint64(1) - (cu << np.uint64(1))) * x
        (peer_corr,) = self._exchange([corr])
        mine = cu * x - w0  # as sender
        got = wc + cu * peer_corr  # as receiver: m_c (+ correction if c = 1)
        return (mine + got)[:n].reshape(np.shape(x_share))
