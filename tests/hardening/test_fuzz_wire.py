"""Fuzzing the binary wire decoders: comm codec, boost messages, tune frames, tee evidence/quotes.

Every malformed input must raise a VeilError subclass (nothing else), stay within a memory
bound (the peak heap growth is traced per case) and finish within a per-example deadline.
Counts: VEIL_FUZZ_EXAMPLES (default 200; `make fuzz` runs 5000).
"""

from __future__ import annotations

import struct
import time
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.comm import Message
from veil.comm.codec import NDARRAY_EXT_CODE, Codec, message_tag
from veil.crypto.random import random_bytes
from veil.crypto.session import SecureSession
from veil.errors import DecryptionError, ProtocolError

from .campaign import fuzz_call
from .conftest import fuzz_settings

# ------------------------------------------------------------------------- generators

DTYPES = [
    "<u8", "<i8", "<f4", "<f8", "|u1", "|i1", "|b1", "<u2", "<c16", "<f2",  # valid
    "|S0", "|V0", "<U0", "|S3", "|V8", "<M8[ns]", "<m8[s]", "|O", ">u8", "=u8", "u8", "", "xx",
    "<u8\x00", "[('a','<u4')]", "<U2", "<f16", "\xff",
]
SIZES = st.sampled_from(
    [0, 1, 2, 3, 7, 8, 255, 1 << 16, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
)


@st.composite
def array_ext(draw: st.DrawFn) -> msgspec.msgpack.Ext:
    """A numpy extension payload with a plausible-or-hostile header."""
    version = draw(st.sampled_from([1, 1, 1, 0, 2, 255]))
    ndim = draw(st.sampled_from([0, 1, 2, 3, 33, 64, 255]) | st.integers(0, 8))
    dstr = draw(st.sampled_from(DTYPES)).encode("latin-1")
    dlen = draw(st.sampled_from([len(dstr), len(dstr), 0, 65535]) | st.integers(0, 20))
    shape = draw(st.lists(SIZES | st.integers(0, 5), min_size=0, max_size=min(ndim, 70)))
    head = struct.pack("<BBH", version, ndim, dlen) + dstr + b"".join(struct.pack("<Q", s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    try:
        item = np.dtype(dstr.decode("latin-1")).itemsize
    except Exception:
        item = 1
    exact = n * item if n * item <= 4096 else 0
    body = draw(st.sampled_from([exact, exact, 0, 1, 17]) | st.integers(0, 64))
    data = head + draw(st.binary(min_size=body, max_size=body))
    cut = draw(st.none() | st.integers(0, len(data)))
    return msgspec.msgpack.Ext(NDARRAY_EXT_CODE, data if cut is None else data[:cut])


SCALARS = (
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40)
)
VALUES = st.recursive(
    SCALARS | array_ext() | st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=16)),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def _frame(tag: str, body: bytes) -> bytes:
    t = tag.encode()
    return b"VL" + bytes((1, len(t))) + t + body


@st.composite
def structured_body(draw: st.DrawFn, cls: type[Message]) -> bytes:
    """A msgpack map that has the message's field names, with hostile values."""
    fields = list(cls.__struct_fields__)
    doc: dict[str, Any] = {"type": draw(st.sampled_from([message_tag(cls), message_tag(cls), "other", 7]))}
    for f in fields:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing field
        doc[f] = draw(VALUES)
    if draw(st.booleans()):
        doc[draw(st.text(max_size=6))] = draw(SCALARS)
    return msgspec.msgpack.encode(doc)


def _fuzz_decode(decoder: str, codec: Codec, frame: bytes, types: Any) -> None:
    fuzz_call(decoder, lambda: codec.decode(frame, types), input_len=len(frame))


# ------------------------------------------------------------------------- comm codec


class Probe(Message, frozen=True, tag="hardening.probe"):
    stage: str
    values: np.ndarray
    many: list[np.ndarray]
    n: int
    blob: bytes
    opt: dict[str, int] | None = None


CODEC = Codec(max_message_bytes=1 << 20)


@fuzz_settings()
@given(body=structured_body(Probe))
def test_fuzz_codec_structured_bodies(body: bytes) -> None:
    _fuzz_decode("comm.codec", CODEC, _frame("hardening.probe", body), Probe)


@fuzz_settings()
@given(header=st.binary(max_size=8), body=st.binary(max_size=300))
def test_fuzz_codec_raw_bytes(header: bytes, body: bytes) -> None:
    _fuzz_decode("comm.codec", CODEC, header + body, Probe)
    _fuzz_decode("comm.codec", CODEC, _frame("hardening.probe", body), Probe)


def test_codec_zero_itemsize_dtype_huge_shape() -> None:
    """A zero-itemsize dtype (|V0, |S0) passes the byte-count check with any shape: it must not
    make numpy build an array of 2**63 elements (or raise a non-veil error)."""
    for dstr in (b"|V0", b"|S0", b"<U0"):
        head = struct.pack("<BBH", 1, 2, len(dstr)) + dstr + struct.pack("<QQ", 1 << 62, 1 << 62)
        body = msgspec.msgpack.encode(
            {"type": "hardening.probe", "stage": "", "values": msgspec.msgpack.Ext(1, head), "many": [],
             "n": 0, "blob": b""}
        )
        out = fuzz_call("comm.codec", lambda b=body: CODEC.decode(_frame("hardening.probe", b), Probe))
        if not isinstance(out, ProtocolError):
            assert out.values.size <= 1 << 20, out.values.shape


def test_codec_oversized_frame_refused_before_parsing() -> None:
    small = Codec(max_message_bytes=4096)
    big = _frame("hardening.probe", b"\x00" * 5000)
    out = fuzz_call("comm.codec", lambda: small.decode(big, Probe))
    assert type(out).__name__ == "ResourceLimitError"


# ------------------------------------------------------------------------- boost messages


def _boost_types() -> list[type[Message]]:
    import veil.boost.messages as bm

    return [getattr(bm, n) for n in bm.__all__ if isinstance(getattr(bm, n), type)]


BOOST_CODEC = Codec(max_message_bytes=1 << 20)


@fuzz_settings()
@given(data=st.data())
def test_fuzz_boost_messages(data: st.DataObject) -> None:
    types = _boost_types()
    cls = data.draw(st.sampled_from(types))
    body = data.draw(structured_body(cls) | st.binary(max_size=200))
    _fuzz_decode("boost.messages", BOOST_CODEC, _frame(message_tag(cls), body), cls)
    # and through the union the protocol uses when it accepts several
    _fuzz_decode("boost.messages", BOOST_CODEC, _frame(message_tag(cls), body), tuple(types))


_HE: dict[str, Any] = {}


def _he_material(backend: str) -> tuple[Any, bytes, bytes]:
    """(public key, serialized public key, serialized ciphertexts) of a small test key."""
    if backend not in _HE:
        from veil.crypto import he

        scheme = "ou" if backend == "heu" else "paillier"
        kp = he.keygen(scheme=scheme, key_bits=1024, backend=backend)
        _HE[backend] = (kp.public, kp.public.to_bytes(), kp.public.encrypt([1, -2, 3]).to_bytes())
    return _HE[backend]


def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        if not b:
            break
        op = data.draw(st.sampled_from(["flip", "cut", "u32", "insert"]))
        pos = data.draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            b = b[:pos]
        elif op == "u32" and pos + 4 <= len(b):
            b[pos : pos + 4] = struct.pack("<I", data.draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF])))
            if data.draw(st.booleans()):
                b[pos : pos + 4] = b[pos : pos + 4][::-1]
        else:
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


