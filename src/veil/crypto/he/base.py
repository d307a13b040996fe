"""The one homomorphic-encryption interface every backend implements.

Plaintexts are Python integers (signed, possibly wider than 64 bits). A backend provides the
three classes below; protocols only ever see these types and their operators::

    ct = pk.encrypt([3, -4, 2**100])
    (ct + ct * 5 - 7).bucket_sums(bins, n_bins=16)
    sk.decrypt(ct)  # -> [3, -4, 2**100]

Arithmetic is exact as long as every intermediate value stays below ``2**pk.plaintext_bits``
in magnitude; the caller is responsible for that bound (it is not checkable on ciphertexts).
"""

from __future__ import annotations

import hashlib
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import numpy.typing as npt

from veil.errors import HEError, InputError

__all__ = [
    "CiphertextArray",
    "HEKeyPair",
    "HEPublicKey",
    "HESecretKey",
    "IntsLike",
    "as_index_list",
    "as_int_list",
    "check_bins",
]

IntsLike = Sequence[int] | npt.NDArray[Any] | int

_PK_MAGIC = b"VEILHEPK1"
_CT_MAGIC = b"VEILHECT1"
_SK_MAGIC = b"VEILHESK1"
_U32 = struct.Struct(">I")


def _pack_str(s: str) -> bytes:
    b = s.encode()
    return bytes([len(b)]) + b


