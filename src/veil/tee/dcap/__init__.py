"""Intel DCAP quotes: veil's own parser, verification (dcap-qvl or a pinned root) and a test PKI."""

from __future__ import annotations

from veil.tee.dcap.quote import ParsedQuote, SgxReportBody, TdReportBody, parse_quote
from veil.tee.dcap.verify import (
    NOT_EVALUATED,
    evidence_from_quote,
    verify_dcap_evidence,
    verify_quote_signatures,
    verify_with_dcap_qvl,
)

__all__ = [
    "NOT_EVALUATED",
    "ParsedQuote",
    "SgxReportBody",
    "TdReportBody",
    "evidence_from_quote",
    "parse_quote",
    "verify_dcap_evidence",
    "verify_quote_signatures",
    "verify_with_dcap_qvl",
]