@fuzz_settings(0.5, deadline_ms=5000)
@given(data=st.data())
def test_fuzz_boost_he_payloads(data: st.DataObject) -> None:
    """CiphertextBatch.data carries serialized ciphertexts or the peer's public key; both are
    parsed by the HE layer: mutated bytes → HEError/InputError, never another exception."""
    from veil.crypto.he.base import CiphertextArray, HEPublicKey

    backend = data.draw(st.sampled_from(["heu", "phe"]))
    pk, pk_bytes, ct_bytes = _he_material(backend)
    ct_bad = _mutate(data, ct_bytes)
    fuzz_call("boost.ciphertexts", lambda: CiphertextArray.from_bytes(pk, ct_bad), input_len=len(ct_bad),
              time_limit=5)
    pk_bad = _mutate(data, pk_bytes)
    fuzz_call("boost.public_key", lambda: HEPublicKey.from_bytes(pk_bad), input_len=len(pk_bad), time_limit=5)


# ------------------------------------------------------------------------- tune frames


def _session_pair() -> tuple[SecureSession, SecureSession]:
    secret = random_bytes(32)
    return (
        SecureSession.from_shared_secret(secret, initiator=True, transcript=b"t"),
        SecureSession.from_shared_secret(secret, initiator=False, transcript=b"t"),
    )


@fuzz_settings()
@given(frame=st.binary(max_size=200), flip=st.integers(0, 10_000))
def test_fuzz_tune_sealed_frames(frame: bytes, flip: int) -> None:
    """The enclave's first decoder: SecureSession.decrypt of a Sealed frame → DecryptionError."""
    from veil.tune.messages import AAD_TO_ENCLAVE

    client, enclave = _session_pair()
    out = fuzz_call("tune.sealed", lambda: enclave.decrypt(frame, AAD_TO_ENCLAVE), input_len=len(frame))
    assert isinstance(out, DecryptionError)
    good = bytearray(client.encrypt(b"inner request", AAD_TO_ENCLAVE))
    good[flip % len(good)] ^= 1 << (flip % 8)
    out = fuzz_call("tune.sealed", lambda: enclave.decrypt(bytes(good), AAD_TO_ENCLAVE), input_len=len(good))
    assert isinstance(out, DecryptionError)
    assert enclave.messages_received == 0  # a rejected frame never advances the counter


TUNE_CODEC = Codec(max_message_bytes=1 << 20)


