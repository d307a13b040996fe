"""Fuzzing the serving boundaries: schemathesis against the KMS and gateway OpenAPI specs (real
uvicorn servers on 127.0.0.1, a real attested worker behind the gateway), hypothesis against
the v2 request decoder, E2E envelopes, KMS release offers and the model package parser.

Invariants: no 5xx, responses conform to the documented schema/content type, every parser
refuses malformed input with a VeilError (in-process) or a 4xx (over HTTP).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from .campaign import FUZZ, fuzz_call
from .conftest import FUZZ_EXAMPLES, fuzz_settings
from .servestack import ADMIN_TOKEN, Stack, start_stack

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("serve-stack"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=15) as c:
        yield c


def _http_case(name: str, status: int) -> None:
    st_ = FUZZ[name]
    st_["cases"] += 1
    if status >= 500:
        st_["crashes"] += 1
    elif status >= 400:
        st_["refused"] += 1
        st_["refused_by"][str(status)] += 1
    else:
        st_["accepted"] += 1


# ------------------------------------------------------------------------- schemathesis


def _run_schemathesis(name: str, base_url: str, headers: dict[str, str], *, examples: int) -> list[str]:
    import schemathesis
    from hypothesis import HealthCheck, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert ops, "the OpenAPI spec lists no operations"
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                strat = op.as_strategy(generation_mode=mode)
            except Exception:  # an operation with nothing to make negative
                continue

            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=strat)
            def run(case: Any) -> None:
                resp = case.call(base_url=base_url, headers=headers, timeout=15)
                _http_case(name, resp.status_code)
                case.validate_response(
                    resp, checks=[not_a_server_error, response_schema_conformance, content_type_conformance]
                )

            try:
                run()
            except Unsatisfiable:  # nothing to negate in this operation (no params / free-form path)
                continue
            except Exception as exc:  # collect every operation's failure, report all at once
                what = f"{mode.value} {op.method.upper()} {op.path}"
                failures.append(f"{what}: {type(exc).__name__}: {exc}"[:800])
    return failures


def test_fuzz_schemathesis_kms(stack: Stack) -> None:
    failures = _run_schemathesis("kms.http (schemathesis)", stack.kms.url, ADMIN,
                                 examples=max(5, FUZZ_EXAMPLES // 40))
    assert not failures, "\n".join(failures)


def test_fuzz_schemathesis_gateway(stack: Stack) -> None:
    failures = _run_schemathesis("gateway.http (schemathesis)", stack.gateway_srv.url, {},
                                 examples=max(5, FUZZ_EXAMPLES // 40))
    assert not failures, "\n".join(failures)


def test_openapi_documents_error_statuses(stack: Stack, http: httpx.Client) -> None:
    """Finding H-8 (fixed by the serve engineer in 454bca6): every parametrised route declares 4xx."""
    missing = []
    for base in (stack.kms.url, stack.gateway_srv.url):
        spec = http.get(f"{base}/openapi.json").json()
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                codes = set(op.get("responses", {}))
                if not any(c.startswith("4") and c != "422" for c in codes) and "{" in path:
                    missing.append(f"{method.upper()} {path}")
    assert not missing, missing


# ------------------------------------------------------------------------- regressions


def test_regression_kms_release_odd_length_nonce(stack: Stack, http: httpx.Client) -> None:
    """An odd-length hex nonce matched the schema pattern, then bytes.fromhex raised → 500."""
    r = http.post(f"{stack.kms.url}/v1/attest/release", json={"nonce": "a" * 33, "offer": ""})
    assert r.status_code == 422, r.text


def test_regression_kms_new_key_invalid_model_name(stack: Stack, http: httpx.Client) -> None:
    """An invalid model name in the path raised a pydantic ValidationError inside the handler → 500."""
    r = http.post(f"{stack.kms.url}/v1/models/:/keys", json={"signer": "ab" * 32}, headers=ADMIN)
    assert r.status_code == 400 and "invalid model name" in r.json()["error"]


def test_regression_gateway_unknown_model_is_404(stack: Stack, http: httpx.Client) -> None:
    """An unknown model answered 503 (service unavailable: clients retry) instead of 404."""
    r = http.get(f"{stack.gateway_srv.url}/v2/models/no-such-model")
    assert r.status_code == 404 and "not found" in r.text
    r = http.post(f"{stack.gateway_srv.url}/v2/models/no-such-model/infer", json={"inputs": []})
    assert r.status_code == 404
    assert http.get(f"{stack.gateway_srv.url}/v2/models/{stack.model_name}").status_code == 200


def test_regression_gateway_metrics_label_cardinality(stack: Stack, http: httpx.Client) -> None:
    """Client-chosen model names became Prometheus label values: unbounded metric series (memory)."""
    for i in range(30):
        http.get(f"{stack.gateway_srv.url}/v2/models/probe-{i}")
    r = http.get(f"{stack.gateway_srv.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "probe-" not in r.text
    series = [ln for ln in r.text.splitlines() if ln.startswith("veil_gateway_requests_total{")]
    assert len(series) < 20, series


# ------------------------------------------------------------------------- v2 bodies

V2_DTYPES = ["FP32", "FP64", "INT64", "INT32", "UINT8", "BOOL", "BYTES", "FP16", "BF16", "INT8", "XX", ""]
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda k: st.lists(k, max_size=5) | st.dictionaries(st.text(max_size=8), k, max_size=4),
    max_leaves=20,
)


@st.composite
def v2_body(draw: st.DrawFn) -> tuple[bytes, int | None]:
    inputs = []
    binary = b""
    for _ in range(draw(st.integers(0, 3))):
        shape = draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, -1, 1 << 40]) | st.integers(0, 5), max_size=4))
        t: dict[str, Any] = {
            "name": draw(st.sampled_from(["x", "y", "", "x"]) | st.text(max_size=4)),
            "datatype": draw(st.sampled_from(V2_DTYPES)),
            "shape": draw(st.just(shape) | JSONISH),
        }
        if draw(st.booleans()):
            blob = draw(st.binary(max_size=64))
            size = draw(st.sampled_from([len(blob), len(blob), 0, len(blob) + 4, -1]) | st.integers(0, 80))
            t["parameters"] = {"binary_data_size": size}
            binary += blob
        else:
            t["data"] = draw(st.lists(st.floats(allow_nan=False, width=32) | st.integers(-5, 5), max_size=16)
                             | JSONISH)
        if draw(st.integers(0, 5)) == 0:
            t[draw(st.text(max_size=5))] = draw(JSONISH)
        inputs.append(t)
    doc: dict[str, Any] = {"inputs": inputs if draw(st.integers(0, 9)) else draw(JSONISH)}
    if draw(st.booleans()):
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries({"name": st.text(max_size=5)}) | JSONISH,
                                       max_size=3))
    if draw(st.booleans()):
        doc["parameters"] = draw(JSONISH)
    if draw(st.booleans()):
        doc["id"] = draw(JSONISH)
    head = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        head = draw(st.binary(max_size=80))
    if binary or draw(st.booleans()):
        hl = draw(st.sampled_from([len(head), len(head), 0, len(head) + 1]) | st.integers(-3, 200))
        return head + binary, hl
    return head, None


@fuzz_settings(0.5)
@given(body=v2_body())
def test_fuzz_v2_request_decoder(body: tuple[bytes, int | None]) -> None:
    """The worker's KServe v2 parser (JSON + binary extension), in process: VeilError only."""
    from veil.serve import v2

    raw, hl = body
    fuzz_call("serve.v2.decode_request", lambda: v2.decode_request(raw, hl), input_len=len(raw))


