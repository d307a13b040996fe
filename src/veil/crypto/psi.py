"""ECDH private set intersection (semi-honest, both parties learn the intersection).

Group: the prime-order subgroup of edwards25519 (libsodium via PyNaCl). Hash to the group:
``H(id) = map(u0) + map(u1)`` with ``u0, u1`` two domain-separated SHA-512 digests of the id and
``map`` libsodium's Elligator 2 ``crypto_core_ed25519_from_uniform`` (which clears the cofactor)
— the "random oracle" construction of RFC 9380 (sum of two maps), not a hash to a *scalar*
(which would make the PSI insecure). Each party draws a secret scalar ``k`` from
:mod:`veil.crypto.random`.

Protocol (2 rounds, symmetric)::

    both:  send shuffle([H(x)^k_self for x in ids])
    both:  send [Y^k_self for Y in peer's list]      (same order as received)
    both:  intersection = own ids whose H(x)^(kA kB) is among the peer's double-exponentiated values

The result is the list of positions (into the caller's ``ids``) of the shared ids, ordered by
``H(x)^(kA kB)`` — a common pseudo-random key — so both parties get the shared rows in the same
order. What leaks: the intersection and the size of the other set. Ids never travel in the
clear, and a non-shared id travels only as ``H(x)^k`` (pseudo-random without ``k``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from nacl import bindings as nb
from nacl.exceptions import RuntimeError as NaclRuntimeError

from veil.comm import Channel, Message
from veil.crypto.random import random_below, random_bytes
from veil.errors import InputError, ProtocolError

__all__ = ["PsiPoints", "hash_to_group", "psi_intersect"]

log = logging.getLogger("veil.crypto")

_DST = b"veil-psi-v1-edwards25519_XMD:SHA-512_ELL2_RO_"
_POINT = 32
_MAX_IDS = 50_000_000
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_PAR_MIN = 2000  # ids per thread below which threads are not worth it
T = TypeVar("T")


class PsiPoints(Message, frozen=True):
    stage: int
    points: np.ndarray  # (n, 32) uint8, compressed edwards25519 points


def hash_to_group(ident: str) -> bytes:
    """Hash an id to a point of the prime-order subgroup (sum of two Elligator 2 maps)."""
    data = ident.encode("utf-8")
    u0 = hashlib.sha512(_DST + b"\x00" + data).digest()[:32]
    u1 = hashlib.sha512(_DST + b"\x01" + data).digest()[:32]
    return bytes(nb.crypto_core_ed25519_add(
        nb.crypto_core_ed25519_from_uniform(u0), nb.crypto_core_ed25519_from_uniform(u1)
    ))


def _scalar() -> bytes:
    while True:
        k = nb.crypto_core_ed25519_scalar_reduce(random_bytes(64))
        if any(k):
            return bytes(k)


def _exp_chunk(points: Sequence[bytes], k: bytes) -> list[bytes]:
    out = []
    for p in points:
        try:
            out.append(bytes(nb.crypto_scalarmult_ed25519_noclamp(k, p)))
        except (NaclRuntimeError, ValueError, TypeError) as exc:
            raise ProtocolError(f"PSI: peer sent an invalid group element ({exc})") from exc
    return out


def _parallel(fn: Callable[[Sequence[T]], list[bytes]], items: Sequence[T]) -> list[bytes]:
    """Run ``fn`` over chunks of ``items`` in threads (libsodium calls release the GIL)."""
    workers = min(_WORKERS, max(1, len(items) // _PAR_MIN))
    if workers <= 1:
        return fn(items)
    size = -(-len(items) // workers)
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(fn, chunks))
    return [x for part in parts for x in part]


def _exp(points: Sequence[bytes], k: bytes) -> list[bytes]:
    return _parallel(lambda chunk: _exp_chunk(chunk, k), points)


def _hash_all(ids: Sequence[str]) -> list[bytes]:
    return _parallel(lambda chunk: [hash_to_group(x) for x in chunk], ids)


def _shuffle(n: int) -> list[int]:
    perm = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates with CSPRNG
        j = random_below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _to_array(points: Sequence[bytes]) -> np.ndarray:
    if not points:
        return np.zeros((0, _POINT), dtype=np.uint8)
    return np.frombuffer(b"".join(points), dtype=np.uint8).reshape(len(points), _POINT)


def _from_array(arr: np.ndarray, what: str) -> list[bytes]:
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != _POINT or arr.shape[0] > _MAX_IDS:
        raise ProtocolError(f"PSI: malformed {what}")
    raw = arr.tobytes()
    return [raw[i * _POINT:(i + 1) * _POINT] for i in range(arr.shape[0])]


def psi_intersect(
    channel: Channel, ids: Sequence[str], role: str, *, timeout: float | None = None
) -> list[int]:
    """Positions in ``ids`` of the ids both parties hold, in the same order on both sides.

    ``role`` is ``"active"`` or ``"passive"`` (the protocol is symmetric; the role only names
    the party in errors). Duplicate or non-string ids and an empty intersection raise
    :class:`~veil.errors.InputError` (on both sides for the empty intersection).
    """
    if role not in ("active", "passive"):
        raise InputError(f"PSI role must be 'active' or 'passive', got {role!r}")
    idl = list(ids)
    if any(not isinstance(x, str) for x in idl):
        raise InputError("PSI ids must be strings")
    if len(set(idl)) != len(idl):
        raise InputError(f"PSI ({role}): the id column has duplicate values")
    if len(idl) > _MAX_IDS:
        raise InputError(f"PSI: more than {_MAX_IDS} ids")
    k = _scalar()
    mine = _exp(_hash_all(idl), k)
    perm = _shuffle(len(mine))
    channel.send(PsiPoints(0, _to_array([mine[i] for i in perm])))
    peer_msg = channel.recv(PsiPoints, timeout=timeout)
    if peer_msg.stage != 0:
        raise ProtocolError("PSI: unexpected stage")
    peer_single = _from_array(peer_msg.points, "peer set")
    peer_double = _exp(peer_single, k)  # H(y)^(k_peer k) for the peer's ids, in its shuffled order
    channel.send(PsiPoints(1, _to_array(peer_double)))
    back = channel.recv(PsiPoints, timeout=timeout)
    if back.stage != 1:
        raise ProtocolError("PSI: unexpected stage")
    mine_double_shuffled = _from_array(back.points, "double-exponentiated set")
    if len(mine_double_shuffled) != len(idl):
        raise ProtocolError("PSI: peer returned a set of the wrong size")
    mine_double: list[bytes] = [b""] * len(idl)
    for pos, orig in enumerate(perm):
        mine_double[orig] = mine_double_shuffled[pos]
    theirs = set(peer_double)
    shared = [(mine_double[i], i) for i in range(len(idl)) if mine_double[i] in theirs]
    if not shared:
        raise InputError(f"PSI ({role}): the two parties have no id in common")
    shared.sort()
    log.info("PSI (%s): %d of %d ids shared", role, len(shared), len(idl))
    return [i for _, i in shared]