@fuzz_settings()
@given(data=st.data())
def test_fuzz_tune_inner_frames(data: st.DataObject) -> None:
    """What the enclave decodes after decryption (a compromised client can send anything)."""
    from veil.tune.messages import INNER_REPLIES, INNER_REQUESTS

    types = data.draw(st.sampled_from([INNER_REQUESTS, INNER_REPLIES]))
    cls = data.draw(st.sampled_from(types))
    body = data.draw(structured_body(cls) | st.binary(max_size=200))
    _fuzz_decode("tune.inner", TUNE_CODEC, _frame(message_tag(cls), body), types)


# ------------------------------------------------------------------------- tee


TEE_CODEC = Codec(max_message_bytes=1 << 20)


@fuzz_settings()
@given(data=st.data())
def test_fuzz_tee_kex_messages(data: st.DataObject) -> None:
    from veil.tee import AttestedOffer, Evidence, KexFinish, KexRequest

    cls = data.draw(st.sampled_from([Evidence, AttestedOffer, KexFinish, KexRequest]))
    body = data.draw(structured_body(cls) | st.binary(max_size=200))
    _fuzz_decode("tee.kex", TEE_CODEC, _frame(message_tag(cls), body), cls)


@pytest.fixture(scope="module")
def pki() -> Any:
    from veil.tee.dcap.testing import TestPKI

    return TestPKI.create()


@pytest.fixture(scope="module")
def good_quotes(pki: Any) -> list[bytes]:
    import hashlib

    mre, mrs = hashlib.sha256(b"e").digest(), hashlib.sha256(b"s").digest()
    return [
        pki.sgx_quote(mr_enclave=mre, mr_signer=mrs, report_data=b"r" * 64),
        pki.tdx_quote(mr_td=hashlib.sha384(b"td").digest(), report_data=b"r" * 64),
    ]


@fuzz_settings()
@given(raw=st.binary(max_size=1200))
def test_fuzz_dcap_parse_quote_random(raw: bytes) -> None:
    from veil.tee.dcap import parse_quote

    fuzz_call("tee.dcap.parse_quote", lambda: parse_quote(raw), input_len=len(raw))


@fuzz_settings()
@given(data=st.data())
def test_fuzz_dcap_quote_mutations(good_quotes: list[bytes], data: st.DataObject) -> None:
    """Mutated real quotes: parse_quote and the full evidence path refuse with VeilErrors."""
    from veil.tee.dcap import evidence_from_quote, parse_quote

    blob = _mutate(data, data.draw(st.sampled_from(good_quotes)))
    fuzz_call("tee.dcap.parse_quote", lambda: parse_quote(blob), input_len=len(blob))
    fuzz_call(
        "tee.dcap.evidence", lambda: evidence_from_quote(blob, timestamp=time.time()), input_len=len(blob)
    )


@fuzz_settings(0.5, deadline_ms=4000)
@given(data=st.data())
def test_fuzz_dcap_verifier_on_mutated_quotes(
    pki: Any, good_quotes: list[bytes], data: st.DataObject
) -> None:
    """The whole DCAP verification (own chain path) on mutated quotes: only AttestationError."""
    from veil.errors import AttestationError
    from veil.tee import Evidence, Policy, SgxPolicy, Verifier

    raw = bytearray(data.draw(st.sampled_from(good_quotes)))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    now = time.time()
    ev = Evidence(backend="sgx-dcap", measurement="00", report_data=b"r" * 64, timestamp=now, debug=False,
                  simulated=False, quote=bytes(raw))
    pol = Policy(allow_any_measurement=True,
                 sgx=SgxPolicy(trusted_root_der=pki.root_der, accepted_tcb_statuses={"NotEvaluated"}))
    out = fuzz_call("tee.verifier", lambda: Verifier(pol, clock=lambda: now).verify(ev), input_len=len(raw),
                    time_limit=5)
    assert isinstance(out, AttestationError), "a flipped bit anywhere must invalidate the quote"


@fuzz_settings()
@given(data=st.data())
def test_fuzz_simulated_evidence_fields(data: st.DataObject, tmp_path_factory: Any) -> None:
    """Simulated evidence with hostile fields: the verifier refuses with AttestationError only."""
    from veil.errors import AttestationError
    from veil.tee import Evidence, Policy, Verifier

    ev = Evidence(
        backend=data.draw(st.sampled_from(["simulated", "sgx-dcap", "tdx-dcap", "sev-snp", "", "x" * 300])),
        measurement=data.draw(st.text(max_size=70)),
        report_data=data.draw(st.binary(max_size=80)),
        timestamp=data.draw(st.floats(allow_nan=True, allow_infinity=True)),
        debug=data.draw(st.booleans()),
        simulated=data.draw(st.booleans()),
        quote=data.draw(st.binary(max_size=64)),
        signature=data.draw(st.binary(max_size=80)),
        platform_key=data.draw(st.binary(max_size=40)),
        collateral=data.draw(st.binary(max_size=40)),
    )
    pol = Policy(allow_any_measurement=True, allow_simulated=True, trust_any_simulated_platform=True)
    out = fuzz_call("tee.verifier", lambda: Verifier(pol).verify(ev), input_len=200)
    assert isinstance(out, AttestationError)
