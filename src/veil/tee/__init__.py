"""veil.tee: enclaves, attestation evidence, verification policy and attested key exchange.

Backends: ``simulated`` (loudly insecure, default for development and tests), ``gramine``
(SGX via Gramine's /dev/attestation), ``tsm`` (TDX / SEV-SNP via configfs-tsm). Intel DCAP
quotes (SGX / TDX) are verified with ``dcap-qvl`` against Intel's root, or with veil's own
chain verification against a pinned root (test PKI). See docs/protocols/attestation.md.
"""

from __future__ import annotations

from veil.tee.base import Enclave, load_enclave, register_backend
from veil.tee.evidence import REPORT_DATA_SIZE, Evidence, VerifiedClaims, pad_report_data
from veil.tee.kex import (
    AttestedOffer,
    EnclaveKeyExchange,
    KexFinish,
    KexRequest,
    client_key_exchange,
    client_open_session,
    enclave_accept_session,
    new_nonce,
)
from veil.tee.policy import Policy, SgxPolicy, Verifier
from veil.tee.simulated import SimulatedEnclave, SimulatedEnclaveProcess, measure, platform_public_key

__all__ = [
    "REPORT_DATA_SIZE",
    "AttestedOffer",
    "Enclave",
    "EnclaveKeyExchange",
    "Evidence",
    "KexFinish",
    "KexRequest",
    "Policy",
    "SgxPolicy",
    "SimulatedEnclave",
    "SimulatedEnclaveProcess",
    "VerifiedClaims",
    "Verifier",
    "client_key_exchange",
    "client_open_session",
    "enclave_accept_session",
    "load_enclave",
    "measure",
    "new_nonce",
    "pad_report_data",
    "platform_public_key",
    "register_backend",
]
