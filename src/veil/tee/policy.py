"""Attestation :class:`Policy` and the :class:`Verifier` that enforces it.

The verifier refuses, with an :class:`~veil.errors.AttestationError` naming the failed check:
unknown backend, simulated evidence (unless ``allow_simulated``), an untrusted simulated platform
key, a bad signature / quote, a measurement not in the policy, debug enclaves (unless
``allow_debug``), stale evidence or evidence from the future, and report data that does not
carry the expected nonce / binding (compared in constant time).

Trust for simulated evidence is *trust-on-config*: the verifier accepts only platform keys
listed in ``simulated_platform_keys`` (hex of the raw Ed25519 public key, see
:func:`veil.tee.simulated.platform_public_key`), or any key when the policy explicitly sets
``trust_any_simulated_platform=True`` (tests and demos on one machine). Neither makes simulated
evidence secure; both keep it honest about where it came from.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from veil.errors import AttestationError, ConfigError, InputError
from veil.tee.evidence import REPORT_DATA_SIZE, Evidence, VerifiedClaims, key_fingerprint, pad_report_data
from veil.tee.evidence import signed_body as _signed_body

__all__ = ["KNOWN_BACKENDS", "Policy", "SgxPolicy", "Verifier"]

log = logging.getLogger("veil.tee")

KNOWN_BACKENDS = ("simulated", "sgx-dcap", "tdx-dcap")

TcbStatus = Literal[
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
]


def _norm_hex(values: set[str] | list[str] | tuple[str, ...], what: str) -> set[str]:
    out = set()
    for v in values:
        s = v.lower().removeprefix("0x")
        try:
            bytes.fromhex(s)
        except ValueError as e:
            raise ValueError(f"{what} entry {v!r} is not hex") from e
        out.add(s)
    return out


class SgxPolicy(BaseModel):
    """What an Intel SGX / TDX DCAP quote must satisfy, on top of :class:`Policy`.

    For SGX, ``Policy.allowed_measurements`` lists MRENCLAVE values; ``allowed_mrsigner`` (if
    non-empty) additionally pins the signer. For TDX, the measurement is MRTD. ``trusted_root_der``
    pins a root CA for veil's own chain verification (the test PKI); when it is ``None`` real
    quotes are verified by ``dcap-qvl`` against Intel's SGX root CA and collateral is required.
    """

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    allowed_mrsigner: set[str] = Field(default_factory=set)
    isv_prod_id: int | None = None
    min_isv_svn: int = 0
    accepted_tcb_statuses: set[str] = Field(default_factory=lambda: {"UpToDate"})
    rejected_advisories: set[str] = Field(default_factory=set)
    trusted_root_der: bytes | None = None
    # TDX only: allowed TDX-module measurements and exact RTMR values (index -> hex) when set
    tdx_allowed_mr_seam: set[str] = Field(default_factory=set)
    tdx_expected_rtmrs: dict[int, str] = Field(default_factory=dict)

    @field_validator("allowed_mrsigner", "tdx_allowed_mr_seam")
    @classmethod
    def _hex(cls, v: set[str]) -> set[str]:
        return _norm_hex(v, "allowed_mrsigner / tdx_allowed_mr_seam")

    @field_validator("tdx_expected_rtmrs")
    @classmethod
    def _rtmrs(cls, v: dict[int, str]) -> dict[int, str]:
        if any(k not in (0, 1, 2, 3) for k in v):
            raise ValueError("tdx_expected_rtmrs keys must be 0..3")
        return {k: next(iter(_norm_hex([h], "tdx_expected_rtmrs"))) for k, h in v.items()}

    @field_validator("trusted_root_der")
    @classmethod
    def _root(cls, v: bytes | None) -> bytes | None:
        if v is None:
            return None
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        try:
            cert = x509.load_pem_x509_certificate(v) if v.lstrip().startswith(b"-----") else (
                x509.load_der_x509_certificate(v))
        except ValueError as e:
            raise ValueError(f"trusted_root_der is not an X.509 certificate (DER or PEM): {e}") from e
        return cert.public_bytes(Encoding.DER)


class Policy(BaseModel):
    """What evidence must show before a peer trusts an enclave.

    JSON form (``Policy.model_validate_json`` / ``model_dump_json``): bytes fields are base64.
    """

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    allowed_measurements: set[str] = Field(default_factory=set)
    allow_any_measurement: bool = False
    allow_debug: bool = False
    allow_simulated: bool = False
    simulated_platform_keys: set[str] = Field(default_factory=set)
    trust_any_simulated_platform: bool = False
    max_age_s: float = Field(default=300.0, gt=0)
    max_clock_skew_s: float = Field(default=5.0, ge=0)
    expected_nonce: bytes | None = None
    sgx: SgxPolicy = Field(default_factory=SgxPolicy)

    @field_validator("allowed_measurements")
    @classmethod
    def _meas_hex(cls, v: set[str]) -> set[str]:
        return _norm_hex(v, "allowed_measurements")

    @field_validator("simulated_platform_keys")
    @classmethod
    def _keys_hex(cls, v: set[str]) -> set[str]:
        return _norm_hex(v, "simulated_platform_keys")

    @classmethod
    def from_json(cls, text: str | bytes) -> Policy:
        """Parse a JSON policy; :class:`ConfigError` (not a pydantic error) when it is invalid."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise ConfigError(f"invalid attestation policy: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a JSON policy file (see :meth:`from_json`)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read attestation policy {path}: {e}") from e
        return cls.from_json(text)

    @field_validator("expected_nonce")
    @classmethod
    def _nonce_len(cls, v: bytes | None) -> bytes | None:
        if v is not None and not 0 < len(v) <= REPORT_DATA_SIZE:
            raise ValueError("expected_nonce must be 1..64 bytes")
        return v


