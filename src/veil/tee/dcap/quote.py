"""veil's own parser for Intel DCAP quotes: SGX quote v3 and TDX quote v4 / v5 (ECDSA-P256).

Layout (all integers little-endian; Intel "SGX ECDSA Quote Library API", appendix A and the TDX
DCAP Quoting Library API, appendix A.3)::

    header (48)        version u16, att_key_type u16, tee_type u32, qe_svn u16, pce_svn u16,
                       qe_vendor_id [16], user_data [20]
    v3 / v4 body       SGX report body (384) or TD report 1.0 (584)
    v5 body            body_type u16, body_size u32, TD report 1.0 (584) or 1.5 (648)
    sig_data_len u32
    sig_data           quote signature [64] (r||s over header||body), attestation key [64] (x||y)
                       v3:    qe_report [384], qe_report_sig [64], qe_auth u16+data,
                              cert type u16, cert size u32, cert data
                       v4/v5: cert type 6 u16, u32 size, { qe_report, qe_report_sig, qe_auth, cert (type 5) }
    cert type 5        PEM chain: PCK leaf, PCK intermediate (Platform/Processor CA), root CA

This parser only reads bytes; signatures and chains are checked in :mod:`veil.tee.dcap.verify`.
Any malformed input raises :class:`AttestationError` naming the ``quote-format`` check.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from veil.errors import AttestationError

__all__ = [
    "HEADER_SIZE",
    "SGX_REPORT_SIZE",
    "TD10_REPORT_SIZE",
    "TD15_REPORT_SIZE",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "ParsedQuote",
    "QeCertData",
    "QuoteHeader",
    "SgxReportBody",
    "TdReportBody",
    "parse_quote",
    "parse_sgx_report",
]

HEADER_SIZE = 48
SGX_REPORT_SIZE = 384
TD10_REPORT_SIZE = 584
TD15_REPORT_SIZE = 648
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
SGX_FLAGS_DEBUG = 0x02
TD_ATTR_DEBUG = 0x01
_PEM_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+-----END CERTIFICATE-----"
)


def _fail(msg: str) -> AttestationError:
    return AttestationError(f"check 'quote-format' failed: {msg}")


class _Reader:
    def __init__(self, data: bytes, off: int = 0, end: int | None = None) -> None:
        self.data = data
        self.off = off
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.off + n > self.end:
            raise _fail(f"truncated {what} (need {n} bytes at offset {self.off}, have {self.end - self.off})")
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


@dataclass(frozen=True)
class QuoteHeader:
    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class SgxReportBody:
    """An SGX REPORT body (384 bytes): the enclave's identity as the CPU saw it."""

    cpu_svn: bytes
    misc_select: int
    isv_ext_prod_id: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    config_id: bytes
    isv_prod_id: int
    isv_svn: int
    config_svn: int
    isv_family_id: bytes
    report_data: bytes

    @property
    def flags(self) -> int:
        return int.from_bytes(self.attributes[:8], "little")

    @property
    def debug(self) -> bool:
        return bool(self.flags & SGX_FLAGS_DEBUG)


