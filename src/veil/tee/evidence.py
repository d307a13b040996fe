"""Wire types of attestation: :class:`Evidence`, :class:`VerifiedClaims` and the signed body.

``Evidence`` is a frozen msgspec struct (a :class:`veil.comm.Message`), so it can cross a
channel as is. What the fields mean depends on ``backend``:

* ``simulated``: ``measurement`` is the SHA-256 the simulated enclave computed over the code
  and config it loaded; ``signature`` is an Ed25519 signature by the per-machine simulated
  platform key ``platform_key`` over :func:`signed_body`; ``quote`` is empty. NOT a security
  boundary, see docs/protocols/attestation.md.
* ``sgx-dcap`` / ``tdx-dcap``: ``quote`` is the raw Intel DCAP quote (SGX v3 / TDX v4); the
  other fields are copied from it for convenience and re-derived by the verifier, which never
  trusts them; ``collateral`` carries the collateral JSON when the attester has it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from veil.comm.codec import Message

__all__ = [
    "REPORT_DATA_SIZE", "Evidence", "VerifiedClaims", "key_fingerprint", "pad_report_data", "signed_body",
]

REPORT_DATA_SIZE = 64
_SIM_DOMAIN = b"veil-simulated-evidence-v1"


class Evidence(Message, frozen=True, tag=True):
    """Attestation evidence produced by an :class:`veil.tee.Enclave`."""

    backend: str
    measurement: str
    report_data: bytes
    timestamp: float
    debug: bool
    simulated: bool
    quote: bytes = b""
    signature: bytes = b""
    platform_key: bytes = b""
    collateral: bytes = b""

    def describe(self) -> str:
        """One line for logs; says ``simulated`` when it is."""
        tag = "SIMULATED (not a hardware TEE)" if self.simulated else "hardware"
        return f"{self.backend} evidence [{tag}] measurement={self.measurement[:16]}… debug={self.debug}"


def pad_report_data(data: bytes) -> bytes:
    """Zero-pad ``data`` to the 64 bytes of a report-data field (InputError-free: caller checks)."""
    return data + b"\x00" * (REPORT_DATA_SIZE - len(data))


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def signed_body(
    *, backend: str, measurement: str, report_data: bytes, timestamp: float, debug: bool, simulated: bool,
    platform_key: bytes,
) -> bytes:
    """Canonical bytes signed by the simulated platform key (length-prefixed, domain-separated)."""
    return b"".join(
        [
            _SIM_DOMAIN,
            _lp(backend.encode()),
            _lp(measurement.encode()),
            _lp(report_data),
            struct.pack(">d", timestamp),
            bytes([1 if debug else 0, 1 if simulated else 0]),
            _lp(platform_key),
        ]
    )


@dataclass(frozen=True)
class VerifiedClaims:
    """What a :class:`veil.tee.Verifier` established about a piece of evidence."""

    backend: str
    measurement: str
    report_data: bytes
    timestamp: float
    debug: bool
    simulated: bool
    platform_key_sha256: str = ""
    mrsigner: str = ""
    tcb_status: str = ""
    advisory_ids: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``simulated`` or ``hardware`` (for results and logs)."""
        return "simulated" if self.simulated else "hardware"

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "measurement": self.measurement,
            "report_data": self.report_data.hex(),
            "timestamp": self.timestamp,
            "debug": self.debug,
            "simulated": self.simulated,
            "tee": self.label,
            "platform_key_sha256": self.platform_key_sha256,
            "mrsigner": self.mrsigner,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            **self.extra,
        }


def key_fingerprint(public_key: bytes) -> str:
    """Hex SHA-256 of a public key (how policies list simulated platform keys)."""
    return hashlib.sha256(public_key).hexdigest()