def _unpack_str(data: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(data):
        raise HEError("truncated HE serialization")
    n = data[pos]
    end = pos + 1 + n
    if end > len(data):
        raise HEError("truncated HE serialization")
    try:
        return data[pos + 1 : end].decode(), end
    except UnicodeDecodeError:
        raise HEError("malformed HE serialization") from None


def as_int_list(values: IntsLike, what: str = "plaintexts") -> list[int]:
    """Validate and convert plaintext input to a flat list of Python ints.

    ``int64`` arrays are signed, ``uint64`` arrays unsigned (ring elements as 0..2^64-1),
    object arrays / sequences must hold Python or numpy integers. Floats are refused (encode
    them first with :class:`veil.crypto.encoding.FixedPoint`).
    """
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        return [int(values)]
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            values = values.reshape(-1)
        if values.dtype == object:
            out = values.tolist()
        elif np.issubdtype(values.dtype, np.integer):
            return [int(v) for v in values.tolist()]
        else:
            raise InputError(
                f"{what} must be integers, got dtype {values.dtype} (use encrypt_floats for reals)"
            )
    else:
        try:
            out = list(cast(Sequence[int], values))
        except TypeError:
            raise InputError(f"{what} must be a sequence of ints, got {type(values).__name__}") from None
    res: list[int] = []
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(
                f"{what} must be integers, got {type(v).__name__} (use encrypt_floats for reals)"
            )
        res.append(int(v))
    return res


def as_index_list(idx: Any, n: int) -> list[int] | slice:
    """Normalise an index (int, slice, int sequence/array, bool mask) for a length-``n`` array."""
    if isinstance(idx, slice):
        return idx
    if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
        i = int(idx)
        if not -n <= i < n:
            raise InputError(f"index {i} out of range for ciphertext array of length {n}")
        return [i % n]
    arr = np.asarray(idx)
    if arr.dtype == np.bool_:
        if arr.shape != (n,):
            raise InputError(f"boolean mask of shape {arr.shape} does not match length {n}")
        return [int(i) for i in np.flatnonzero(arr).tolist()]
    if arr.size == 0:
        return []
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
        raise InputError("ciphertext index must be an int, a slice, a 1-D int array or a boolean mask")
    if int(arr.min()) < -n or int(arr.max()) >= n:
        raise InputError(f"index out of range for ciphertext array of length {n}")
    return [int(i) for i in (arr % n).tolist()]


def check_bins(bins: Any, n: int, n_bins: int) -> npt.NDArray[np.int64]:
    """Validate a bin matrix for :meth:`CiphertextArray.bucket_sums`; returns ``(n, F)`` int64."""
    arr = np.asarray(bins)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"bins must be integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InputError(f"bins must have shape ({n},) or ({n}, F), got {np.asarray(bins).shape}")
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise InputError(f"n_bins must be a positive int, got {n_bins!r}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n_bins):
        raise InputError(f"bin indices must lie in [0, {n_bins})")
    return arr.astype(np.int64, copy=False)


def check_mask(mask: Any, n: int) -> npt.NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.shape != (n,):
        raise InputError(f"row mask must have shape ({n},), got {m.shape}")
    if m.dtype != np.bool_:
        if not np.issubdtype(m.dtype, np.integer) or (m.size and (m.min() < 0 or m.max() > 1)):
            raise InputError("row mask must be boolean (or 0/1 integers)")
        m = m.astype(np.bool_)
    return m


class HEPublicKey(ABC):
    """Public key: encrypts and knows the plaintext range."""

    backend: ClassVar[str]
    scheme: str
    key_bits: int

    @property
    @abstractmethod
    def plaintext_bits(self) -> int:
        """Values (and every intermediate result) must satisfy ``|v| < 2**plaintext_bits``."""

    @abstractmethod
    def encrypt(self, values: IntsLike) -> CiphertextArray:
        """Encrypt a 1-D batch of signed Python ints (or an int64/uint64 numpy array)."""

    @abstractmethod
    def _payload(self) -> bytes:
        """Backend-specific key bytes (no pickle)."""

    def to_bytes(self) -> bytes:
        return _PK_MAGIC + _pack_str(self.backend) + _pack_str(self.scheme) + self._payload()

    @staticmethod
    def from_bytes(data: bytes) -> HEPublicKey:
        """Parse a public key produced by :meth:`to_bytes` (any backend)."""
        from veil.crypto.he.registry import get_backend

        if not isinstance(data, (bytes, bytearray)) or not bytes(data).startswith(_PK_MAGIC):
            raise HEError("not a veil HE public key")
        data = bytes(data)
        backend, pos = _unpack_str(data, len(_PK_MAGIC))
        scheme, pos = _unpack_str(data, pos)
        return get_backend(backend, log=False).public_key_from_bytes(scheme, data[pos:])

    @property
    def fingerprint(self) -> bytes:
        """16 bytes identifying this key (SHA-256 of its serialization)."""
        return hashlib.sha256(self.to_bytes()).digest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HEPublicKey) and other.to_bytes() == self.to_bytes()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend}, scheme={self.scheme}, "
            f"key_bits={self.key_bits}, plaintext_bits={self.plaintext_bits})"
        )

    def check_range(self, ints: list[int]) -> None:
        if not ints:
            return
        bound = 1 << self.plaintext_bits
        hi, lo = max(ints), min(ints)
        if hi >= bound or -lo >= bound:
            raise HEError(
                f"plaintext out of range for {self.scheme} {self.key_bits}-bit key: "
                f"|value| must be < 2**{self.plaintext_bits}"
            )

    def encrypt_zeros(self, n: int) -> CiphertextArray:
        return self.encrypt(np.zeros(n, dtype=np.int64))


class HESecretKey(ABC):
    """Secret key: decrypts to exact signed Python ints."""

    public: HEPublicKey

    @abstractmethod
    def decrypt(self, ct: CiphertextArray) -> list[int]:
        """Decrypt to exact signed ints. HEError if the ciphertext is from another key or a
        value is outside the plaintext range."""

    @abstractmethod
    def _payload(self) -> bytes: ...

    def decrypt_array(self, ct: CiphertextArray) -> npt.NDArray[np.object_]:
        """Decrypt to a 1-D numpy object array of Python ints."""
        out = np.empty(len(ct), dtype=object)
        out[:] = self.decrypt(ct)
        return out

    def to_bytes(self) -> bytes:
        """SECRET key material. Only ever store it sealed / encrypted."""
        pk = self.public.to_bytes()
        return _SK_MAGIC + _U32.pack(len(pk)) + pk + self._payload()

    @staticmethod
    def from_bytes(data: bytes) -> HESecretKey:
        from veil.crypto.he.registry import get_backend

        data = bytes(data)
        if not data.startswith(_SK_MAGIC) or len(data) < len(_SK_MAGIC) + 4:
            raise HEError("not a veil HE secret key")
        pos = len(_SK_MAGIC)
        (n,) = _U32.unpack_from(data, pos)
        pk = HEPublicKey.from_bytes(data[pos + 4 : pos + 4 + n])
        return get_backend(pk.backend, log=False).secret_key_from_bytes(pk, data[pos + 4 + n :])

    def check_owner(self, ct: CiphertextArray) -> None:
        if not isinstance(ct, CiphertextArray):
            raise InputError(f"expected a CiphertextArray, got {type(ct).__name__}")
        if ct.pk is not self.public and ct.pk != self.public:
            raise HEError("ciphertext was encrypted under a different public key")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(public={self.public!r})"


