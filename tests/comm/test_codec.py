"""Codec: round trips (hypothesis), type checks, malformed and oversized frames."""

from __future__ import annotations

import os
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from veil.comm import Codec, Message, codec
from veil.errors import ProtocolError, ResourceLimitError


class Inner(Message, frozen=True):
    name: str
    values: np.ndarray
    extra: dict[str, int] = msgspec.field(default_factory=dict)


class Outer(Message, frozen=True):
    a: np.ndarray
    items: list[Inner]
    maybe: np.ndarray | None = None
    blob: bytes = b""
    flag: bool = False
    f: float = 0.0
    n: int = 0


class Other(Message, frozen=True):
    x: int


DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
    "<U3",
    "S4",
    "datetime64[ns]",
    ">i4",
    ">f8",
]


def array_strategy() -> st.SearchStrategy[np.ndarray]:
    return st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(
            dtype=np.dtype(dt),
            shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        )
    )


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
    assert a.tobytes() == b.astype(a.dtype).tobytes()  # bit-exact (NaN payloads included)


@settings(max_examples=150, deadline=None)
@given(arr=array_strategy())
def test_array_round_trip_bit_exact(arr: np.ndarray) -> None:
    msg = Inner(name="x", values=arr)
    out = codec.decode(codec.encode(msg), Inner)
    assert_same(arr, out.values)
    assert out.values.flags.writeable


@settings(max_examples=60, deadline=None)
@given(
    a=array_strategy(),
    inner=st.lists(
        st.tuples(
            st.text(max_size=8),
            array_strategy(),
            st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1), max_size=3),
        ),
        max_size=3,
    ),
    maybe=st.none() | array_strategy(),
    blob=st.binary(max_size=64),
    n=st.integers(-(2**63), 2**64 - 1),
    f=st.floats(allow_nan=False),
)
def test_nested_struct_round_trip(a, inner, maybe, blob, n, f) -> None:
    msg = Outer(
        a=a,
        items=[Inner(name=s, values=v, extra=d) for s, v, d in inner],
        maybe=maybe,
        blob=blob,
        n=n,
        f=f,
        flag=True,
    )
    out = codec.decode(codec.encode(msg), (Other, Outer))
    assert isinstance(out, Outer)
    assert_same(a, out.a)
    assert len(out.items) == len(inner)
    for (s, v, d), got in zip(inner, out.items, strict=True):
        assert got.name == s and got.extra == d
        assert_same(v, got.values)
    if maybe is None:
        assert out.maybe is None
    else:
        assert_same(maybe, out.maybe)
    assert (out.blob, out.n, out.f, out.flag) == (blob, n, f, True)


def test_non_contiguous_and_fortran_arrays() -> None:
    base = np.arange(60, dtype=np.int32).reshape(6, 10)
    for arr in (base[:, ::3], np.asfortranarray(base), base.T):
        out = codec.decode(codec.encode(Inner(name="", values=arr)), Inner).values
        np.testing.assert_array_equal(out, arr)


def test_zero_copy_from_writable_buffer() -> None:
    arr = np.arange(1000, dtype=np.float64)
    frame = bytearray(codec.encode(Inner(name="", values=arr)))
    out = codec.decode(frame, Inner).values
    assert out.base is not None and out.flags.writeable
    # a view into the frame: changing the frame changes the array
    idx = bytes(frame).find(arr.tobytes()[:16])
    frame[idx] ^= 0xFF
    assert out[0] != 0.0


def test_numpy_scalars_become_python_values() -> None:
    out = codec.decode(codec.encode(Other(x=np.int64(7))), Other)  # type: ignore[arg-type]
    assert out.x == 7 and type(out.x) is int


def test_wrong_type_names_expected_and_got() -> None:
    frame = codec.encode(Other(x=1))
    with pytest.raises(ProtocolError, match=r"expected Inner, got a 'Other' message"):
        codec.decode(frame, Inner)
    with pytest.raises(ProtocolError, match="expected one of Inner, Outer"):
        codec.decode(frame, (Inner, Outer))