class Verifier:
    """Checks :class:`Evidence` against a :class:`Policy`; ``clock`` is injected for tests."""

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.time,
        collateral_provider: Callable[[bytes], bytes | str] | None = None,
    ) -> None:
        """``collateral_provider(raw_quote)`` supplies DCAP collateral when evidence has none."""
        if not isinstance(policy, Policy):
            raise InputError("Verifier needs a veil.tee.Policy")
        self.policy = policy
        self.clock = clock
        self.collateral_provider = collateral_provider
        self._warned_simulated = False

    # ------------------------------------------------------------------ public
    def verify(self, evidence: Evidence, *, report_data: bytes | None = None) -> VerifiedClaims:
        """Verify ``evidence``; returns the claims or raises :class:`AttestationError`.

        ``report_data`` (<= 64 bytes, zero-padded) is what the caller expects in the evidence,
        e.g. a key-exchange binding; without it, ``policy.expected_nonce`` (if set) must be the
        report data.
        """
        if not isinstance(evidence, Evidence):
            raise AttestationError(f"check 'format' failed: expected Evidence, got {type(evidence).__name__}")
        expected = self._expected_report_data(report_data)
        if evidence.backend == "simulated":
            claims = self._verify_simulated(evidence)
        elif evidence.backend in ("sgx-dcap", "tdx-dcap"):
            from veil.tee.dcap.verify import verify_dcap_evidence

            claims = verify_dcap_evidence(
                evidence, self.policy, now=float(self.clock()), collateral_provider=self.collateral_provider
            )
        else:
            raise AttestationError(
                f"check 'backend' failed: unknown TEE backend {evidence.backend!r} (known: {KNOWN_BACKENDS})"
            )
        self._check_measurement(claims.measurement)
        if claims.debug and not self.policy.allow_debug:
            raise AttestationError(
                "check 'debug' failed: evidence is from a debug enclave and the policy refuses debug"
            )
        self._check_freshness(evidence)
        self._check_report_data(claims.report_data, expected, report_data is None)
        log.info("attestation OK: %s", evidence.describe())
        return claims

    # ------------------------------------------------------------------ checks
    def _expected_report_data(self, report_data: bytes | None) -> bytes | None:
        if report_data is not None:
            if len(report_data) > REPORT_DATA_SIZE:
                raise InputError(f"expected report_data must be at most {REPORT_DATA_SIZE} bytes")
            return pad_report_data(bytes(report_data))
        if self.policy.expected_nonce is not None:
            return pad_report_data(self.policy.expected_nonce)
        return None

    def _verify_simulated(self, ev: Evidence) -> VerifiedClaims:
        p = self.policy
        if not p.allow_simulated:
            raise AttestationError(
                "check 'simulated' failed: evidence comes from a SIMULATED enclave and the policy does not "
                "set allow_simulated=True"
            )
        if not ev.simulated:
            raise AttestationError("check 'format' failed: simulated evidence must have simulated=True")
        if len(ev.platform_key) != 32:
            raise AttestationError("check 'platform_key' failed: simulated platform key must be 32 bytes")
        if not (p.trust_any_simulated_platform or ev.platform_key.hex() in p.simulated_platform_keys):
            raise AttestationError(
                f"check 'platform_key' failed: simulated platform key {ev.platform_key.hex()[:16]}… is not "
                "in "
                "policy.simulated_platform_keys (and trust_any_simulated_platform is off)"
            )
        if len(ev.report_data) != REPORT_DATA_SIZE:
            raise AttestationError("check 'format' failed: report_data must be exactly 64 bytes")
        body = _signed_body(
            backend=ev.backend, measurement=ev.measurement, report_data=ev.report_data,
            timestamp=ev.timestamp, debug=ev.debug, simulated=ev.simulated, platform_key=ev.platform_key,
        )
        try:
            Ed25519PublicKey.from_public_bytes(ev.platform_key).verify(ev.signature, body)
        except (InvalidSignature, ValueError) as e:
            raise AttestationError(
                "check 'signature' failed: simulated evidence signature does not verify"
            ) from e
        if not self._warned_simulated:  # once per verifier, then debug: serving verifies per session
            self._warned_simulated = True
            log.warning("accepting SIMULATED evidence (allow_simulated=True): no hardware guarantee")
        else:
            log.debug("accepting SIMULATED evidence (allow_simulated=True)")
        return VerifiedClaims(
            backend=ev.backend, measurement=ev.measurement.lower(), report_data=ev.report_data,
            timestamp=ev.timestamp, debug=ev.debug, simulated=True,
            platform_key_sha256=key_fingerprint(ev.platform_key),
        )

    def _check_measurement(self, measurement: str) -> None:
        p = self.policy
        if p.allow_any_measurement:
            return
        if not p.allowed_measurements:
            raise AttestationError(
                "check 'measurement' failed: policy.allowed_measurements is empty (set it, or "
                "allow_any_measurement=True explicitly)"
            )
        m = measurement.lower()
        if not any(hmac.compare_digest(m.encode(), a.encode()) for a in p.allowed_measurements):
            raise AttestationError(
                f"check 'measurement' failed: measurement {m[:16]}… is not allowed by the policy"
            )

    def _check_freshness(self, ev: Evidence) -> None:
        now = float(self.clock())
        age = now - ev.timestamp
        if age != age:  # NaN timestamp
            raise AttestationError("check 'freshness' failed: evidence timestamp is not a number")
        if age > self.policy.max_age_s:
            raise AttestationError(
                f"check 'freshness' failed: evidence is stale ({age:.1f}s old > "
                f"max_age_s={self.policy.max_age_s})"
            )
        if age < -self.policy.max_clock_skew_s:
            raise AttestationError(
                f"check 'freshness' failed: evidence is {-age:.1f}s in the future (> max_clock_skew_s="
                f"{self.policy.max_clock_skew_s})"
            )

    def _check_report_data(self, actual: bytes, expected: bytes | None, from_nonce: bool) -> None:
        if expected is None:
            return
        if not hmac.compare_digest(actual, expected):
            what = "nonce" if from_nonce else "report_data"
            raise AttestationError(
                f"check '{what}' failed: evidence report_data does not carry the expected {what}"
            )