class CiphertextArray(ABC):
    """A 1-D batch of ciphertexts under one public key, with homomorphic operators.

    ``ct + ct``, ``ct + ints``, ``ct - ct``, ``ct - ints``, ``ints - ct``, ``-ct``,
    ``ct * ints_or_scalar`` (plaintext multiply), ``ct[idx]``, ``len(ct)``, ``ct.sum()``.
    """

    pk: HEPublicKey
    __array_ufunc__ = None  # ``ndarray + ct`` defers to our reflected operators

    # ---- backend primitives --------------------------------------------------------------
    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def _add_ct(self, other: CiphertextArray) -> CiphertextArray: ...

    @abstractmethod
    def _sub_ct(self, other: CiphertextArray) -> CiphertextArray: ...

    @abstractmethod
    def _add_plain(self, ints: list[int]) -> CiphertextArray: ...

    @abstractmethod
    def _mul_plain(self, ints: list[int]) -> CiphertextArray: ...

    @abstractmethod
    def _take(self, idx: list[int] | slice) -> CiphertextArray: ...

    @abstractmethod
    def sum(self) -> CiphertextArray:
        """Sum of all elements, as a length-1 array."""

    @abstractmethod
    def select_sums(self, groups: Sequence[Sequence[int] | npt.NDArray[np.integer[Any]]]) -> CiphertextArray:
        """``[ct[g].sum() for g in groups]`` as one array (fast on the backend)."""

    @abstractmethod
    def _bucket_sums(
        self, bins: npt.NDArray[np.int64], n_bins: int, masks: list[npt.NDArray[np.bool_]]
    ) -> list[CiphertextArray]: ...

    @abstractmethod
    def rerandomize(self) -> CiphertextArray:
        """Same plaintexts, fresh randomness (unlinkable to the input ciphertexts)."""

    @abstractmethod
    def _payload(self) -> bytes: ...

    @classmethod
    @abstractmethod
    def _concat(cls, parts: Sequence[CiphertextArray]) -> CiphertextArray: ...

    # ---- shared behaviour ----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    def _same_key(self, other: CiphertextArray) -> None:
        if type(other) is not type(self):
            raise HEError(f"cannot combine {type(self).__name__} with {type(other).__name__}")
        if other.pk is not self.pk and other.pk != self.pk:
            raise HEError("ciphertexts are under different public keys")

    def _plain(self, other: IntsLike) -> list[int]:
        ints = as_int_list(other, "plaintext operand")
        if len(ints) not in (1, len(self)):
            raise InputError(
                f"plaintext operand of length {len(ints)} does not match {len(self)} ciphertexts"
            )
        self.pk.check_range(ints)
        return ints

    def _check_len(self, other: CiphertextArray) -> None:
        if len(other) != len(self) and len(other) != 1 and len(self) != 1:
            raise InputError(f"ciphertext arrays of lengths {len(self)} and {len(other)} do not broadcast")

    def __add__(self, other: CiphertextArray | IntsLike) -> CiphertextArray:
        if isinstance(other, CiphertextArray):
            self._same_key(other)
            self._check_len(other)
            return self._add_ct(other)
        return self._add_plain(self._plain(other))

    def __radd__(self, other: IntsLike) -> CiphertextArray:
        return self.__add__(other)

    def __sub__(self, other: CiphertextArray | IntsLike) -> CiphertextArray:
        if isinstance(other, CiphertextArray):
            self._same_key(other)
            self._check_len(other)
            return self._sub_ct(other)
        return self._add_plain([-v for v in self._plain(other)])

    def __rsub__(self, other: IntsLike) -> CiphertextArray:
        return (-self)._add_plain(self._plain(other))

    def __neg__(self) -> CiphertextArray:
        return self._mul_plain([-1])

    def __mul__(self, other: IntsLike) -> CiphertextArray:
        if isinstance(other, CiphertextArray):
            raise HEError("ciphertext * ciphertext is not supported by additive HE")
        return self._mul_plain(self._plain(other))

    def __rmul__(self, other: IntsLike) -> CiphertextArray:
        return self.__mul__(other)

    def __getitem__(self, idx: Any) -> CiphertextArray:
        return self._take(as_index_list(idx, len(self)))

    def __iter__(self) -> Any:
        raise TypeError("iterate ciphertext arrays by index ranges, not element by element")

    def __bool__(self) -> bool:
        return len(self) > 0

    def bucket_sums(self, bins: Any, n_bins: int, mask: Any = None) -> CiphertextArray:
        """Per-feature bucket sums: ``out[f * n_bins + k] = sum(ct[i] for i with bins[i, f] == k)``.

        ``bins`` has shape ``(n,)`` or ``(n, F)`` with values in ``[0, n_bins)``; ``mask``
        (optional, ``(n,)`` bool) restricts the sum to selected rows. Output length
        ``F * n_bins``, feature-major.
        """
        b = check_bins(bins, len(self), n_bins)
        masks = [check_mask(mask, len(self))] if mask is not None else [np.ones(len(self), dtype=np.bool_)]
        return self._bucket_sums(b, int(n_bins), masks)[0]

    def bucket_sums_multi(self, bins: Any, n_bins: int, masks: Sequence[Any]) -> list[CiphertextArray]:
        """:meth:`bucket_sums` for several row subsets (e.g. all tree nodes of one level) at once."""
        b = check_bins(bins, len(self), n_bins)
        ms = [check_mask(m, len(self)) for m in masks]
        if not ms:
            return []
        return self._bucket_sums(b, int(n_bins), ms)

    def to_bytes(self) -> bytes:
        """Serialize (no pickle): magic, key fingerprint, count, backend payload."""
        return _CT_MAGIC + self.pk.fingerprint + _U32.pack(len(self)) + self._payload()

    @staticmethod
    def from_bytes(pk: HEPublicKey, data: bytes) -> CiphertextArray:
        """Parse ciphertexts serialized under ``pk``; HEError if malformed or for another key."""
        from veil.crypto.he.registry import get_backend

        if not isinstance(pk, HEPublicKey):
            raise InputError("from_bytes needs the HEPublicKey the ciphertexts were made under")
        data = bytes(data)
        head = len(_CT_MAGIC) + 16 + 4
        if not data.startswith(_CT_MAGIC) or len(data) < head:
            raise HEError("not a veil HE ciphertext array")
        fp = data[len(_CT_MAGIC) : len(_CT_MAGIC) + 16]
        if fp != pk.fingerprint:
            raise HEError("ciphertexts were serialized under a different public key")
        (count,) = _U32.unpack_from(data, len(_CT_MAGIC) + 16)
        return get_backend(pk.backend, log=False).ciphertexts_from_bytes(pk, count, data[head:])

    @staticmethod
    def concat(parts: Sequence[CiphertextArray]) -> CiphertextArray:
        """Concatenate ciphertext arrays under the same key."""
        if not parts:
            raise InputError("concat needs at least one ciphertext array")
        first = parts[0]
        for p in parts[1:]:
            first._same_key(p)
        return type(first)._concat(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={len(self)}, scheme={self.pk.scheme}, backend={self.pk.backend})"


@dataclass(frozen=True)
class HEKeyPair:
    """What :func:`veil.crypto.he.keygen` returns."""

    public: HEPublicKey
    secret: HESecretKey

    @property
    def backend(self) -> str:
        return self.public.backend

    @property
    def scheme(self) -> str:
        return self.public.scheme