def test_header_body_mismatch_refused() -> None:
    frame = codec.encode(Other(x=1))
    forged = frame.replace(b"\x05Other", b"\x05Inner", 1)  # header says Inner, body says Other
    with pytest.raises(ProtocolError):
        codec.decode(forged, (Inner, Other))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"VL",
        b"XX\x01\x05Other",
        b"VL\x02\x05Other\x81",
        b"VL\x01\x05Other\xc1",
        b"VL\x01\x05Other\x81\xa4type\xa5Other",
        b"VL\x01\x09Oth",
    ],
)
def test_malformed_frames(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.decode(data, Other)


def test_invalid_field_value() -> None:
    body = msgspec.msgpack.encode({"type": "Other", "x": "not an int"})
    with pytest.raises(ProtocolError, match="invalid Other message"):
        codec.decode(b"VL\x01\x05Other" + body, Other)


FUZZ_EXAMPLES = int(os.environ.get("VEIL_FUZZ_EXAMPLES", "200"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 300))
def test_fuzz_corrupted_frames_only_raise_protocol_error(junk: bytes, pos: int) -> None:
    frame = bytearray(codec.encode(Outer(a=np.arange(5), items=[Inner(name="q", values=np.ones(3))])))
    frame[pos % len(frame) :] = junk
    try:
        codec.decode(bytes(frame), Outer)
    except ProtocolError:
        pass


def test_tampered_array_header_refused() -> None:
    frame = bytearray(codec.encode(Inner(name="", values=np.arange(4, dtype=np.int64))))
    i = bytes(frame).find(b"<i8")
    frame[i : i + 3] = b"|O8"
    with pytest.raises(ProtocolError):
        codec.decode(bytes(frame), Inner)
    frame[i : i + 3] = b"<i4"  # payload size no longer matches the shape
    with pytest.raises(ProtocolError, match="expected 16"):
        codec.decode(bytes(frame), Inner)


def test_object_dtype_refused() -> None:
    with pytest.raises(ProtocolError, match="object"):
        codec.encode(Inner(name="", values=np.array([1, "a"], dtype=object)))


def test_unsupported_python_value_refused() -> None:
    with pytest.raises(ProtocolError):
        codec.encode(Other(x=object()))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="Message"):
        codec.encode({"x": 1})  # type: ignore[arg-type]


def test_size_limits() -> None:
    small = Codec(max_message_bytes=1000)
    big = Inner(name="", values=np.zeros(200, dtype=np.float64))
    with pytest.raises(ResourceLimitError, match="above the limit of 1000"):
        small.encode(big)
    frame = codec.encode(big)
    with pytest.raises(ResourceLimitError):
        small.decode(frame, Inner)
    assert codec.DEFAULT_MAX_MESSAGE_BYTES == 1 << 30


def test_frozen_and_tagged() -> None:
    m = Other(x=1)
    with pytest.raises(AttributeError):
        m.x = 2  # type: ignore[misc]
    assert codec.message_tag(Other) == "Other"


class Typed(Message, frozen=True):
    u: npt.NDArray[np.uint64]
    f: npt.NDArray[np.floating[Any]] | None = None


def test_annotated_dtype_enforced() -> None:
    ok = Typed(u=np.arange(3, dtype=np.uint64), f=np.ones(2, dtype=np.float32))
    out = codec.decode(codec.encode(ok), Typed)
    assert out.u.dtype == np.uint64 and out.f is not None and out.f.dtype == np.float32
    with pytest.raises(ProtocolError, match="expected a numpy array of uint64, got dtype int64"):
        codec.decode(codec.encode(Typed(u=np.arange(3, dtype=np.int64))), Typed)
    with pytest.raises(ProtocolError, match="floating"):
        codec.decode(codec.encode(Typed(u=np.arange(3, dtype=np.uint64), f=np.arange(2))), Typed)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes_with_valid_header(junk: bytes) -> None:
    """Arbitrary bodies behind a valid header: only ProtocolError, never a crash or another error."""
    try:
        codec.decode(b"VL\x01\x05Outer" + junk, (Outer, Other))
    except ProtocolError:
        pass


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_byte_flips(flips: list[tuple[int, int]]) -> None:
    """Flipped bytes anywhere (array headers included) give a valid message or ProtocolError."""
    msg = Outer(a=np.arange(6, dtype=np.int16).reshape(2, 3), items=[Inner(name="q", values=np.ones(3))])
    frame = bytearray(codec.encode(msg))
    for pos, val in flips:
        frame[pos % len(frame)] = val
    try:
        out = codec.decode(bytes(frame), Outer)
    except ProtocolError:
        return
    assert isinstance(out, Outer) and isinstance(out.a, np.ndarray)
