"""Fuzzing the untrusted-input parsers of veil.serve: packages, KServe v2 bodies, E2E envelopes.

Whatever the bytes, the result is a parsed value or a VeilError subclass — never another
exception. ``VEIL_FUZZ_EXAMPLES`` (``make fuzz``) raises the example count.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from veil.crypto.aead import X25519KeyPair
from veil.crypto.random import random_bytes
from veil.errors import IntegrityError, VeilError
from veil.serve import signing, v2
from veil.serve.e2e import ClientE2E, ServerE2E
from veil.serve.package import build_package, decrypt_payload, read_package

EXAMPLES = int(os.environ.get("VEIL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def package(onnx_model: Path) -> tuple[bytes, bytes]:
    key = random_bytes(32)
    data = build_package(
        onnx_model,
        name="fz",
        signing_key=signing.SigningKey.generate(),
        data_key=key,
        key_id=random_bytes(16).hex(),
    )
    return data, key


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1, max_size=4
    ),
    cut=st.integers(min_value=-3, max_value=3),
)
def test_fuzz_package_mutations_are_integrity_errors(
    package: tuple[bytes, bytes], edits: list[tuple[int, int]], cut: int
) -> None:
    data, key = package
    buf = bytearray(data)
    for pos, x in edits:
        buf[pos % len(buf)] ^= x
    if cut < 0:
        buf = buf[:cut]
    elif cut > 0:
        buf += b"\x00" * cut
    assume(bytes(buf) != data)  # two edits of one byte may cancel out
    with pytest.raises(IntegrityError):
        decrypt_payload(read_package(bytes(buf)), key)


@FUZZ
@given(body=st.binary(max_size=512), hl=st.one_of(st.none(), st.integers(min_value=-5, max_value=600)))
def test_fuzz_v2_decode_random_bytes(body: bytes, hl: int | None) -> None:
    try:
        v2.decode_request(body, hl)
    except VeilError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    doc=st.fixed_dictionaries(
        {
            "inputs": st.lists(
                st.dictionaries(
                    st.sampled_from(["name", "datatype", "shape", "data", "parameters"]),
                    json_values,
                    max_size=5,
                ),
                max_size=3,
            )
        },
        optional={"id": json_values, "outputs": json_values, "parameters": json_values},
    )
)
def test_fuzz_v2_decode_structured(doc: dict[str, object]) -> None:
    import msgspec

    try:
        req = v2.decode_request(msgspec.json.encode(doc), None)
    except VeilError:
        return
    for arr in req.inputs.values():
        assert isinstance(arr, np.ndarray)


@FUZZ
@given(flip=st.integers(min_value=0), x=st.integers(min_value=1, max_value=255))
def test_fuzz_e2e_tampered_envelope_rejected(flip: int, x: int) -> None:
    ident = X25519KeyPair.generate()
    wire, _ = ClientE2E(ident.public_bytes).seal("m", "infer", b'{"inputs": []}', None)
    buf = bytearray(wire)
    buf[flip % len(buf)] ^= x
    try:
        body, _, _ = ServerE2E(ident).open(bytes(buf), "m", "infer")
    except VeilError:
        return
    raise AssertionError(f"tampered envelope accepted: {body!r}")


@pytest.mark.parametrize("shape", [[False], [True, 2], [1, True]])
def test_v2_boolean_shape_is_a_client_error(shape: list[object]) -> None:
    """Regression (fuzz campaign, 7 Dec): JSON true/false in 'shape' passed the int check (bool is
    an int subclass) and numpy's reshape raised TypeError, a 500 through the gateway."""
    import msgspec

    from veil.serve.errors import InferenceInputError

    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": [1.0, 2.0]}]}
    body = msgspec.json.encode(doc)
    with pytest.raises(InferenceInputError, match="shape must be a list of non-negative ints"):
        v2.decode_request(body, None)
