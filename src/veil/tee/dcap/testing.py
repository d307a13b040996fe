"""A test PKI shaped like Intel's, for building DCAP quotes that veil can verify.

NOT for production: everything here is signed by keys this module just made. It mirrors the real
hierarchy so that veil's own verification path (:func:`veil.tee.dcap.verify_quote_signatures`)
is exercised end to end:

    "veil TEST SGX Root CA"            self-signed, ECDSA P-256, CA
      └─ "veil TEST SGX PCK Platform CA"   CA, pathlen 0
           └─ "veil TEST SGX PCK Certificate"  leaf; carries an SGX-extension-shaped blob (FMSPC)
    QE report (an SGX report of a fake quoting enclave), signed by the PCK leaf key, whose
    report data = SHA-256(attestation key || QE auth data)
    attestation key (P-256), signing header || body of the quote

Quotes are SGX v3 or TDX v4, byte-compatible with :mod:`veil.tee.dcap.quote` and dcap-qvl's
parser. Private keys come from :mod:`veil.crypto.random`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from veil.crypto.random import random_below, random_bits
from veil.errors import InputError
from veil.tee.dcap.quote import TEE_TYPE_SGX, TEE_TYPE_TDX

__all__ = ["TestPKI", "p256_key", "sgx_report_body", "td_report_body"]

_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")  # Intel's QE vendor id


def p256_key() -> ec.EllipticCurvePrivateKey:
    """A P-256 private key whose scalar comes from veil.crypto.random."""
    return ec.derive_private_key(1 + random_below(_P256_ORDER - 1), ec.SECP256R1())


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_pub(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "ZZ"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "veil TEST PKI (not Intel)"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _der_tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    else:
        nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(nb)]) + nb
    return bytes([tag]) + length + value


def _der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body += bytes(reversed(chunk))
    return _der_tlv(0x06, body)


def _sgx_extension(fmspc: bytes, pce_id: bytes) -> bytes:
    """A minimal DER SEQUENCE shaped like Intel's SGX extension (PPID, PCE-ID, FMSPC)."""
    base = "1.2.840.113741.1.13.1"

    def item(sub: str, value: bytes) -> bytes:
        return _der_tlv(0x30, _der_oid(f"{base}.{sub}") + _der_tlv(0x04, value))

    return _der_tlv(0x30, item("1", b"\x00" * 16) + item("3", pce_id) + item("4", fmspc))


def sgx_report_body(
    *, mr_enclave: bytes, mr_signer: bytes, report_data: bytes, debug: bool = False, isv_prod_id: int = 0,
    isv_svn: int = 0, cpu_svn: bytes = b"\x01" * 16,
) -> bytes:
    """A 384-byte SGX report body."""
    if len(mr_enclave) != 32 or len(mr_signer) != 32 or len(report_data) > 64:
        raise InputError("MRENCLAVE/MRSIGNER must be 32 bytes and report data at most 64")
    flags = 0x01 | 0x04 | (0x02 if debug else 0)  # INIT | MODE64BIT | DEBUG?
    attributes = struct.pack("<QQ", flags, 0xE7)
    return b"".join([
        cpu_svn, struct.pack("<I", 0), b"\x00" * 12, b"\x00" * 16, attributes, mr_enclave, b"\x00" * 32,
        mr_signer, b"\x00" * 32, b"\x00" * 64, struct.pack("<HHH", isv_prod_id, isv_svn, 0), b"\x00" * 42,
        b"\x00" * 16, report_data.ljust(64, b"\x00"),
    ])


def td_report_body(*, mr_td: bytes, report_data: bytes, debug: bool = False, rtmr: bytes = b"") -> bytes:
    """A 584-byte TD report 1.0 body."""
    if len(mr_td) != 48 or len(report_data) > 64:
        raise InputError("MRTD must be 48 bytes and report data at most 64")
    td_attributes = bytes([0x01 if debug else 0x00]) + b"\x00" * 7
    rtmrs = (rtmr or b"").ljust(4 * 48, b"\x00")[: 4 * 48]
    return b"".join([
        b"\x03" + b"\x00" * 15, b"\x5b" * 48, b"\x00" * 48, b"\x00" * 8, td_attributes,
        struct.pack("<Q", 0xE7), mr_td, b"\x00" * 48, b"\x00" * 48, b"\x00" * 48, rtmrs,
        report_data.ljust(64, b"\x00"),
    ])


