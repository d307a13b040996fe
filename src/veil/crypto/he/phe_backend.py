"""HE backend ``phe``: Paillier via python-paillier key objects and gmpy2 arithmetic.

* Keys: primes drawn from :mod:`veil.crypto.random` (``gmpy2.next_prime``), wrapped in
  ``phe.PaillierPublicKey`` / ``phe.PaillierPrivateKey``; decryption is python-paillier's CRT
  ``raw_decrypt``; ciphertexts are compatible with python-paillier's ``EncryptedNumber``
  (``g = n + 1``).
* Encryption: ``c = (1 + m n) * hs^a mod n^2`` (Damgård-Jurik-Nielsen style obfuscator) with
  ``hs = h^n mod n^2`` for a public ``h = -x^2 mod n`` derived from ``n`` by hashing (no party
  chooses it) and a fresh secret exponent ``a`` of ``key_bits // 2`` bits from
  :mod:`veil.crypto.random`. ``hs^a`` uses a fixed-base table with 8-bit windows evaluated
  over whole numpy object arrays, ~15-30x faster than a full ``r^n`` per value.
* Ciphertext arrays are numpy object arrays of ``gmpy2.mpz``; add / plaintext multiply / index /
  bucket sums are vectorised over numpy where possible (no per-element Python for add/mul).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import gmpy2
import numpy as np
import numpy.typing as npt
from phe import paillier

from veil.crypto.he.base import CiphertextArray, HEKeyPair, HEPublicKey, HESecretKey, IntsLike, as_int_list
from veil.crypto.he.registry import HEBackend
from veil.crypto.random import random_bits, random_bytes
from veil.errors import HEError, InputError

__all__ = ["PheBackend", "PheCiphertextArray", "PhePublicKey", "PheSecretKey"]

_WINDOW = 8  # bits per fixed-base window: digits are exactly the random exponent's bytes
_powmod = np.frompyfunc(gmpy2.powmod, 3, 1)
_mpz = np.frompyfunc(gmpy2.mpz, 1, 1)


def _obj(values: Sequence[Any]) -> npt.NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _derive_h(n: Any) -> Any:
    """A public, verifiably unbiased unit ``h = -x^2 mod n`` with ``x = H(n, ctr)``."""
    nb = (int(n).bit_length() + 7) // 8
    nbytes = int(n).to_bytes(nb, "big")
    ctr = 0
    while True:
        stream = b""
        block = 0
        while len(stream) < nb + 16:
            stream += hashlib.sha256(
                b"veil/he/phe/h|" + nbytes + ctr.to_bytes(4, "big") + block.to_bytes(4, "big")
            ).digest()
            block += 1
        x = gmpy2.mpz(int.from_bytes(stream[: nb + 16], "big")) % n
        if x > 1 and gmpy2.gcd(x, n) == 1:
            return (-(x * x)) % n
        ctr += 1


class PhePublicKey(HEPublicKey):
    backend: ClassVar[str] = "phe"

    def __init__(self, n: int, key_bits: int | None = None) -> None:
        self.scheme = "paillier"
        self.n = gmpy2.mpz(n)
        self.n2 = self.n * self.n
        self.key_bits = key_bits if key_bits is not None else int(self.n.bit_length())
        self.phe_key = paillier.PaillierPublicKey(int(n))
        self._exp_bytes = max(16, (self.key_bits // 2 + 7) // 8)
        self._table: list[npt.NDArray[np.object_]] | None = None
        self._table_lock = threading.Lock()
        self._bytes: bytes | None = None
        self._ct_len = (int(self.n2.bit_length()) + 7) // 8

    @property
    def plaintext_bits(self) -> int:
        return int(self.n.bit_length()) - 2

    def _payload(self) -> bytes:
        return int(self.n).to_bytes((int(self.n.bit_length()) + 7) // 8, "big")

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            self._bytes = super().to_bytes()
        return self._bytes

    # encryption -----------------------------------------------------------------------
    def _fixed_base_table(self) -> list[npt.NDArray[np.object_]]:
        with self._table_lock:
            if self._table is None:
                hs = gmpy2.powmod(_derive_h(self.n), self.n, self.n2)
                table: list[npt.NDArray[np.object_]] = []
                base = hs
                for _ in range(self._exp_bytes):
                    row = [gmpy2.mpz(1)] * 256
                    acc = gmpy2.mpz(1)
                    for j in range(1, 256):
                        acc = acc * base % self.n2
                        row[j] = acc
                    table.append(_obj(row))
                    base = acc * base % self.n2  # base^256
                self._table = table
            return self._table

    def obfuscators(self, count: int) -> npt.NDArray[np.object_]:
        """``count`` fresh random n-th residues ``hs^a mod n^2``."""
        if count == 0:
            return np.empty(0, dtype=object)
        table = self._fixed_base_table()
        digits = np.frombuffer(random_bytes(count * self._exp_bytes), dtype=np.uint8).reshape(
            count, self._exp_bytes
        )
        acc = table[0][digits[:, 0]]
        for i in range(1, self._exp_bytes):
            acc = acc * table[i][digits[:, i]] % self.n2
        return cast(npt.NDArray[np.object_], acc)

    def _encode(self, ints: list[int]) -> npt.NDArray[np.object_]:
        """``g^m = 1 + (m mod n) n  (mod n^2)`` for each plaintext (mixed int/mpz -> mpz)."""
        return cast(npt.NDArray[np.object_], (_obj(ints) % self.n * self.n + 1) % self.n2)

    def encrypt(self, values: IntsLike) -> PheCiphertextArray:
        if isinstance(values, np.ndarray) and values.dtype in (np.int64, np.uint64, np.int32):
            ints: list[int] = values.reshape(-1).tolist()
        else:
            ints = as_int_list(values)
            self.check_range(ints)
        enc = self._encode(ints)
        return PheCiphertextArray(self, enc * self.obfuscators(len(ints)) % self.n2)


class PheSecretKey(HESecretKey):
    def __init__(self, public: PhePublicKey, p: int, q: int) -> None:
        self.public: PhePublicKey = public
        try:
            self._priv = paillier.PaillierPrivateKey(public.phe_key, int(p), int(q))
        except ValueError as exc:
            raise HEError(f"invalid Paillier secret key: {exc}") from None

    def decrypt(self, ct: CiphertextArray) -> list[int]:
        self.check_owner(ct)
        if not isinstance(ct, PheCiphertextArray):
            raise HEError("not a phe ciphertext array")
        n = int(self.public.n)
        half = n // 2
        bound = 1 << self.public.plaintext_bits
        out: list[int] = []
        raw = self._priv.raw_decrypt
        for c in ct.arr.tolist():
            m = int(raw(int(c)))
            if m > half:
                m -= n
            if m >= bound or -m >= bound:
                raise HEError(
                    f"decrypted value outside +-2**{self.public.plaintext_bits} "
                    "(overflow, wrong key or tampered ciphertext)"
                )
            out.append(m)
        return out

    def _payload(self) -> bytes:
        p, q = int(self._priv.p), int(self._priv.q)
        nb = (max(p.bit_length(), q.bit_length()) + 7) // 8
        return nb.to_bytes(2, "big") + p.to_bytes(nb, "big") + q.to_bytes(nb, "big")


class PheCiphertextArray(CiphertextArray):
    def __init__(self, pk: PhePublicKey, arr: npt.NDArray[np.object_]) -> None:
        self.pk: PhePublicKey = pk
        self.arr = arr.reshape(-1)

    def __len__(self) -> int:
        return int(self.arr.shape[0])

    def _wrap(self, arr: Any) -> PheCiphertextArray:
        return PheCiphertextArray(self.pk, np.asarray(arr, dtype=object))

    def _add_ct(self, other: CiphertextArray) -> CiphertextArray:
        o = cast(PheCiphertextArray, other)
        return self._wrap(self.arr * o.arr % self.pk.n2)

    def _sub_ct(self, other: CiphertextArray) -> CiphertextArray:
        o = cast(PheCiphertextArray, other)
        return self._wrap(self.arr * _powmod(o.arr, -1, self.pk.n2) % self.pk.n2)

    def _add_plain(self, ints: list[int]) -> CiphertextArray:
        return self._wrap(self.arr * self.pk._encode(ints) % self.pk.n2)

    def _mul_plain(self, ints: list[int]) -> CiphertextArray:
        k = _obj(ints)
        try:
            return self._wrap(_powmod(self.arr, k, self.pk.n2))
        except ZeroDivisionError:
            raise HEError("ciphertext is not invertible (corrupted?)") from None

    def _take(self, idx: list[int] | slice) -> CiphertextArray:
        return self._wrap(self.arr[idx])

    def _prod(self, arr: npt.NDArray[np.object_]) -> Any:
        n2 = self.pk.n2
        # pairwise tree reduction: log2(n) vectorised steps instead of n Python steps
        a = arr
        if a.size == 0:
            return gmpy2.mpz(1)
        while a.size > 1:
            if a.size % 2:
                a = np.concatenate([a, _obj([gmpy2.mpz(1)])])
            a = a[0::2] * a[1::2] % n2
        return a[0]

    def sum(self) -> CiphertextArray:
        if len(self) == 0:
            return self.pk.encrypt([0])
        return self._wrap(_obj([self._prod(self.arr)]))

    def _fresh_empty(self, res: npt.NDArray[np.object_]) -> npt.NDArray[np.object_]:
        """Empty groups multiply to the trivial ciphertext 1; give them fresh randomness."""
        empty = [i for i, v in enumerate(res.tolist()) if v == 1]
        if empty:
            res[empty] = self.pk.obfuscators(len(empty))
        return res

    def select_sums(self, groups: Sequence[Sequence[int] | npt.NDArray[np.integer[Any]]]) -> CiphertextArray:
        n = len(self)
        res = []
        for g in groups:
            gi = np.asarray(g, dtype=np.int64).reshape(-1)
            if gi.size and (int(gi.min()) < 0 or int(gi.max()) >= n):
                raise InputError(f"select_sums index out of range for length {n}")
            res.append(self._prod(self.arr[gi]))
        return self._wrap(self._fresh_empty(_obj(res)))

    def _bucket_sums(
        self, bins: npt.NDArray[np.int64], n_bins: int, masks: list[npt.NDArray[np.bool_]]
    ) -> list[CiphertextArray]:
        n_feat = bins.shape[1]
        out: list[CiphertextArray] = []
        for m in masks:
            rows = np.flatnonzero(m)
            res = np.empty(n_feat * n_bins, dtype=object)
            for f in range(n_feat):
                # accumulate all bins of one feature at once: a vectorised multiply per "round"
                # over the elements sorted by bin (segmented product)
                col = bins[rows, f]
                order = np.argsort(col, kind="stable")
                sorted_ct = self.arr[rows[order]]
                bounds = np.searchsorted(col[order], np.arange(n_bins + 1))
                for k in range(n_bins):
                    seg = sorted_ct[bounds[k] : bounds[k + 1]]
                    res[f * n_bins + k] = self._prod(seg) if seg.size else gmpy2.mpz(1)
            out.append(self._wrap(self._fresh_empty(res)))
        return out

    def rerandomize(self) -> CiphertextArray:
        return self._wrap(self.arr * self.pk.obfuscators(len(self)) % self.pk.n2)

    def _payload(self) -> bytes:
        ln = self.pk._ct_len
        return b"".join(int(c).to_bytes(ln, "big") for c in self.arr.tolist())

    @classmethod
    def _concat(cls, parts: Sequence[CiphertextArray]) -> CiphertextArray:
        ps = [cast(PheCiphertextArray, p) for p in parts]
        return PheCiphertextArray(ps[0].pk, np.concatenate([p.arr for p in ps]))


def _gen_prime(bits: int) -> Any:
    while True:
        cand = gmpy2.mpz(random_bits(bits)) | (gmpy2.mpz(3) << (bits - 2)) | 1
        p = gmpy2.next_prime(cand)
        if p.bit_length() == bits:
            return p


class PheBackend(HEBackend):
    name: ClassVar[str] = "phe"
    schemes: ClassVar[tuple[str, ...]] = ("paillier",)
    requires: ClassVar[str] = "phe, gmpy2"

    def keygen(self, scheme: str, key_bits: int) -> HEKeyPair:
        if scheme != "paillier":
            raise HEError(f"phe backend supports only the 'paillier' scheme, not {scheme!r}")
        half = key_bits // 2
        while True:
            p = _gen_prime(half)
            q = _gen_prime(key_bits - half)
            n = p * q
            if p != q and n.bit_length() == key_bits and gmpy2.gcd(n, (p - 1) * (q - 1)) == 1:
                break
        pk = PhePublicKey(int(n), key_bits)
        return HEKeyPair(pk, PheSecretKey(pk, int(p), int(q)))

    def public_key_from_bytes(self, scheme: str, payload: bytes) -> HEPublicKey:
        if scheme != "paillier":
            raise HEError(f"malformed phe public key (scheme {scheme!r})")
        n = int.from_bytes(payload, "big")
        if n.bit_length() < 512 or n % 2 == 0:
            raise HEError("phe public key modulus is implausible (too small or even)")
        return PhePublicKey(n)

    def secret_key_from_bytes(self, pk: HEPublicKey, payload: bytes) -> HESecretKey:
        if not isinstance(pk, PhePublicKey) or len(payload) < 2:
            raise HEError("malformed phe secret key")
        nb = int.from_bytes(payload[:2], "big")
        if len(payload) != 2 + 2 * nb:
            raise HEError("malformed phe secret key")
        p = int.from_bytes(payload[2 : 2 + nb], "big")
        q = int.from_bytes(payload[2 + nb :], "big")
        return PheSecretKey(pk, p, q)

    def ciphertexts_from_bytes(self, pk: HEPublicKey, count: int, payload: bytes) -> CiphertextArray:
        if not isinstance(pk, PhePublicKey):
            raise HEError("not a phe public key")
        ln = pk._ct_len
        if len(payload) != ln * count:
            raise HEError(f"ciphertext payload has {len(payload)} bytes, expected {ln * count}")
        vals = [gmpy2.mpz(int.from_bytes(payload[i * ln : (i + 1) * ln], "big")) for i in range(count)]
        n2 = pk.n2
        for v in vals:
            if not 0 < v < n2:
                raise HEError("ciphertext value outside (0, n^2)")
        return PheCiphertextArray(pk, _obj(vals))
