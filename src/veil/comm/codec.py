"""Typed wire codec: frozen msgspec structs over MessagePack, numpy arrays as extension types.

Frame layout (all integers little-endian)::

    b"VL"  u8 version (=1)  u8 tag_len  tag (utf-8, tag_len bytes)  msgpack body

The body is the msgspec MessagePack encoding of a :class:`Message` (a tagged struct, so the
tag also appears inside the body as the ``type`` field). The tag in the header lets the
receiver refuse a message of an unexpected type before touching the body, with an error that
names what was expected and what arrived.

numpy arrays travel as MessagePack extension type ``1``::

    u8 version (=1)  u8 ndim  u16 dtype_len  dtype (ascii, numpy ``dtype.str``, little-endian)
    ndim x u64 shape  raw C-order little-endian bytes

Object arrays are refused (they would need pickle). Nothing in this module ever pickles.
Decoding a frame held in a writable buffer (``bytearray``) gives arrays that are zero-copy
views into it; a read-only buffer (``bytes``) gives arrays that own a copy, so decoded arrays
are always writable.
"""

from __future__ import annotations

import struct
import threading
import typing
from collections.abc import Iterable
from typing import Any, TypeVar, cast

import msgspec
import numpy as np

from veil.errors import ProtocolError, ResourceLimitError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "NDARRAY_EXT_CODE",
    "Codec",
    "Message",
    "decode",
    "encode",
    "message_tag",
    "peek_tag",
]

DEFAULT_MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB
NDARRAY_EXT_CODE = 1

_MAGIC = b"VL"
_FRAME_VERSION = 1
_ARRAY_VERSION = 1
_ARRAY_HEAD = struct.Struct("<BBH")
_U64 = struct.Struct("<Q")

M = TypeVar("M", bound="Message")


class Message(msgspec.Struct, frozen=True, tag=True):
    """Base of every wire message: a frozen, tagged msgspec struct.

    Subclasses inherit ``frozen`` and ``tag`` (the tag is the class name unless the subclass
    sets ``tag="..."``). Fields may be int/float/str/bytes/bool/list/dict/Optional, nested
    structs, and numpy arrays (``np.ndarray``, any non-object dtype). The field name ``type``
    is reserved for the tag.
    """


def message_tag(cls: type[Message]) -> str:
    """The wire tag of a message class (its class name unless overridden)."""
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str):
        raise ProtocolError(f"{cls.__qualname__} has a non-string tag {tag!r}")
    return tag


def _check_message_type(cls: object) -> type[Message]:
    if not (isinstance(cls, type) and issubclass(cls, Message)):
        raise ProtocolError(f"{cls!r} is not a veil.comm.Message subclass")
    return cls


# ---------------------------------------------------------------------------------- arrays


def _encode_array(arr: np.ndarray[Any, Any]) -> msgspec.msgpack.Ext:
    dt = arr.dtype
    if dt.hasobject:
        raise ProtocolError(f"numpy arrays of dtype {dt} cannot be sent (object dtype would need pickle)")
    if dt.fields is not None:
        raise ProtocolError(
            f"structured numpy dtype {dt} is not supported on the wire; send one array per field"
        )
    if dt.byteorder == ">" or (dt.byteorder == "=" and not _LITTLE):
        dt = dt.newbyteorder("<")
        arr = arr.astype(dt)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    dstr = dt.str.encode("ascii")
    if arr.ndim > 255:
        raise ProtocolError(f"array with {arr.ndim} dimensions cannot be sent (max 255)")
    head = _ARRAY_HEAD.pack(_ARRAY_VERSION, arr.ndim, len(dstr)) + dstr
    head += b"".join(_U64.pack(int(s)) for s in arr.shape)
    buf = bytearray(len(head) + arr.nbytes)
    buf[: len(head)] = head
    if arr.nbytes:
        buf[len(head) :] = arr.reshape(-1).view(np.uint8).data
    return msgspec.msgpack.Ext(NDARRAY_EXT_CODE, buf)


_LITTLE = np.little_endian


