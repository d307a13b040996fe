"""Verification of Intel DCAP quotes (SGX / TDX) carried in :class:`~veil.tee.Evidence`.

Two paths, chosen by the policy, never silently:

* **Intel root (production)** — ``policy.sgx.trusted_root_der is None``: the quote and its
  collateral (PCK CRL, TCB info, QE identity and their chains) are verified by ``dcap-qvl``,
  which pins Intel's SGX Root CA, at the verifier's clock. Its TCB status must be in
  ``policy.sgx.accepted_tcb_statuses`` and no advisory in ``rejected_advisories``.
* **Pinned root (veil's own path)** — ``policy.sgx.trusted_root_der`` set: veil checks the PCK
  chain up to that root (validity at ``now``, CA flags, signatures), the QE report signature
  with the PCK leaf key, that the QE report data binds the attestation key
  (SHA-256(att_key || qe_auth_data)), and the quote signature over header || body. No TCB
  info is evaluated on this path, so the claims carry ``tcb_status="NotEvaluated"`` and the
  policy must accept that status explicitly. Used with veil's test PKI
  (:mod:`veil.tee.dcap.testing`); also works on real quotes with Intel's root, minus TCB.

Both paths then apply the same identity checks (MRSIGNER, ISV product id / SVN) here, and the
:class:`~veil.tee.Verifier` applies measurement, debug, freshness and report-data checks.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from veil.errors import AttestationError
from veil.tee.dcap.quote import ParsedQuote, SgxReportBody, TdReportBody, parse_quote
from veil.tee.evidence import Evidence, VerifiedClaims
from veil.tee.policy import Policy

__all__ = [
    "NOT_EVALUATED",
    "CollateralProvider",
    "check_sgx_identity",
    "evidence_from_quote",
    "verify_chain",
    "verify_dcap_evidence",
    "verify_quote_signatures",
    "verify_with_dcap_qvl",
]

log = logging.getLogger("veil.tee.dcap")

NOT_EVALUATED = "NotEvaluated"
CollateralProvider = Callable[[bytes], bytes | str]


def _fail(check: str, msg: str) -> AttestationError:
    return AttestationError(f"check '{check}' failed: {msg}")


def _p256_verify(public: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> bool:
    if len(raw_sig) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big"))
    try:
        public.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_chain(pem_chain: list[bytes], trusted_root_der: bytes, now: float) -> x509.Certificate:
    """Verify a PCK chain (leaf first) up to the pinned root; returns the leaf certificate."""
    try:
        certs = [x509.load_pem_x509_certificate(p) for p in pem_chain]
        root = x509.load_der_x509_certificate(trusted_root_der)
    except ValueError as e:
        raise _fail("pck-chain", f"unreadable certificate: {e}") from e
    if certs[-1].public_bytes(Encoding.DER) != root.public_bytes(Encoding.DER):
        certs.append(root)  # chain without the root: the last one must be issued by the pinned root
    at = datetime.fromtimestamp(now, tz=UTC)
    for i, cert in enumerate(certs):
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise _fail(
                "pck-chain", f"certificate {cert.subject.rfc4514_string()!r} is not valid at {at:%Y-%m-%d}"
            )
        issuer = certs[i + 1] if i + 1 < len(certs) else cert
        if i + 1 < len(certs):
            try:
                bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                raise _fail("pck-chain", f"issuer {issuer.subject.rfc4514_string()!r} is not a CA")
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as e:
            if i + 1 >= len(certs) - 1:
                raise _fail(
                    "root", f"{cert.subject.rfc4514_string()!r} does not chain to the pinned root "
                    f"{root.subject.rfc4514_string()!r}"
                ) from e
            raise _fail(
                "pck-chain",
                f"{cert.subject.rfc4514_string()!r} is not signed by {issuer.subject.rfc4514_string()!r}",
            ) from e
    return certs[0]


def verify_quote_signatures(q: ParsedQuote, *, trusted_root_der: bytes, now: float) -> x509.Certificate:
    """veil's own DCAP signature path (see module docstring). Returns the PCK leaf certificate."""
    leaf = verify_chain(q.qe.pem_chain(), trusted_root_der, now)
    pck_key = leaf.public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or pck_key.curve.name != "secp256r1":
        raise _fail("pck-chain", "PCK leaf key is not ECDSA P-256")
    if not _p256_verify(pck_key, q.qe.qe_report_signature, q.qe.qe_report):
        raise _fail("qe-report-signature", "QE report is not signed by the PCK leaf key")
    binding = hashlib.sha256(q.attestation_key + q.qe.qe_auth_data).digest()
    qe_rd = q.qe.qe_report_body.report_data
    if not (hmac.compare_digest(qe_rd[:32], binding) and qe_rd[32:] == b"\x00" * 32):
        raise _fail("attestation-key-binding", "QE report data does not bind the attestation key")
    try:
        att = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + q.attestation_key)
    except ValueError as e:
        raise _fail("quote-signature", "attestation key is not a P-256 point") from e
    if not _p256_verify(att, q.signature, q.signed_bytes):
        raise _fail("quote-signature", "quote header/body signature does not verify with the attestation key")
    return leaf


