"""Conversions between HE ciphertexts (key owned by one party) and 2-party additive shares.

Roles: the **key owner** K holds the HE secret key; the **holder** H holds ciphertexts under K's
public key and can never decrypt them.

``ss_to_he`` (shares -> ciphertexts at H): K encrypts its own share, H adds its share as a
plaintext. Each slot then holds ``x_K + x_H`` as an integer in ``[0, 2^65)``, which is
congruent to ``x`` modulo 2^64 (the wrap-around of the share sum is *not* removed: doing that
exactly costs a comparison). Additions and plaintext multiplications keep the congruence, so
after summing ``m`` such values the slot holds a non-negative integer below ``2^(65 + log2 m)``
and ``he_to_ss`` with ``value_bits = 65 + ceil(log2 m)`` returns correct shares of the sum
modulo 2^64. For genuinely signed HE values (encrypted directly by a party) pass their
magnitude bound as ``value_bits``.

``he_to_ss`` (ciphertexts at H -> shares): H re-randomises the ciphertexts (K could otherwise
recover the encryption randomness and learn which ciphertexts were combined), adds a mask
``r = 2^v + U[0, 2^(v+40))`` per slot as a big integer (never reduced mod 2^64 before
decryption), and sends them to K. K decrypts ``x + r`` (statistically hiding: distance
``<= 2^-40`` per slot), range-checks it (``HEError`` if outside what an in-range value can give)
and keeps ``(x + r) mod 2^64``; H keeps ``-r mod 2^64``.

Packing: ``slots`` values of ``slot_bits`` each share one plaintext (value of slot j times
``2^(j*slot_bits)``), which divides ciphertext count, bandwidth and decryptions by ``slots``.
Requires ``slots * slot_bits <= pk.plaintext_bits - 1`` and, for ``he_to_ss``,
``slot_bits >= value_bits + 41``. ``max_slots(pk, value_bits)`` says how many fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from veil.crypto.he import CiphertextArray, HEPublicKey, HESecretKey
from veil.crypto.mpc import MPC
from veil.crypto.random import random_int_array
from veil.crypto.sharing import AShare
from veil.errors import ConfigError, HEError, InputError, ProtocolError

__all__ = [
    "SHARE_SUM_BITS",
    "STAT_SEC",
    "he_to_ss",
    "max_slots",
    "pack",
    "slot_bits_for",
    "ss_to_he",
    "unpack",
]

log = logging.getLogger("veil.crypto")

STAT_SEC = 40
"""Statistical security parameter: masks are this many bits wider than the values."""
SHARE_SUM_BITS = 65
"""``ss_to_he`` slots hold ``x_K + x_H < 2^65``."""

_MOD = 1 << 64


def slot_bits_for(value_bits: int) -> int:
    """Slot width that ``he_to_ss`` needs for values with ``|x| < 2^value_bits``."""
    return value_bits + STAT_SEC + 1


def max_slots(pk: HEPublicKey, value_bits: int) -> int:
    """How many ``he_to_ss``-ready slots fit in one plaintext of ``pk``."""
    return max(1, (pk.plaintext_bits - 1) // slot_bits_for(value_bits))


def pack(values: Sequence[int], slots: int, slot_bits: int) -> list[int]:
    """Pack integers (signed allowed) ``slots`` per plaintext: ``sum_j v_j 2^(j*slot_bits)``.

    The length is padded with zeros to a multiple of ``slots``.
    """
    if slots < 1 or slot_bits < 1:
        raise InputError("slots and slot_bits must be positive")
    vals = list(values)
    if slots == 1:
        return vals
    pad = (-len(vals)) % slots
    vals.extend([0] * pad)
    out = []
    for i in range(0, len(vals), slots):
        acc = 0
        for j in range(slots - 1, -1, -1):
            acc = (acc << slot_bits) + vals[i + j]
        out.append(acc)
    return out


def unpack(packed: Sequence[int], slots: int, slot_bits: int) -> list[int]:
    """Inverse of :func:`pack` for non-negative slot contents."""
    if slots == 1:
        return list(packed)
    mask = (1 << slot_bits) - 1
    out = []
    for v in packed:
        for _ in range(slots):
            out.append(v & mask)
            v >>= slot_bits
    return out


def _check_layout(pk: HEPublicKey, slots: int, slot_bits: int) -> None:
    if slots < 1:
        raise ConfigError("slots must be >= 1")
    if slots * slot_bits > pk.plaintext_bits - 1:
        raise ConfigError(
            f"{slots} slots of {slot_bits} bits do not fit the {pk.plaintext_bits}-bit plaintext of "
            f"this {pk.key_bits}-bit key (max {max(1, (pk.plaintext_bits - 1) // slot_bits)})"
        )


def _ct_to_array(ct: CiphertextArray) -> np.ndarray:
    return np.frombuffer(ct.to_bytes(), dtype=np.uint8)


def ss_to_he(
    mpc: MPC,
    x: AShare,
    pk: HEPublicKey,
    *,
    key_owner: int,
    slots: int = 1,
    slot_bits: int | None = None,
) -> CiphertextArray | None:
    """Move shares of ``x`` (flattened) into ciphertexts under ``key_owner``'s ``pk``, delivered
    to the other party. Returns the ciphertexts at the holder, ``None`` at the key owner.

    Slot ``j`` of ciphertext ``i`` encodes element ``i * slots + j`` as ``x_K + x_H`` (in
    ``[0, 2^65)``, congruent to ``x`` mod 2^64). Default ``slot_bits``: room for 2^20
    additions before :func:`he_to_ss` (``slot_bits_for(65 + 20)``). One message.
    """
    if key_owner not in (0, 1):
        raise InputError("key_owner must be 0 or 1")
    sb = slot_bits if slot_bits is not None else slot_bits_for(SHARE_SUM_BITS + 20)
    if slots > 1 and sb < SHARE_SUM_BITS + 1:
        raise ConfigError(f"slot_bits must be >= {SHARE_SUM_BITS + 1}")
    _check_layout(pk, slots, sb)
    ints = [int(v) for v in x.values.ravel().tolist()]
    if mpc.party == key_owner:
        ct = pk.encrypt(pack(ints, slots, sb))
        mpc._send([_ct_to_array(ct)])
        return None
    (data,) = mpc._recv(1)
    if data.dtype != np.uint8:
        raise ProtocolError("ss_to_he: malformed ciphertext frame")
    ct = CiphertextArray.from_bytes(pk, data.tobytes())
    expected = -(-len(ints) // slots) if ints else 0
    if len(ct) != expected:
        raise ProtocolError(f"ss_to_he: got {len(ct)} ciphertexts, expected {expected}")
    if expected == 0:
        return ct
    return ct + pack(ints, slots, sb)


def he_to_ss(
    mpc: MPC,
    ct: CiphertextArray | None,
    owner_secret: HESecretKey | None,
    *,
    value_bits: int = SHARE_SUM_BITS + 20,
    slots: int = 1,
    slot_bits: int | None = None,
    count: int | None = None,
    frac_bits: int | None = None,
    pk: HEPublicKey | None = None,
) -> AShare:
    """Convert ciphertexts (at the holder, who passes ``ct``) under the key owner's key (who
    passes ``owner_secret``) to additive shares mod 2^64 of the (slot) values.

    ``value_bits``: every slot value satisfies ``|x| < 2^value_bits``. ``count``: number of
    elements to keep (drops slot padding; default all ``len(ct) * slots``). Both parties get an
    :class:`AShare` with ``frac_bits`` (default ``mpc.frac``). One message.
    """
    if (ct is None) == (owner_secret is None):
        raise InputError("he_to_ss: pass ct (holder) or owner_secret (key owner), exactly one")
    frac = mpc.frac if frac_bits is None else frac_bits
    sb = slot_bits if slot_bits is not None else slot_bits_for(value_bits)
    if sb < slot_bits_for(value_bits):
        raise ConfigError(
            f"slot_bits={sb} leaves no room for a {STAT_SEC}-bit statistical mask over "
            f"{value_bits}-bit values (need >= {slot_bits_for(value_bits)})"
        )
    if ct is not None:
        _check_layout(ct.pk, slots, sb)
        n = len(ct)
        total = n * slots
        keep = total if count is None else int(count)
        if not 0 <= keep <= total:
            raise InputError(f"count={keep} is outside [0, {total}]")
        offset = 1 << value_bits
        masks = [offset + r for r in random_int_array(total, value_bits + STAT_SEC)] if total else []
        masked = ct.rerandomize() + pack(masks, slots, sb) if n else ct
        mpc._send([_ct_to_array(masked), np.array([keep], dtype=np.int64)])
        share = np.array([(-m) % _MOD for m in masks[:keep]], dtype=np.uint64)
        return AShare(share, mpc.party, frac)
    if owner_secret is None:  # pragma: no cover - guarded above
        raise InputError("missing secret key")
    key = pk or owner_secret.public
    (data, keep_arr) = mpc._recv(2)
    if data.dtype != np.uint8 or keep_arr.shape != (1,):
        raise ProtocolError("he_to_ss: malformed frame")
    masked = CiphertextArray.from_bytes(key, data.tobytes())
    _check_layout(key, slots, sb)
    keep = int(keep_arr[0])
    if not 0 <= keep <= len(masked) * slots:
        raise ProtocolError("he_to_ss: element count out of range")
    plain = owner_secret.decrypt(masked) if len(masked) else []
    limit_total = 1 << (slots * sb)
    for v in plain:
        if v < 0 or v >= limit_total:
            raise HEError("he_to_ss: decrypted value out of range (value wider than value_bits?)")
    vals = unpack(plain, slots, sb)
    hi = (1 << (value_bits + STAT_SEC)) + (1 << (value_bits + 1))
    out = np.empty(keep, dtype=np.uint64)
    for i in range(keep):
        v = vals[i]
        if v >= hi:
            raise HEError(
                f"he_to_ss: slot {i} decrypts outside the range of a {value_bits}-bit value plus mask"
            )
        out[i] = v % _MOD
    return AShare(out, mpc.party, frac)