@fuzz_settings(0.5)
@given(body=v2_body())
def test_fuzz_v2_bodies_through_gateway(
    stack: Stack, http: httpx.Client, body: tuple[bytes, int | None]
) -> None:
    """The same hostile bodies over HTTP, gateway → attested worker: never a 5xx."""
    raw, hl = body
    headers = {"content-type": "application/json"}
    if hl is not None:
        headers["inference-header-content-length"] = str(hl)
    r = http.post(f"{stack.gateway_srv.url}/v2/models/{stack.model_name}/infer", content=raw, headers=headers)
    _http_case("gateway.http (v2 bodies)", r.status_code)
    assert r.status_code < 500, r.text


@fuzz_settings(0.5)
@given(data=st.data())
def test_fuzz_e2e_envelopes_through_gateway(stack: Stack, http: httpx.Client, data: st.DataObject) -> None:
    """Mutated end-to-end envelopes (client → gateway → worker): 4xx, never 5xx, never a result."""
    from veil.serve.e2e import E2E_CONTENT_TYPE, client_seal

    inner = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]})
    env, _ = client_seal(stack.worker.identity_pub, stack.model_name, "infer", inner.encode(), None)
    b = bytearray(env)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(b) - 1))
        b[pos] ^= 1 << data.draw(st.integers(0, 7))
    assume(bytes(b) != env)  # two flips of the same bit cancel out
    r = http.post(f"{stack.gateway_srv.url}/v2/models/{stack.model_name}/infer", content=bytes(b),
                  headers={"content-type": E2E_CONTENT_TYPE})
    _http_case("gateway.http (e2e envelopes)", r.status_code)
    assert 400 <= r.status_code < 500, (r.status_code, r.content[:200])


# ------------------------------------------------------------------------- KMS release offers


