"""HE backend ``heu``: SecretFlow HEU (``sf-heu``), schemes OU (Okamoto-Uchiyama) and ZPaillier.

Everything goes through HEU's numpy batch API (``heu.numpy``): arrays are encoded with the
``BigintEncoder`` (exact Python ints of any sign and width up to the plaintext bound), and all
arithmetic, bucket sums (``batch_feature_wise_bucket_sum``) and selections run in C++ on whole
arrays — no per-element Python loops.

Randomness caveat: HEU generates its keys and encryption randomness inside its C++ library
(yacl's CSPRNG); it cannot draw from :mod:`veil.crypto.random`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import numpy as np
import numpy.typing as npt

try:
    from heu import numpy as hnp
    from heu import phe
except ImportError as _exc:  # pragma: no cover - exercised only where sf-heu is absent
    raise ImportError(f"sf-heu is not installed ({_exc})") from _exc

from veil.crypto.he.base import (
    CiphertextArray,
    HEKeyPair,
    HEPublicKey,
    HESecretKey,
    IntsLike,
    as_int_list,
)
from veil.crypto.he.registry import HEBackend
from veil.errors import HEError, InputError

__all__ = ["HeuBackend", "HeuCiphertextArray", "HeuPublicKey", "HeuSecretKey"]

_SCHEMES: dict[str, Any] = {"ou": phe.SchemaType.OU, "paillier": phe.SchemaType.ZPaillier}
_KB = struct.Struct(">H")
_INT8_BINS = 128  # HEU's order map is int8


def _err(what: str, exc: Exception) -> HEError:
    msg = str(exc).split("\n", 1)[0]
    return HEError(f"heu {what} failed: {msg}")


class HeuPublicKey(HEPublicKey):
    backend: ClassVar[str] = "heu"

    def __init__(self, scheme: str, key_bits: int, pk: Any, kit: Any) -> None:
        self.scheme = scheme
        self.key_bits = key_bits
        self._pk = pk
        self._kit = kit
        self._encoder = kit.bigint_encoder()
        self._encryptor = kit.encryptor()
        self._evaluator = kit.evaluator()
        self._pt_bits = int(pk.plaintext_bound()).bit_length() - 1
        self._bytes: bytes | None = None

    @property
    def plaintext_bits(self) -> int:
        return self._pt_bits

    def _payload(self) -> bytes:
        return _KB.pack(self.key_bits) + bytes(self._pk.serialize())

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            self._bytes = super().to_bytes()
        return self._bytes

    # plaintext arrays ------------------------------------------------------------------
    def _pt(self, values: list[int] | npt.NDArray[Any]) -> Any:
        """Encode validated ints (a range-checked list, or an int64/uint64 array, which goes
        straight to C++) to a heu PlaintextArray."""
        if isinstance(values, np.ndarray):
            arr = values.reshape(-1)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
        try:
            return self._kit.array(arr, self._encoder)
        except Exception as exc:
            raise _err("encode", exc) from None

    def encrypt(self, values: IntsLike) -> HeuCiphertextArray:
        pt_in: list[int] | npt.NDArray[Any]
        if isinstance(values, np.ndarray) and values.dtype in (np.int64, np.uint64):
            pt_in = values
        elif (
            isinstance(values, np.ndarray)
            and values.dtype != object
            and np.issubdtype(values.dtype, np.integer)
        ):
            pt_in = values.astype(np.int64)
        else:
            pt_in = as_int_list(values)
            self.check_range(pt_in)
        pt = self._pt(pt_in)
        try:
            return HeuCiphertextArray(self, self._encryptor.encrypt(pt))
        except Exception as exc:
            raise _err("encrypt", exc) from None


class HeuSecretKey(HESecretKey):
    def __init__(self, public: HeuPublicKey, sk: Any, kit: Any) -> None:
        self.public: HeuPublicKey = public
        self._sk = sk
        self._decryptor = kit.decryptor()

    def decrypt(self, ct: CiphertextArray) -> list[int]:
        self.check_owner(ct)
        if not isinstance(ct, HeuCiphertextArray):
            raise HEError("not a heu ciphertext array")
        if len(ct) == 0:
            return []
        try:
            # range check also blocks the OU plaintext-overflow attack (see HEU docs)
            pt = self._decryptor.decrypt_in_range(ct.arr, self.public.plaintext_bits)
        except Exception as exc:
            raise _err(
                f"decrypt (value outside +-2**{self.public.plaintext_bits}, wrong key or corrupted?)", exc
            ) from None
        out: list[int] = pt.to_numpy().reshape(-1).tolist()
        return out

    def _payload(self) -> bytes:
        return bytes(self._sk.serialize())


class HeuCiphertextArray(CiphertextArray):
    def __init__(self, pk: HeuPublicKey, arr: Any) -> None:
        shape = tuple(arr.shape)
        if len(shape) == 2 and shape[1] == 1:
            arr = arr[:, 0]
        elif len(shape) != 1:
            raise HEError(f"heu ciphertext array must be 1-D, got shape {shape}")
        self.pk: HeuPublicKey = pk
        self.arr = arr

    def __len__(self) -> int:
        return int(self.arr.shape[0])

    def _wrap(self, arr: Any) -> HeuCiphertextArray:
        return HeuCiphertextArray(self.pk, arr)

    def _ev(self, op: str, *args: Any) -> HeuCiphertextArray:
        try:
            return self._wrap(getattr(self.pk._evaluator, op)(*args))
        except Exception as exc:
            raise _err(op, exc) from None

    def _empty(self) -> HeuCiphertextArray:
        # HEU crashes (segfault) on some operations over empty arrays: never hand it one
        return self.pk.encrypt(np.zeros(0, dtype=np.int64))

    def _bcast(self, other: HeuCiphertextArray) -> tuple[Any, Any]:
        a, b = self.arr, other.arr
        if len(self) == 1 and len(other) > 1:
            a = a[[0] * len(other)]
        elif len(other) == 1 and len(self) > 1:
            b = b[[0] * len(self)]
        return a, b

    def _add_ct(self, other: CiphertextArray) -> CiphertextArray:
        if len(self) == 0 or len(other) == 0:
            return self._empty()
        return self._ev("add", *self._bcast(cast(HeuCiphertextArray, other)))

    def _sub_ct(self, other: CiphertextArray) -> CiphertextArray:
        if len(self) == 0 or len(other) == 0:
            return self._empty()
        return self._ev("sub", *self._bcast(cast(HeuCiphertextArray, other)))

    def _add_plain(self, ints: list[int]) -> CiphertextArray:
        if len(self) == 0:
            return self._empty()
        return self._ev("add", self.arr, self.pk._pt(ints))

    def _mul_plain(self, ints: list[int]) -> CiphertextArray:
        if len(self) == 0:
            return self._empty()
        return self._ev("mul", self.arr, self.pk._pt(ints))

    def __mul__(self, other: IntsLike) -> CiphertextArray:
        # fast path for int64 numpy multipliers (no Python-int conversion)
        if isinstance(other, np.ndarray) and other.dtype == np.int64:
            if other.size not in (1, len(self)):
                raise InputError(f"plaintext operand of length {other.size} does not match {len(self)}")
            if len(self) == 0:
                return self._empty()
            return self._ev("mul", self.arr, self.pk._pt(other))
        return super().__mul__(other)

    def _take(self, idx: list[int] | slice) -> CiphertextArray:
        if len(self) == 0 or (isinstance(idx, list) and not idx):
            return self._empty()
        if isinstance(idx, slice) and len(range(*idx.indices(len(self)))) == 0:
            return self._empty()
        try:
            return self._wrap(self.arr[idx])
        except Exception as exc:
            raise _err("index", exc) from None

    def sum(self) -> CiphertextArray:
        return self.select_sums([list(range(len(self)))])

    def select_sums(self, groups: Sequence[Sequence[int] | npt.NDArray[np.integer[Any]]]) -> CiphertextArray:
        n = len(self)
        lists: list[list[int]] = []
        for g in groups:
            gl = np.asarray(g, dtype=np.int64).reshape(-1)
            if gl.size and (int(gl.min()) < 0 or int(gl.max()) >= n):
                raise InputError(f"select_sums index out of range for length {n}")
            lists.append(gl.tolist())
        if not lists:
            return self._empty()
        if n == 0 or not any(lists):
            return self.pk.encrypt(np.zeros(len(lists), dtype=np.int64))
        return self._ev("batch_select_sum", self.arr, lists)

    def _bucket_sums(
        self, bins: npt.NDArray[np.int64], n_bins: int, masks: list[npt.NDArray[np.bool_]]
    ) -> list[CiphertextArray]:
        n, n_feat = bins.shape
        if n == 0:
            zero = self.pk.encrypt(np.zeros(n_feat * n_bins, dtype=np.int64))
            return [zero.rerandomize() for _ in masks]
        if n_bins <= _INT8_BINS:
            order = np.ascontiguousarray(bins.astype(np.int8))
            subs = [np.ascontiguousarray(m.astype(np.int8).reshape(1, n)) for m in masks]
            try:
                res = self.pk._evaluator.batch_feature_wise_bucket_sum(self.arr, subs, order, n_bins, False)
            except Exception as exc:
                raise _err("bucket sum", exc) from None
            return [self._wrap(r) for r in res]
        # wide histograms: group indices per (feature, bin) with numpy, one batch_select_sum each
        out: list[CiphertextArray] = []
        for m in masks:
            groups: list[npt.NDArray[np.int64]] = []
            rows = np.flatnonzero(m)
            for f in range(n_feat):
                col = bins[rows, f]
                order_idx = np.argsort(col, kind="stable")
                bounds = np.searchsorted(col[order_idx], np.arange(n_bins + 1))
                sorted_rows = rows[order_idx]
                groups.extend(sorted_rows[bounds[k] : bounds[k + 1]] for k in range(n_bins))
            out.append(self.select_sums(groups))
        return out

    def rerandomize(self) -> CiphertextArray:
        if len(self) == 0:
            return self
        zeros = self.pk.encrypt(np.zeros(len(self), dtype=np.int64))
        return self._ev("add", self.arr, zeros.arr)

    def _payload(self) -> bytes:
        if len(self) == 0:
            return b""
        try:
            return bytes(self.arr.serialize())
        except Exception as exc:
            raise _err("serialize", exc) from None

    @classmethod
    def _concat(cls, parts: Sequence[CiphertextArray]) -> CiphertextArray:
        hparts = [p for p in parts if isinstance(p, HeuCiphertextArray)]
        total = sum(len(p) for p in hparts)
        first = next((p for p in hparts if len(p)), None)
        if first is None:
            return hparts[0]
        try:
            res = first.arr[[0] * total]
            pos = 0
            for p in hparts:
                if len(p):
                    res[pos : pos + len(p)] = p.arr
                    pos += len(p)
        except Exception as exc:
            raise _err("concat", exc) from None
        return first._wrap(res)


class HeuBackend(HEBackend):
    name: ClassVar[str] = "heu"
    schemes: ClassVar[tuple[str, ...]] = ("ou", "paillier")
    requires: ClassVar[str] = "sf-heu"

    def keygen(self, scheme: str, key_bits: int) -> HEKeyPair:
        st = _SCHEMES.get(scheme)
        if st is None:
            raise HEError(f"heu backend supports schemes {sorted(_SCHEMES)}, not {scheme!r}")
        try:
            kit = hnp.setup(st, key_bits)
        except Exception as exc:
            raise _err("keygen", exc) from None
        pk = HeuPublicKey(scheme, key_bits, kit.public_key(), kit)
        return HEKeyPair(pk, HeuSecretKey(pk, kit.secret_key(), kit))

    def public_key_from_bytes(self, scheme: str, payload: bytes) -> HEPublicKey:
        if scheme not in _SCHEMES or len(payload) < _KB.size:
            raise HEError(f"malformed heu public key (scheme {scheme!r})")
        (key_bits,) = _KB.unpack_from(payload)
        try:
            pk = phe.PublicKey.load_from(payload[_KB.size :])
            kit = hnp.setup(pk)
        except Exception as exc:
            raise _err("public key parsing", exc) from None
        if kit.get_schema() != _SCHEMES[scheme]:
            raise HEError(f"heu public key is not a {scheme} key")
        return HeuPublicKey(scheme, key_bits, pk, kit)

    def secret_key_from_bytes(self, pk: HEPublicKey, payload: bytes) -> HESecretKey:
        if not isinstance(pk, HeuPublicKey):
            raise HEError("not a heu public key")
        try:
            sk = phe.SecretKey.load_from(payload)
            kit = hnp.HeKit(phe.setup(pk._pk, sk))
        except Exception as exc:
            raise _err("secret key parsing", exc) from None
        full_pk = HeuPublicKey(pk.scheme, pk.key_bits, pk._pk, kit)
        return HeuSecretKey(full_pk, sk, kit)

    def ciphertexts_from_bytes(self, pk: HEPublicKey, count: int, payload: bytes) -> CiphertextArray:
        if not isinstance(pk, HeuPublicKey):
            raise HEError("not a heu public key")
        if count == 0:
            if payload:
                raise HEError("ciphertext count mismatch: header says 0, payload is not empty")
            return pk.encrypt(np.zeros(0, dtype=np.int64))
        try:
            arr = hnp.CiphertextArray.load_from(payload)
        except Exception as exc:
            raise _err("ciphertext parsing", exc) from None
        ct = HeuCiphertextArray(pk, arr)
        if len(ct) != count:
            raise HEError(f"ciphertext count mismatch: header says {count}, payload has {len(ct)}")
        return ct
