"""Correlated randomness for 2-party MPC over Z_2^64, with the trust assumption in the name.

A :class:`TripleSource` hands one party its share of

* Beaver triples ``(a, b, c = a*b)`` (elementwise, any shape);
* matrix triples ``(A, B, C = A @ B)``;
* boolean AND triples, bit-packed (``np.packbits`` layout), XOR-shared;
* masked-matrix correlations for products with a matrix one party holds in plaintext: the
  holder gets a uniform ``A`` (n, k) once (it then sends ``E = M - A`` once); every later vector
  batch gets the non-holder a fresh uniform ``B`` (n, c) and both parties shares of
  ``C = A^T B`` (k, c).

Sources (``.trust`` says which assumption you are making):

* :class:`TrustedDealer` (``trust="dealer"``): a third process (:func:`run_dealer`, CLI
  ``veil boost dealer``) sends party 0 one 32-byte PRG seed and party 1 a seed plus, per
  request, only the correction values (``c1 = a*b - c0``). Fast and tiny on the wire, but
  **weaker trust**: the dealer must not collude with either party (it could reconstruct every
  mask it generated). The dealer never sees data.
* :class:`LocalDealer` (``trust="dealer (in-process, TEST ONLY)"``): the same generator in one
  process, for unit tests and benchmarks of the online phase only.
* :class:`veil.crypto.triples_he.HomomorphicTriples` (``trust="homomorphic"``): dealer-free,
  the two parties generate everything themselves with additively homomorphic encryption.

Both parties must request correlations in the same order (MPC code does this by construction).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from veil.comm import Channel, Message
from veil.crypto.mpc_ring import PRG, U8, U64, ring_matmul
from veil.crypto.random import random_bytes
from veil.errors import ChannelClosed, InputError, PeerError, ProtocolError

__all__ = [
    "DealerBye",
    "DealerRequest",
    "DealerResponse",
    "DealerSeed",
    "LocalDealer",
    "TripleSource",
    "TrustedDealer",
    "run_dealer",
]

log = logging.getLogger("veil.crypto")

Shape = int | tuple[int, ...]


def _shape(shape: Shape) -> tuple[int, ...]:
    shp = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shp):
        raise InputError(f"negative dimension in shape {shp}")
    return shp


@runtime_checkable
class TripleSource(Protocol):
    """One party's supply of correlated randomness (see module docstring)."""

    trust: str
    party: int

    def beaver(self, shape: Shape) -> tuple[U64, U64, U64]: ...

    def matmul_triple(self, m: int, k: int, n: int) -> tuple[U64, U64, U64]: ...

    def bit_triples(self, nbytes: int) -> tuple[U8, U8, U8]: ...

    def matrix_mask(self, n: int, k: int, holder: int) -> tuple[int, U64 | None]: ...

    def matrix_vector_triple(self, ctx: int, cols: int) -> tuple[U64 | None, U64]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# wire messages of the dealer protocol
class DealerSeed(Message, frozen=True):
    party: int
    seed: bytes


class DealerRequest(Message, frozen=True):
    counter: int
    kind: str
    dims: list[int]


class DealerResponse(Message, frozen=True):
    counter: int
    arrays: list[np.ndarray]


class DealerBye(Message, frozen=True):
    reason: str = ""


_KINDS = {"beaver", "matmul", "bits", "pm_setup", "pm_vec"}
_MAX_ELEMS = 1 << 28  # per request (2 GiB of uint64): bounds what a peer can make the dealer allocate