def _mutate(data: st.DataObject, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        if not b:
            break
        pos = data.draw(st.integers(0, len(b) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip":
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            b = b[:pos]
        else:
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=6))
    return bytes(b)


@fuzz_settings(0.5)
@given(data=st.data())
def test_fuzz_kms_release_offers(stack: Stack, http: httpx.Client, data: st.DataObject) -> None:
    """A genuine worker offer, mutated: the KMS refuses (403/4xx) and releases nothing."""
    from veil.comm import codec
    from veil.errors import VeilError
    from veil.serve.kms.wire import b64e
    from veil.tee import EnclaveKeyExchange

    nonce = http.post(f"{stack.kms.url}/v1/attest/challenge").json()["nonce"]
    offer = codec.encode(EnclaveKeyExchange(stack.worker.enclave).offer(bytes.fromhex(nonce)))
    bad = _mutate(data, offer)
    assume(bad != offer)
    try:  # a mutation of an ignored map key (e.g. the nested "type" tag) decodes to the same offer:
        same = codec.decode(bad, _offer_type()) == codec.decode(offer, _offer_type())
    except VeilError:
        same = False
    assume(not same)  # content-identical encodings are not attacks (evidence is verified semantically)
    body = {"nonce": nonce, "offer": b64e(bad), "key_ids": [], "worker_id": "fuzz"}
    r = http.post(f"{stack.kms.url}/v1/attest/release", json=body)
    _http_case("kms.http (release offers)", r.status_code)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


def _offer_type() -> Any:
    from veil.tee import AttestedOffer

    return AttestedOffer


# ------------------------------------------------------------------------- model packages


@fuzz_settings()
@given(data=st.data())
def test_fuzz_model_package_parser(stack: Stack, data: st.DataObject) -> None:
    """read_package on mutated genuine packages: PackageError (a VeilError), never accepted."""
    from veil.serve.package import read_package

    bad = _mutate(data, stack.package)
    out = fuzz_call("serve.package.read_package",
                    lambda: read_package(bad, trusted_signers={stack.signer_hex}), input_len=len(bad))
    assert bad == stack.package or not hasattr(out, "manifest"), "a modified package was accepted"


@fuzz_settings()
@given(raw=st.binary(max_size=400))
def test_fuzz_model_package_random_and_bundle(raw: bytes) -> None:
    from veil.serve.package import MAGIC, read_package, unpack_bundle

    fuzz_call("serve.package.read_package", lambda: read_package(raw), input_len=len(raw))
    fuzz_call("serve.package.read_package", lambda: read_package(MAGIC + raw), input_len=len(raw))
    fuzz_call("serve.package.unpack_bundle", lambda: unpack_bundle(raw), input_len=len(raw))


def test_package_size_cap_refuses_before_reading(tmp_path: Path) -> None:
    from veil.errors import VeilError
    from veil.serve.package import read_package

    big = tmp_path / "huge.veilpkg"
    with big.open("wb") as fh:
        fh.truncate(3 << 30)  # sparse 3 GiB file: must be refused by size, not read into memory
    out = fuzz_call("serve.package.read_package", lambda: read_package(big, max_payload=1 << 20),
                    mem_limit=64 << 20)
    assert isinstance(out, VeilError)


_ = (base64, msgspec, time)


def test_regression_package_bundle_invalid_utf8_name() -> None:
    """unpack_bundle let msgspec's UnicodeDecodeError (a file name that is not utf-8) escape."""
    from veil.errors import VeilError
    from veil.serve.package import unpack_bundle

    raw = b"\x81\xa2\xff\xfe\xc4\x01x"  # {<invalid utf-8 str>: b"x"}
    out = fuzz_call("serve.package.unpack_bundle", lambda: unpack_bundle(raw))
    assert isinstance(out, VeilError)


def test_regression_error_bodies_follow_declared_schema(stack: Stack, http: httpx.Client) -> None:
    """After the routes declared {"error", "kind"} for 4xx/503 (H-8 fix), schemathesis found bodies
    that did not follow it: FastAPI's {"detail"} for an unparsable JSON body (KMS, gateway admin
    route) and the gateway's readiness answers."""
    hdr = {**ADMIN, "content-type": "application/json"}
    r = http.post(f"{stack.kms.url}/v1/keys", content=b"\x02\xff{", headers=hdr)
    assert 400 <= r.status_code < 500 and "error" in r.json(), r.text
    r = http.get(f"{stack.gateway_srv.url}/v2/models/nope/ready")
    assert r.status_code == 404 and "error" in r.json() and r.json()["ready"] is False
    r = http.post(f"{stack.gateway_srv.url}/veil/v1/replicas", content=b"\x02\xff{",
                  headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and "error" in r.json(), r.text


def test_regression_kms_audit_since_id_overflow(stack: Stack, http: httpx.Client) -> None:
    """since_id above 2**63-1 reached SQLite and raised OverflowError → 500 (schemathesis, 500 examples)."""
    r = http.get(f"{stack.kms.url}/v1/audit", params={"since_id": str(2**70)}, headers=ADMIN)
    assert r.status_code == 422, r.text
    r = http.get(f"{stack.kms.url}/v1/audit", params={"since_id": str(2**63 - 1)}, headers=ADMIN)
    assert r.status_code == 200