@dataclass(frozen=True)
class TdReportBody:
    """A TDX TD report body (1.0: 584 bytes; 1.5 adds tee_tcb_svn2 and mr_servicetd)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes = b""
    mr_servicetd: bytes = b""

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & TD_ATTR_DEBUG)


@dataclass(frozen=True)
class QeCertData:
    qe_report: bytes
    qe_report_body: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes

    def pem_chain(self) -> list[bytes]:
        """The PEM certificates (leaf first) of a type-5 certification data blob."""
        if self.cert_type != CERT_TYPE_PCK_CHAIN:
            raise _fail(f"certification data type {self.cert_type} is not a PCK chain (5)")
        certs = [m.group(0) + b"\n" for m in _PEM_RE.finditer(self.cert_data)]
        rest = _PEM_RE.sub(b"", self.cert_data)
        if rest.strip(b"\r\n\x00"):
            raise _fail("PCK certification data has bytes outside its PEM certificates")
        if not certs:
            raise _fail("no PEM certificate in the certification data")
        return certs


@dataclass(frozen=True)
class ParsedQuote:
    raw: bytes
    header: QuoteHeader
    body: SgxReportBody | TdReportBody
    signed_len: int  # header || body bytes covered by the quote signature
    signature: bytes
    attestation_key: bytes
    qe: QeCertData

    @property
    def is_tdx(self) -> bool:
        return isinstance(self.body, TdReportBody)

    @property
    def measurement(self) -> str:
        return (self.body.mr_td if isinstance(self.body, TdReportBody) else self.body.mr_enclave).hex()

    @property
    def report_data(self) -> bytes:
        return self.body.report_data

    @property
    def debug(self) -> bool:
        return self.body.debug

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[: self.signed_len]


def parse_sgx_report(data: bytes) -> SgxReportBody:
    """Parse a 384-byte SGX report body."""
    if len(data) != SGX_REPORT_SIZE:
        raise _fail(f"SGX report body must be {SGX_REPORT_SIZE} bytes, got {len(data)}")
    r = _Reader(data)
    cpu_svn = r.take(16, "cpu_svn")
    misc_select = r.u32("misc_select")
    r.take(12, "reserved1")
    isv_ext_prod_id = r.take(16, "isv_ext_prod_id")
    attributes = r.take(16, "attributes")
    mr_enclave = r.take(32, "mr_enclave")
    r.take(32, "reserved2")
    mr_signer = r.take(32, "mr_signer")
    r.take(32, "reserved3")
    config_id = r.take(64, "config_id")
    isv_prod_id = r.u16("isv_prod_id")
    isv_svn = r.u16("isv_svn")
    config_svn = r.u16("config_svn")
    r.take(42, "reserved4")
    isv_family_id = r.take(16, "isv_family_id")
    report_data = r.take(64, "report_data")
    return SgxReportBody(
        cpu_svn=cpu_svn, misc_select=misc_select, isv_ext_prod_id=isv_ext_prod_id, attributes=attributes,
        mr_enclave=mr_enclave, mr_signer=mr_signer, config_id=config_id, isv_prod_id=isv_prod_id,
        isv_svn=isv_svn, config_svn=config_svn, isv_family_id=isv_family_id, report_data=report_data,
    )


def _parse_td_report(data: bytes, v15: bool) -> TdReportBody:
    r = _Reader(data)
    f = {
        "tee_tcb_svn": r.take(16, "tee_tcb_svn"),
        "mr_seam": r.take(48, "mr_seam"),
        "mr_signer_seam": r.take(48, "mr_signer_seam"),
        "seam_attributes": r.take(8, "seam_attributes"),
        "td_attributes": r.take(8, "td_attributes"),
        "xfam": r.take(8, "xfam"),
        "mr_td": r.take(48, "mr_td"),
        "mr_config_id": r.take(48, "mr_config_id"),
        "mr_owner": r.take(48, "mr_owner"),
        "mr_owner_config": r.take(48, "mr_owner_config"),
    }
    rtmr = (r.take(48, "rtmr0"), r.take(48, "rtmr1"), r.take(48, "rtmr2"), r.take(48, "rtmr3"))
    report_data = r.take(64, "report_data")
    extra: dict[str, bytes] = {}
    if v15:
        extra = {"tee_tcb_svn2": r.take(16, "tee_tcb_svn2"), "mr_servicetd": r.take(48, "mr_servicetd")}
    return TdReportBody(rtmr=rtmr, report_data=report_data, **f, **extra)


def _parse_qe_block(r: _Reader) -> QeCertData:
    qe_report = r.take(SGX_REPORT_SIZE, "QE report")
    qe_sig = r.take(64, "QE report signature")
    auth_len = r.u16("QE auth data size")
    auth = r.take(auth_len, "QE auth data")
    cert_type = r.u16("certification data type")
    cert_len = r.u32("certification data size")
    cert = r.take(cert_len, "certification data")
    return QeCertData(
        qe_report=qe_report, qe_report_body=parse_sgx_report(qe_report), qe_report_signature=qe_sig,
        qe_auth_data=auth, cert_type=cert_type, cert_data=cert,
    )


def parse_quote(raw: bytes) -> ParsedQuote:
    """Parse an ECDSA-P256 DCAP quote (SGX v3, TDX v4/v5)."""
    if not isinstance(raw, bytes | bytearray):
        raise _fail("quote must be bytes")
    raw = bytes(raw)
    r = _Reader(raw)
    version = r.u16("version")
    att_key_type = r.u16("attestation key type")
    tee_type = r.u32("tee type")
    qe_svn = r.u16("qe_svn")
    pce_svn = r.u16("pce_svn")
    header = QuoteHeader(
        version=version, att_key_type=att_key_type, tee_type=tee_type, qe_svn=qe_svn, pce_svn=pce_svn,
        qe_vendor_id=r.take(16, "qe_vendor_id"), user_data=r.take(20, "user_data"),
    )
    if att_key_type != ATT_KEY_ECDSA_P256:
        raise _fail(f"attestation key type {att_key_type} is not ECDSA-256-with-P-256 (2)")
    body: SgxReportBody | TdReportBody
    if version == 3:
        if tee_type != TEE_TYPE_SGX:
            raise _fail(f"quote v3 must be SGX (tee_type 0), got {tee_type:#x}")
        body = parse_sgx_report(r.take(SGX_REPORT_SIZE, "SGX report body"))
    elif version == 4:
        if tee_type == TEE_TYPE_TDX:
            body = _parse_td_report(r.take(TD10_REPORT_SIZE, "TD report body"), v15=False)
        elif tee_type == TEE_TYPE_SGX:
            body = parse_sgx_report(r.take(SGX_REPORT_SIZE, "SGX report body"))
        else:
            raise _fail(f"unknown tee_type {tee_type:#x}")
    elif version == 5:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        data = r.take(body_size, "report body")
        if body_type == 1 and body_size == SGX_REPORT_SIZE:
            body = parse_sgx_report(data)
        elif body_type == 2 and body_size == TD10_REPORT_SIZE:
            body = _parse_td_report(data, v15=False)
        elif body_type == 3 and body_size == TD15_REPORT_SIZE:
            body = _parse_td_report(data, v15=True)
        else:
            raise _fail(f"unsupported v5 body type {body_type} / size {body_size}")
    else:
        raise _fail(f"unsupported quote version {version} (veil reads v3, v4, v5)")
    signed_len = r.off
    sig_len = r.u32("signature data length")
    sr = _Reader(raw, r.off, r.off + sig_len)
    if r.off + sig_len > len(raw):
        raise _fail("signature data length runs past the end of the quote")
    signature = sr.take(64, "quote signature")
    att_key = sr.take(64, "attestation key")
    if version == 3:
        qe = _parse_qe_block(sr)
    else:
        ctype = sr.u16("certification data type")
        clen = sr.u32("certification data size")
        if ctype != CERT_TYPE_QE_REPORT:
            raise _fail(f"v{version} certification data type {ctype} is not QE report data (6)")
        inner = _Reader(raw, sr.off, sr.off + clen)
        sr.take(clen, "QE report certification data")
        qe = _parse_qe_block(inner)
    return ParsedQuote(
        raw=raw, header=header, body=body, signed_len=signed_len, signature=signature,
        attestation_key=att_key, qe=qe,
    )
