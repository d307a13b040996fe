from __future__ import annotations

import dataclasses

import msgspec
import pytest

from veil.errors import AttestationError
from veil.tee import Evidence, Policy, SimulatedEnclave, Verifier
from veil.tee.simulated import platform_public_key


@pytest.fixture
def enclave(clock) -> SimulatedEnclave:
    return SimulatedEnclave(code=[b"enclave code"], config={"model": "m"}, clock=clock)


def _policy(enclave: SimulatedEnclave, **kw) -> Policy:
    base = dict(
        allowed_measurements={enclave.measurement},
        allow_simulated=True,
        simulated_platform_keys={platform_public_key().hex()},
    )
    base.update(kw)
    return Policy(**base)


def test_accepts_with_allow_simulated(enclave, clock) -> None:
    ev = enclave.attest(b"n" * 32)
    claims = Verifier(_policy(enclave), clock=clock).verify(ev, report_data=b"n" * 32)
    assert claims.simulated and claims.label == "simulated"
    assert claims.measurement == enclave.measurement
    assert claims.to_dict()["tee"] == "simulated"


def test_simulated_refused_by_default(enclave, clock) -> None:
    ev = enclave.attest(b"n")
    with pytest.raises(AttestationError, match="check 'simulated'"):
        Verifier(Policy(allowed_measurements={enclave.measurement}), clock=clock).verify(ev)
    with pytest.raises(AttestationError, match="check 'simulated'"):
        Verifier(_policy(enclave, allow_simulated=False), clock=clock).verify(ev)


def test_untrusted_platform_key(enclave, clock) -> None:
    ev = enclave.attest(b"n")
    with pytest.raises(AttestationError, match="check 'platform_key'"):
        Verifier(_policy(enclave, simulated_platform_keys={"00" * 32}), clock=clock).verify(ev)
    # explicit trust-any works
    Verifier(
        _policy(enclave, simulated_platform_keys=set(), trust_any_simulated_platform=True), clock=clock
    ).verify(ev)


def test_wrong_measurement(enclave, clock) -> None:
    ev = enclave.attest(b"n")
    with pytest.raises(AttestationError, match="check 'measurement'"):
        Verifier(_policy(enclave, allowed_measurements={"ab" * 32}), clock=clock).verify(ev)
    with pytest.raises(AttestationError, match="allowed_measurements is empty"):
        Verifier(_policy(enclave, allowed_measurements=set()), clock=clock).verify(ev)
    Verifier(_policy(enclave, allowed_measurements=set(), allow_any_measurement=True), clock=clock).verify(ev)


def test_debug(clock) -> None:
    enc = SimulatedEnclave(code=[b"c"], config={}, debug=True, clock=clock)
    ev = enc.attest(b"n")
    with pytest.raises(AttestationError, match="check 'debug'"):
        Verifier(_policy(enc), clock=clock).verify(ev)
    assert Verifier(_policy(enc, allow_debug=True), clock=clock).verify(ev).debug


def test_stale_and_future(enclave, clock) -> None:
    ev = enclave.attest(b"n")
    v = Verifier(_policy(enclave, max_age_s=60, max_clock_skew_s=2), clock=clock)
    clock.t += 59
    v.verify(ev)
    clock.t += 2
    with pytest.raises(AttestationError, match="stale"):
        v.verify(ev)
    clock.t -= 61 + 3  # evidence now 3 s in the future
    with pytest.raises(AttestationError, match="future"):
        v.verify(ev)
    clock.t += 2  # 1 s in the future: within skew
    v.verify(ev)


def test_nonce_and_report_data(enclave, clock) -> None:
    nonce = b"N" * 32
    ev = enclave.attest(nonce)
    Verifier(_policy(enclave, expected_nonce=nonce), clock=clock).verify(ev)
    with pytest.raises(AttestationError, match="check 'nonce'"):
        Verifier(_policy(enclave, expected_nonce=b"M" * 32), clock=clock).verify(ev)
    with pytest.raises(AttestationError, match="check 'report_data'"):
        Verifier(_policy(enclave), clock=clock).verify(ev, report_data=b"other")


@pytest.mark.parametrize(
    "field,value",
    [
        ("measurement", "cd" * 32),
        ("report_data", b"X" * 64),
        ("timestamp", 1_700_000_001.0),
        ("debug", True),
        ("signature", b"\x00" * 64),
    ],
)
def test_tampered_evidence_bad_signature(enclave, clock, field, value) -> None:
    ev = enclave.attest(b"n")
    bad = msgspec.structs.replace(ev, **{field: value})
    policy = _policy(enclave, allowed_measurements={enclave.measurement, "cd" * 32}, allow_debug=True)
    with pytest.raises(AttestationError, match="check 'signature'"):
        Verifier(policy, clock=clock).verify(bad)


def test_forged_by_other_platform_key(enclave, clock, tmp_path) -> None:
    other = SimulatedEnclave(code=[b"enclave code"], config={"model": "m"}, clock=clock, home=tmp_path / "x")
    ev = other.attest(b"n")
    # pretend it comes from the trusted platform: signature no longer verifies
    forged = msgspec.structs.replace(ev, platform_key=enclave.platform_key)
    with pytest.raises(AttestationError, match="check 'signature'"):
        Verifier(_policy(enclave), clock=clock).verify(forged)
    with pytest.raises(AttestationError, match="check 'platform_key'"):
        Verifier(_policy(enclave), clock=clock).verify(ev)


def test_unknown_backend_and_non_evidence(enclave, clock) -> None:
    ev = msgspec.structs.replace(enclave.attest(b"n"), backend="sev-snp-magic")
    with pytest.raises(AttestationError, match="check 'backend'"):
        Verifier(_policy(enclave), clock=clock).verify(ev)
    with pytest.raises(AttestationError, match="check 'format'"):
        Verifier(_policy(enclave), clock=clock).verify({"backend": "simulated"})  # type: ignore[arg-type]


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        Policy(allowed_measurements={"not hex"})
    with pytest.raises(ValueError):
        Policy(expected_nonce=b"x" * 65)
    p = Policy(allowed_measurements={"0xAB" + "cd" * 31})
    assert p.allowed_measurements == {"ab" + "cd" * 31}
    assert dataclasses.is_dataclass(Verifier(p).verify) is False
    assert isinstance(Evidence, type)


def test_policy_json_roundtrip_and_errors(tmp_path) -> None:
    from veil.errors import ConfigError
    from veil.tee import SgxPolicy
    from veil.tee.dcap.testing import TestPKI

    pki = TestPKI.create()
    pem = pki.root_cert.public_bytes(
        __import__("cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]).Encoding.PEM
    )
    p = Policy(
        allowed_measurements={"ab" * 32},
        allow_simulated=True,
        expected_nonce=b"\x00\xff" * 8,
        sgx=SgxPolicy(trusted_root_der=pem, accepted_tcb_statuses={"UpToDate", "SWHardeningNeeded"}),
    )
    assert p.sgx.trusted_root_der == pki.root_der  # PEM accepted, stored as DER
    f = tmp_path / "policy.json"
    f.write_text(p.model_dump_json())
    assert Policy.load(f) == p
    with pytest.raises(ConfigError, match="invalid attestation policy"):
        Policy.from_json('{"allowed_measurements": ["zz"]}')
    with pytest.raises(ConfigError, match="invalid attestation policy"):
        Policy.from_json('{"sgx": {"trusted_root_der": "bm90IGEgY2VydA=="}}')
    with pytest.raises(ConfigError, match="cannot read"):
        Policy.load(tmp_path / "missing.json")