def _decode_array(data: memoryview) -> np.ndarray[Any, Any]:
    try:
        version, ndim, dlen = _ARRAY_HEAD.unpack_from(data, 0)
    except struct.error as exc:
        raise ProtocolError("truncated numpy array header") from exc
    if version != _ARRAY_VERSION:
        raise ProtocolError(f"unsupported numpy array encoding version {version}")
    off = _ARRAY_HEAD.size
    if len(data) < off + dlen + 8 * ndim:
        raise ProtocolError("truncated numpy array header")
    try:
        dstr = bytes(data[off : off + dlen]).decode("ascii")
        dt = np.dtype(dstr)
    except (UnicodeDecodeError, TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid numpy dtype on the wire: {bytes(data[off:off + dlen])!r}") from exc
    if dt.hasobject or dt.fields is not None or dt.str != dstr:
        raise ProtocolError(f"refused numpy dtype on the wire: {dstr!r}")
    off += dlen
    shape = tuple(_U64.unpack_from(data, off + 8 * i)[0] for i in range(ndim))
    off += 8 * ndim
    count = 1
    for s in shape:
        count *= s
    if count * dt.itemsize != len(data) - off:
        raise ProtocolError(
            f"numpy array payload is {len(data) - off} bytes, expected {count * dt.itemsize} "
            f"for shape {shape} and dtype {dstr}"
        )
    raw = data[off:]
    if dt.itemsize == 0:
        arr = np.zeros(shape, dtype=dt)
    else:
        arr = np.frombuffer(raw, dtype=dt, count=count).reshape(shape)
    if raw.readonly:
        arr = arr.copy()
    if dt.byteorder == "<" and not _LITTLE:  # pragma: no cover - big-endian hosts
        arr = arr.astype(dt.newbyteorder("="))
    return arr


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_array(obj)
    if isinstance(obj, np.generic):
        if isinstance(obj, np.object_):
            raise ProtocolError("numpy object scalars cannot be sent")
        return obj.item()
    raise NotImplementedError(f"values of type {type(obj).__name__} cannot be sent over a veil channel")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == NDARRAY_EXT_CODE:
        return _decode_array(data)
    raise ProtocolError(f"unknown MessagePack extension type {code}")


def _annotated_scalar(typ: Any) -> type[np.generic] | None:
    """The scalar type of an ``npt.NDArray[np.uint64]``-style annotation (None if unconstrained)."""
    args = typing.get_args(typ)
    if len(args) != 2:
        return None
    inner = typing.get_args(args[1])
    if len(inner) != 1:
        return None
    scalar = typing.get_origin(inner[0]) or inner[0]
    if isinstance(scalar, type) and issubclass(scalar, np.generic) and scalar is not np.generic:
        return scalar
    return None


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is np.ndarray or typing.get_origin(typ) is np.ndarray:
        if not isinstance(obj, np.ndarray):
            raise ValueError(f"expected a numpy array, got {type(obj).__name__}")
        want = _annotated_scalar(typ)
        if want is not None and not issubclass(obj.dtype.type, want):
            raise ValueError(f"expected a numpy array of {want.__name__}, got dtype {obj.dtype}")
        return obj
    raise NotImplementedError(f"type {typ!r} is not supported by the veil codec")


# ---------------------------------------------------------------------------------- frames


def _split_frame(data: bytes | bytearray | memoryview) -> tuple[str, memoryview]:
    view = memoryview(data)
    if len(view) < 4 or bytes(view[:2]) != _MAGIC:
        raise ProtocolError("malformed frame: bad magic (not a veil message)")
    if view[2] != _FRAME_VERSION:
        raise ProtocolError(f"malformed frame: unsupported frame version {view[2]}")
    tlen = view[3]
    if len(view) < 4 + tlen:
        raise ProtocolError("malformed frame: truncated header")
    try:
        tag = bytes(view[4 : 4 + tlen]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("malformed frame: tag is not utf-8") from exc
    return tag, view[4 + tlen :]


def peek_tag(data: bytes | bytearray | memoryview) -> str:
    """The tag in a frame's header, without decoding the body (ProtocolError if malformed)."""
    return _split_frame(data)[0]


class Codec:
    """Encoder/decoder for :class:`Message` frames with a maximum message size.

    Thread-safe; decoders are cached per tuple of expected types.
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes <= 0:
            raise ResourceLimitError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self.max_message_bytes = max_message_bytes
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._decoders: dict[tuple[type[Message], ...], msgspec.msgpack.Decoder[Any]] = {}
        self._lock = threading.Lock()

    def encode(self, msg: Message) -> bytes:
        """Encode one message into a frame (ProtocolError / ResourceLimitError)."""
        if not isinstance(msg, Message):
            raise ProtocolError(f"only veil.comm.Message structs can be sent, got {type(msg).__name__}")
        tag = message_tag(type(msg)).encode("utf-8")
        if len(tag) > 255:
            raise ProtocolError(f"message tag too long ({len(tag)} bytes)")
        try:
            body = self._encoder.encode(msg)
        except ProtocolError:
            raise
        except (NotImplementedError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"cannot encode {type(msg).__name__}: {exc}") from exc
        size = 4 + len(tag) + len(body)
        if size > self.max_message_bytes:
            raise ResourceLimitError(
                f"{type(msg).__name__} is {size} bytes, above the limit of {self.max_message_bytes} bytes"
            )
        return b"".join((_MAGIC, bytes((_FRAME_VERSION, len(tag))), tag, body))

    def _decoder(self, types: tuple[type[Message], ...]) -> msgspec.msgpack.Decoder[Any]:
        dec = self._decoders.get(types)
        if dec is None:
            target: Any = types[0] if len(types) == 1 else typing.Union[types]  # noqa: UP007
            try:
                dec = msgspec.msgpack.Decoder(target, ext_hook=_ext_hook, dec_hook=_dec_hook)
            except TypeError as exc:
                raise ProtocolError(f"cannot build a decoder for {types}: {exc}") from exc
            with self._lock:
                self._decoders[types] = dec
        return dec

    def decode(
        self, data: bytes | bytearray | memoryview, types: type[M] | tuple[type[Message], ...]
    ) -> M:
        """Decode one frame, accepting only the given message type(s).

        Raises ResourceLimitError if the frame is larger than ``max_message_bytes`` and
        ProtocolError if it is malformed, invalid, or of another type (naming both).
        """
        if len(data) > self.max_message_bytes:
            raise ResourceLimitError(
                f"incoming message is {len(data)} bytes, above the limit of {self.max_message_bytes} bytes"
            )
        tys = _normalize_types(types)
        by_tag = {message_tag(t): t for t in tys}
        tag, body = _split_frame(data)
        if tag not in by_tag:
            raise ProtocolError(f"expected {_names(tys)}, got a {tag!r} message")
        try:
            msg = self._decoder(tys).decode(body)
        except ProtocolError:
            raise
        except msgspec.ValidationError as exc:
            raise ProtocolError(f"invalid {tag} message: {exc}") from exc
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(f"malformed {tag} message: {exc}") from exc
        if message_tag(type(msg)) != tag:
            raise ProtocolError(f"frame header says {tag!r} but the body is a {message_tag(type(msg))!r}")
        return cast(M, msg)


def _normalize_types(types: type[Message] | tuple[type[Message], ...] | Iterable[type[Message]]) -> tuple[
    type[Message], ...
]:
    if isinstance(types, type):
        return (_check_message_type(types),)
    tys = tuple(_check_message_type(t) for t in types)
    if not tys:
        raise ProtocolError("no expected message type given")
    return tys


def _names(types: tuple[type[Message], ...]) -> str:
    names = [message_tag(t) for t in types]
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


_DEFAULT = Codec()


def encode(msg: Message) -> bytes:
    """Encode a message with the default codec (1 GiB limit)."""
    return _DEFAULT.encode(msg)


def decode(data: bytes | bytearray | memoryview, types: type[M] | tuple[type[Message], ...]) -> M:
    """Decode a frame with the default codec, accepting only ``types``."""
    return _DEFAULT.decode(data, types)