class _DealerCore:
    """Generates both parties' correlations from their two seeds; returns party 1's corrections."""

    def __init__(self, seed0: bytes, seed1: bytes) -> None:
        self.prg = (PRG(seed0), PRG(seed1))
        self._masks: dict[int, tuple[int, int, int, U64]] = {}

    def correction(self, req: DealerRequest) -> list[Any]:
        if req.kind not in _KINDS:
            raise ProtocolError(f"dealer: unknown request kind {req.kind!r}")
        dims = [int(d) for d in req.dims]
        if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) > _MAX_ELEMS:
            raise ProtocolError(f"dealer: invalid dimensions {dims}")
        s0 = self.prg[0].stream(req.counter)
        s1 = self.prg[1].stream(req.counter)
        if req.kind == "beaver":
            shp = tuple(dims)
            a0, b0, c0 = s0.u64(shp), s0.u64(shp), s0.u64(shp)
            a1, b1 = s1.u64(shp), s1.u64(shp)
            return [(a0 + a1) * (b0 + b1) - c0]
        if req.kind == "matmul":
            if len(dims) != 3:
                raise ProtocolError("dealer: matmul needs (m, k, n)")
            m, k, n = dims
            a0, b0, c0 = s0.u64((m, k)), s0.u64((k, n)), s0.u64((m, n))
            a1, b1 = s1.u64((m, k)), s1.u64((k, n))
            return [ring_matmul(a0 + a1, b0 + b1) - c0]
        if req.kind == "bits":
            (nb,) = dims
            x0, y0, z0 = s0.u8(nb), s0.u8(nb), s0.u8(nb)
            x1, y1 = s1.u8(nb), s1.u8(nb)
            return [((x0 ^ x1) & (y0 ^ y1)) ^ z0]
        if req.kind == "pm_setup":
            if len(dims) != 3 or dims[2] not in (0, 1):
                raise ProtocolError("dealer: pm_setup needs (n, k, holder)")
            n, k, holder = dims
            a = (s0 if holder == 0 else s1).u64((n, k))
            # kept transposed (k, n) and contiguous: every pm_vec product A^T B then reads
            # contiguous contraction blocks (see mpc_ring.ring_matmul)
            self._masks[req.counter] = (n, k, holder, np.ascontiguousarray(a.T))
            return []
        # pm_vec
        if len(dims) != 2 or dims[0] not in self._masks:
            raise ProtocolError("dealer: pm_vec for an unknown matrix context")
        ctx, cols = dims
        n, k, holder, a_t = self._masks[ctx]
        other = 1 - holder
        b = (s0 if other == 0 else s1).u64((n, cols))
        c0 = s0.u64((k, cols))
        return [ring_matmul(a_t, b) - c0]

    def drop(self, ctx: int) -> None:
        self._masks.pop(ctx, None)


#: elementwise Beaver triples / AND-triple bytes fetched per pool refill (see _SeededSource)
POOL_BEAVER = 1 << 18
POOL_BITS = 1 << 18


class _Pool:
    """A run of one kind of elementwise correlation, handed out front to back (each element once)."""

    def __init__(self, arrays: tuple[Any, ...]) -> None:
        self.arrays = arrays
        self.pos = 0

    def left(self) -> int:
        return int(self.arrays[0].size) - self.pos

    def take(self, count: int) -> tuple[Any, ...]:
        sl = slice(self.pos, self.pos + count)
        self.pos += count
        return tuple(a[sl] for a in self.arrays)