def verify_with_dcap_qvl(
    raw_quote: bytes, collateral: bytes | str, now: float
) -> tuple[str, tuple[str, ...]]:
    """Verify with ``dcap-qvl`` against Intel's pinned root; returns (TCB status, advisory ids)."""
    import dcap_qvl

    text = collateral.decode() if isinstance(collateral, bytes) else collateral
    try:
        json.loads(text)
        col = dcap_qvl.QuoteCollateralV3.from_json(text)
    except ValueError as e:
        raise _fail("collateral", f"collateral is not valid DCAP collateral JSON: {e}") from e
    try:
        report = dcap_qvl.verify(bytes(raw_quote), col, int(now))
    except ValueError as e:
        raise _fail("dcap-qvl", f"Intel DCAP verification failed: {e}") from e
    return str(report.status), tuple(str(a) for a in report.advisory_ids)


def check_sgx_identity(body: SgxReportBody | TdReportBody, policy: Policy) -> None:
    """MRSIGNER / ISV product id / ISV SVN (SGX) or MR_SEAM / RTMR (TDX) checks of :class:`SgxPolicy`."""
    sp = policy.sgx
    if isinstance(body, TdReportBody):
        seam = body.mr_seam.hex()
        if sp.tdx_allowed_mr_seam and not any(hmac.compare_digest(seam, s) for s in sp.tdx_allowed_mr_seam):
            raise _fail("mr-seam", f"TDX module MR_SEAM {seam[:16]}… is not allowed by the policy")
        for i, want in sorted(sp.tdx_expected_rtmrs.items()):
            if not hmac.compare_digest(body.rtmr[i].hex(), want):
                raise _fail("rtmr", f"RTMR{i} does not match the policy")
        return
    signer = body.mr_signer.hex()
    if sp.allowed_mrsigner and not any(hmac.compare_digest(signer, s) for s in sp.allowed_mrsigner):
        raise _fail("mrsigner", f"MRSIGNER {body.mr_signer.hex()[:16]}… is not allowed by the policy")
    if sp.isv_prod_id is not None and body.isv_prod_id != sp.isv_prod_id:
        raise _fail("isv-prod-id", f"ISV product id {body.isv_prod_id} != required {sp.isv_prod_id}")
    if body.isv_svn < sp.min_isv_svn:
        raise _fail("isv-svn", f"ISV SVN {body.isv_svn} < minimum {sp.min_isv_svn}")


def verify_dcap_evidence(
    ev: Evidence, policy: Policy, *, now: float, collateral_provider: CollateralProvider | None = None
) -> VerifiedClaims:
    """Cryptographic and identity checks of DCAP evidence; the caller applies the common checks."""
    if ev.simulated:
        raise _fail("format", f"{ev.backend} evidence cannot be simulated")
    q = parse_quote(ev.quote)
    if q.is_tdx != (ev.backend == "tdx-dcap"):
        raise _fail("format", f"backend {ev.backend!r} does not match a {'TDX' if q.is_tdx else 'SGX'} quote")
    # the convenience copies in Evidence must agree with the signed quote
    if (ev.measurement.lower() != q.measurement or ev.report_data != q.report_data or ev.debug != q.debug):
        raise _fail("format", "evidence fields (measurement/report_data/debug) disagree with the quote")
    sp = policy.sgx
    advisories: tuple[str, ...] = ()
    if sp.trusted_root_der is not None:
        verify_quote_signatures(q, trusted_root_der=sp.trusted_root_der, now=now)
        status = NOT_EVALUATED
        path = "pinned-root"
    else:
        collateral: bytes | str = ev.collateral
        if not collateral and collateral_provider is not None:
            collateral = collateral_provider(ev.quote)
        if not collateral:
            raise _fail("collateral", "no DCAP collateral in the evidence and no collateral_provider")
        status, advisories = verify_with_dcap_qvl(ev.quote, collateral, now)
        path = "dcap-qvl"
    if status not in sp.accepted_tcb_statuses:
        accepted = sorted(sp.accepted_tcb_statuses)
        raise _fail("tcb-status", f"TCB status {status!r} is not in accepted {accepted}")
    bad = sorted(set(advisories) & sp.rejected_advisories)
    if bad:
        raise _fail("advisories", f"platform is affected by rejected advisories {bad}")
    check_sgx_identity(q.body, policy)
    mrsigner = q.body.mr_signer.hex() if isinstance(q.body, SgxReportBody) else ""
    extra = {"verified_by": path, "quote_version": str(q.header.version)}
    if isinstance(q.body, SgxReportBody):
        extra |= {"isv_prod_id": str(q.body.isv_prod_id), "isv_svn": str(q.body.isv_svn)}
    else:
        extra |= {f"rtmr{i}": m.hex() for i, m in enumerate(q.body.rtmr)} | {"mr_seam": q.body.mr_seam.hex()}
    log.info("DCAP quote verified (%s, %s, TCB %s)", ev.backend, path, status)
    return VerifiedClaims(
        backend=ev.backend, measurement=q.measurement, report_data=q.report_data, timestamp=ev.timestamp,
        debug=q.debug, simulated=False, mrsigner=mrsigner, tcb_status=status, advisory_ids=advisories,
        extra=extra,
    )


def evidence_from_quote(raw_quote: bytes, *, collateral: bytes = b"", timestamp: float) -> Evidence:
    """Wrap a raw DCAP quote as :class:`Evidence` (fields copied from the parsed quote)."""
    q = parse_quote(raw_quote)
    return Evidence(
        backend="tdx-dcap" if q.is_tdx else "sgx-dcap", measurement=q.measurement, report_data=q.report_data,
        timestamp=timestamp, debug=q.debug, simulated=False, quote=bytes(raw_quote), collateral=collateral,
    )