@dataclass
class TestPKI:
    """Root CA → PCK Platform CA → PCK leaf, plus a quoting enclave and its attestation key."""

    __test__ = False  # not a pytest class

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    pck_key: ec.EllipticCurvePrivateKey
    pck_cert: x509.Certificate
    attestation_key: ec.EllipticCurvePrivateKey
    qe_mr_enclave: bytes
    qe_mr_signer: bytes

    @classmethod
    def create(
        cls, now: datetime | None = None, *, valid_days: int = 3650, prefix: str = "veil TEST"
    ) -> TestPKI:
        now = now or datetime.now(UTC)
        start, end = now - timedelta(days=1), now + timedelta(days=valid_days)
        root_key, ca_key, pck_key = p256_key(), p256_key(), p256_key()

        def build(
            subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
            signer: ec.EllipticCurvePrivateKey, ca: bool, pathlen: int | None, sgx_ext: bool = False,
        ) -> x509.Certificate:
            b = (
                x509.CertificateBuilder()
                .subject_name(_name(subject))
                .issuer_name(issuer)
                .public_key(key.public_key())
                .serial_number(random_bits(63) | 1)
                .not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=not ca, content_commitment=not ca, key_encipherment=False,
                        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                        encipher_only=False, decipher_only=False,
                    ),
                    critical=True,
                )
            )
            if sgx_ext:
                blob = _sgx_extension(b"\x00\x90\x6e\xa1\x00\x00", b"\x00\x00")
                ext = x509.UnrecognizedExtension(SGX_EXTENSION_OID, blob)
                b = b.add_extension(ext, critical=False)
            return b.sign(signer, hashes.SHA256())

        root_name = _name(f"{prefix} SGX Root CA")
        root = build(f"{prefix} SGX Root CA", root_name, root_key, root_key, True, None)
        ca = build(f"{prefix} SGX PCK Platform CA", root.subject, ca_key, root_key, True, 0)
        pck = build(f"{prefix} SGX PCK Certificate", ca.subject, pck_key, ca_key, False, None, sgx_ext=True)
        return cls(
            root_key=root_key, root_cert=root, ca_key=ca_key, ca_cert=ca, pck_key=pck_key, pck_cert=pck,
            attestation_key=p256_key(), qe_mr_enclave=hashlib.sha256(b"veil test QE").digest(),
            qe_mr_signer=hashlib.sha256(b"veil test QE signer").digest(),
        )

    @property
    def root_der(self) -> bytes:
        """DER of the test root: pin it in ``SgxPolicy.trusted_root_der``."""
        return self.root_cert.public_bytes(Encoding.DER)

    def pem_chain(self) -> bytes:
        return b"".join(c.public_bytes(Encoding.PEM) for c in (self.pck_cert, self.ca_cert, self.root_cert))

    def _qe_block(self, *, bind_attestation_key: bool, qe_auth_data: bytes, chain: bytes | None) -> bytes:
        att_pub = _raw_pub(self.attestation_key)
        binding = hashlib.sha256(att_pub + qe_auth_data).digest()
        if not bind_attestation_key:
            binding = hashlib.sha256(b"some other key" + qe_auth_data).digest()
        qe_report = sgx_report_body(
            mr_enclave=self.qe_mr_enclave, mr_signer=self.qe_mr_signer, report_data=binding, isv_prod_id=1,
            isv_svn=8,
        )
        cert = chain if chain is not None else self.pem_chain()
        return b"".join([
            qe_report, _raw_sig(self.pck_key, qe_report), struct.pack("<H", len(qe_auth_data)), qe_auth_data,
            struct.pack("<HI", 5, len(cert)), cert,
        ])

    def _quote(self, version: int, tee_type: int, body: bytes, *, bind_attestation_key: bool,
               qe_auth_data: bytes, chain: bytes | None) -> bytes:
        header = struct.pack("<HHIHH", version, 2, tee_type, 8, 13) + _QE_VENDOR_ID + b"\x00" * 20
        signed = header + body
        sig = _raw_sig(self.attestation_key, signed)
        qe = self._qe_block(bind_attestation_key=bind_attestation_key, qe_auth_data=qe_auth_data, chain=chain)
        if version >= 4:
            qe = struct.pack("<HI", 6, len(qe)) + qe
        sig_data = sig + _raw_pub(self.attestation_key) + qe
        return signed + struct.pack("<I", len(sig_data)) + sig_data

    def sgx_quote(
        self, *, mr_enclave: bytes, mr_signer: bytes, report_data: bytes, debug: bool = False,
        isv_prod_id: int = 0, isv_svn: int = 0, bind_attestation_key: bool = True,
        qe_auth_data: bytes = bytes(range(32)), chain: bytes | None = None,
    ) -> bytes:
        """An SGX DCAP quote v3 for an enclave with these identities."""
        body = sgx_report_body(mr_enclave=mr_enclave, mr_signer=mr_signer, report_data=report_data,
                               debug=debug, isv_prod_id=isv_prod_id, isv_svn=isv_svn)
        return self._quote(3, TEE_TYPE_SGX, body, bind_attestation_key=bind_attestation_key,
                           qe_auth_data=qe_auth_data, chain=chain)

    def tdx_quote(
        self, *, mr_td: bytes, report_data: bytes, debug: bool = False, bind_attestation_key: bool = True,
        qe_auth_data: bytes = bytes(range(32)), chain: bytes | None = None,
    ) -> bytes:
        """A TDX DCAP quote v4 for a TD with this MRTD."""
        body = td_report_body(mr_td=mr_td, report_data=report_data, debug=debug)
        return self._quote(4, TEE_TYPE_TDX, body, bind_attestation_key=bind_attestation_key,
                           qe_auth_data=qe_auth_data, chain=chain)