class _SeededSource:
    """Party-side generator shared by :class:`TrustedDealer` and :class:`LocalDealer`.

    Small elementwise requests (Beaver triples up to ``pool_beaver // 2`` elements, AND
    triples up to ``pool_bits // 2`` bytes) are served from pools of ``pool_beaver`` elements /
    ``pool_bits`` bytes, each fetched with ONE dealer request: split finding makes thousands
    of small requests per tree, and each would otherwise cost party 1 a synchronous round
    trip to the dealer. Both parties consume their pools in the same order (MPC code requests
    in the same order by construction), a pool's remainder is dropped by both when a request
    does not fit, and every element is used once, so the correlations are exactly those of
    one request per call.
    """

    trust = "dealer"

    def __init__(
        self,
        party: int,
        seed: bytes,
        fetch: Callable[[DealerRequest], list[Any]],
        *,
        pool_beaver: int = POOL_BEAVER,
        pool_bits: int = POOL_BITS,
    ) -> None:
        if party not in (0, 1):
            raise InputError(f"party must be 0 or 1, got {party!r}")
        self.party = party
        self._prg = PRG(seed)
        self._fetch = fetch
        self._counter = 0
        self._masks: dict[int, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self.pool_beaver = int(pool_beaver)
        self.pool_bits = int(pool_bits)
        self._pools: dict[str, _Pool | None] = {"beaver": None, "bits": None}
        self.requests = 0  # dealer requests made (pool refills count once)

    def _pooled(self, kind: str, count: int, size: int) -> tuple[Any, ...] | None:
        """``count`` elements of ``kind`` from its pool (refilled with one request of ``size``),
        or None when the request is too large for pooling."""
        if size <= 0 or not 0 < count <= size // 2:
            return None
        pool = self._pools[kind]
        if pool is None or pool.left() < count:
            fresh = self._beaver_direct((size,)) if kind == "beaver" else self._bits_direct(size)
            pool = self._pools[kind] = _Pool(fresh)
        return pool.take(count)

    def _next(self, kind: str, dims: list[int]) -> DealerRequest:
        with self._lock:
            req = DealerRequest(self._counter, kind, dims)
            self._counter += 1
            self.requests += 1
        return req

    def _corr(self, req: DealerRequest, count: int) -> list[Any]:
        got = self._fetch(req)
        if len(got) != count:
            raise ProtocolError(f"dealer sent {len(got)} arrays for {req.kind}, expected {count}")
        return got

    def beaver(self, shape: Shape) -> tuple[U64, U64, U64]:
        shp = _shape(shape)
        got = self._pooled("beaver", int(np.prod(shp, dtype=np.int64)), self.pool_beaver)
        if got is not None:
            return got[0].reshape(shp), got[1].reshape(shp), got[2].reshape(shp)
        return self._beaver_direct(shp)

    def _beaver_direct(self, shp: tuple[int, ...]) -> tuple[U64, U64, U64]:
        req = self._next("beaver", list(shp))
        s = self._prg.stream(req.counter)
        a, b = s.u64(shp), s.u64(shp)
        if self.party == 0:
            return a, b, s.u64(shp)
        (c,) = self._corr(req, 1)
        return a, b, _check(c, shp)

    def matmul_triple(self, m: int, k: int, n: int) -> tuple[U64, U64, U64]:
        req = self._next("matmul", [m, k, n])
        s = self._prg.stream(req.counter)
        a, b = s.u64((m, k)), s.u64((k, n))
        if self.party == 0:
            return a, b, s.u64((m, n))
        (c,) = self._corr(req, 1)
        return a, b, _check(c, (m, n))

    def bit_triples(self, nbytes: int) -> tuple[U8, U8, U8]:
        got = self._pooled("bits", int(nbytes), self.pool_bits)
        if got is not None:
            return got[0], got[1], got[2]
        return self._bits_direct(int(nbytes))

    def _bits_direct(self, nbytes: int) -> tuple[U8, U8, U8]:
        req = self._next("bits", [nbytes])
        s = self._prg.stream(req.counter)
        x, y = s.u8(nbytes), s.u8(nbytes)
        if self.party == 0:
            return x, y, s.u8(nbytes)
        (z,) = self._corr(req, 1)
        z = np.asarray(z)
        if z.dtype != np.uint8 or z.shape != (nbytes,):
            raise ProtocolError("dealer: malformed bit-triple correction")
        return x, y, z

    def matrix_mask(self, n: int, k: int, holder: int) -> tuple[int, U64 | None]:
        if holder not in (0, 1):
            raise InputError("holder must be 0 or 1")
        req = self._next("pm_setup", [n, k, holder])
        if self.party == 1:
            self._corr(req, 0)
        self._masks[req.counter] = (n, k, holder)
        if self.party == holder:
            return req.counter, self._prg.stream(req.counter).u64((n, k))
        return req.counter, None

    def matrix_vector_triple(self, ctx: int, cols: int) -> tuple[U64 | None, U64]:
        if ctx not in self._masks:
            raise InputError(f"unknown matrix context {ctx}")
        n, k, holder = self._masks[ctx]
        req = self._next("pm_vec", [ctx, cols])
        s = self._prg.stream(req.counter)
        b = s.u64((n, cols)) if self.party != holder else None
        if self.party == 0:
            return b, s.u64((k, cols))
        (c,) = self._corr(req, 1)
        return b, _check(c, (k, cols))

    def close(self) -> None:  # pragma: no cover - overridden
        pass


def _check(arr: Any, shape: tuple[int, ...]) -> U64:
    a = np.asarray(arr)
    if a.dtype != np.uint64 or a.shape != shape:
        raise ProtocolError(f"dealer correction has dtype {a.dtype} shape {a.shape}, expected uint64 {shape}")
    return a


class LocalDealer:
    """In-process dealer for TESTS ONLY: ``s0, s1 = LocalDealer.pair()``.

    Same generator as :class:`TrustedDealer`, so the online protocols are exercised exactly;
    the ``trust`` label says loudly that both seeds live in one process.
    """

    @staticmethod
    def pair() -> tuple[_LocalSource, _LocalSource]:
        seed0, seed1 = random_bytes(32), random_bytes(32)
        core = _DealerCore(seed0, seed1)
        lock = threading.Lock()

        def fetch(req: DealerRequest) -> list[Any]:
            with lock:
                return core.correction(req)

        return _LocalSource(0, seed0, fetch), _LocalSource(1, seed1, fetch)


class _LocalSource(_SeededSource):
    trust = "dealer (in-process, TEST ONLY)"

    def close(self) -> None:
        pass


class TrustedDealer(_SeededSource):
    """Client side of the trusted dealer: ``TrustedDealer(channel_to_dealer, party)``.

    WEAKER TRUST than :class:`~veil.crypto.triples_he.HomomorphicTriples`: secure only if the
    dealer process does not collude with the other party.
    """

    trust = "dealer"

    def __init__(self, channel: Channel, party: int, *, timeout: float | None = None) -> None:
        self._channel = channel
        self._timeout = timeout
        msg = channel.recv(DealerSeed, timeout=timeout)
        if msg.party != party or len(msg.seed) != 32:
            raise ProtocolError(f"dealer seed for party {msg.party} received by party {party}")
        super().__init__(party, msg.seed, self._remote)
        log.warning(
            "correlated randomness from a TRUSTED DEALER (party %d): secure only if the dealer "
            "does not collude with the other party",
            party,
        )

    def _remote(self, req: DealerRequest) -> list[Any]:
        self._channel.send(req)
        resp = self._channel.recv(DealerResponse, timeout=self._timeout)
        if resp.counter != req.counter:
            raise ProtocolError(f"dealer answered request {resp.counter}, expected {req.counter}")
        return list(resp.arrays)

    def close(self) -> None:
        try:
            self._channel.send(DealerBye("done"))
        except Exception as exc:  # closing is best effort
            log.debug("dealer bye failed: %s", exc)


def run_dealer(ch0: Channel, ch1: Channel, *, timeout: float | None = 3600.0) -> int:
    """Serve one 2-party session as the trusted dealer; returns the number of requests served.

    Party 0 gets its seed and nothing else; party 1 gets its seed and then one correction per
    request, until it says goodbye or closes the channel. Every wait has ``timeout``.
    """
    seed0, seed1 = random_bytes(32), random_bytes(32)
    core = _DealerCore(seed0, seed1)
    ch0.send(DealerSeed(0, seed0))
    ch1.send(DealerSeed(1, seed1))
    served = 0
    while True:
        try:
            msg: DealerRequest | DealerBye = ch1.recv((DealerRequest, DealerBye), timeout=timeout)
        except (ChannelClosed, PeerError):
            break
        if isinstance(msg, DealerBye):
            break
        try:
            arrays = core.correction(msg)
        except ProtocolError as exc:
            ch1.abort(str(exc))
            raise
        ch1.send(DealerResponse(msg.counter, arrays))
        served += 1
    log.info("trusted dealer served %d requests", served)
    return served
