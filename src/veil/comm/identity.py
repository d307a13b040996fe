"""Party identities: a self-signed ECDSA P-256 certificate per party, pinned by fingerprint.

Layout of an identity directory (``veil keys init --name alice --out DIR``)::

    DIR/key.pem          private key (PKCS#8 PEM, mode 0600)
    DIR/cert.pem         self-signed certificate (public; give it to your peers)
    DIR/peers/<fp>.pem   certificates of trusted peers, named by their SHA-256 fingerprint

The fingerprint is the SHA-256 of the certificate's DER encoding, as 64 lowercase hex digits.
A peer is trusted by fingerprint: ``veil keys trust DIR PEER_CERT`` stores the certificate
under its fingerprint, and channels look it up there (mutual TLS needs the peer certificate
itself as the trust root; the fingerprint pins which one).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.atomic import atomic_write_bytes
from veil.crypto.random import random_below, random_bits
from veil.errors import ConfigError, InputError

__all__ = ["PartyIdentity", "cert_dns_name", "cert_fingerprint", "normalize_fingerprint"]

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
PEERS_DIR = "peers"
# order of the P-256 group
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def normalize_fingerprint(fp: str) -> str:
    """Lowercase hex without separators; accepts ``AB:CD:..`` and a ``sha256:`` prefix."""
    s = fp.strip().lower()
    if s.startswith("sha256:"):
        s = s[len("sha256:") :]
    s = s.replace(":", "").replace(" ", "")
    if not re.fullmatch(r"[0-9a-f]{64}", s):
        raise ConfigError(f"not a SHA-256 certificate fingerprint (64 hex digits): {fp!r}")
    return s


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InputError(f"{what} is not a PEM certificate: {exc}") from exc


def cert_fingerprint(cert_pem: bytes) -> str:
    """SHA-256 over the DER encoding of a PEM certificate, 64 lowercase hex digits."""
    cert = _load_cert(cert_pem, "certificate")
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def fingerprints_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two fingerprints (any accepted spelling)."""
    return hmac.compare_digest(normalize_fingerprint(a).encode(), normalize_fingerprint(b).encode())


def cert_dns_name(cert_pem: bytes) -> str:
    """The first DNS subject-alternative name of a certificate (the TLS name channels check)."""
    cert = _load_cert(cert_pem, "certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise InputError("certificate has no subjectAltName; create it with `veil keys init`") from exc
    names = san.get_values_for_type(x509.DNSName)
    if not names:
        raise InputError("certificate has no DNS subjectAltName; create it with `veil keys init`")
    return str(names[0])


@dataclass(frozen=True)
class PartyIdentity:
    """One party's TLS identity (private key + self-signed certificate)."""

    name: str
    key_pem: bytes
    cert_pem: bytes
    directory: Path | None = None

    def __repr__(self) -> str:  # never print the key
        return f"PartyIdentity(name={self.name!r}, fingerprint={self.fingerprint[:16]}…)"

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert_pem)

    @property
    def dns_name(self) -> str:
        return cert_dns_name(self.cert_pem)

    # ------------------------------------------------------------------ creation / loading
    @classmethod
    def generate(cls, name: str, *, valid_days: int = 3650) -> PartyIdentity:
        """A new identity in memory (ECDSA P-256, self-signed, CN = SAN = ``veil-<name>``)."""
        if not _NAME_RE.fullmatch(name):
            raise InputError(
                f"invalid party name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit"
            )
        scalar = 1 + random_below(_P256_N - 1)  # veil.crypto.random is the only key source
        key = ec.derive_private_key(scalar, ec.SECP256R1())
        dns = "veil-" + re.sub(r"[^a-z0-9-]", "-", name.lower())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)])
        now = _dt.datetime.now(_dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(random_bits(159) | 1)
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(name=name, key_pem=key_pem, cert_pem=cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def create(cls, name: str, directory: str | Path, *, overwrite: bool = False) -> PartyIdentity:
        """Generate an identity and write ``key.pem`` (0600) and ``cert.pem`` into ``directory``."""
        d = Path(directory)
        key_path, cert_path = d / KEY_FILE, d / CERT_FILE
        if not overwrite and (key_path.exists() or cert_path.exists()):
            raise InputError(f"{d} already holds an identity; refusing to overwrite it")
        ident = cls.generate(name)
        # atomic (temp 0600 + fsync + rename): the key is never readable by others, and a crash
        # leaves the old identity or the new key, never a torn file
        atomic_write_bytes(key_path, ident.key_pem, mode=0o600)
        atomic_write_bytes(cert_path, ident.cert_pem, mode=0o644)
        return cls(name=name, key_pem=ident.key_pem, cert_pem=ident.cert_pem, directory=d)

    @classmethod
    def load(cls, directory: str | Path) -> PartyIdentity:
        """Load an identity written by :meth:`create` / ``veil keys init`` (InputError if absent/bad)."""
        d = Path(directory)
        key_path, cert_path = d / KEY_FILE, d / CERT_FILE
        if not key_path.is_file() or not cert_path.is_file():
            raise InputError(f"no party identity in {d} (expected {KEY_FILE} and {CERT_FILE}); "
                             "create one with `veil keys init --name NAME --out DIR`")
        if key_path.stat().st_mode & 0o077:
            raise InputError(f"{key_path} is readable by other users; run `chmod 600 {key_path}`")
        key_pem, cert_pem = key_path.read_bytes(), cert_path.read_bytes()
        cert = _load_cert(cert_pem, str(cert_path))
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{key_path} is not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InputError(f"{key_path} is not an ECDSA key")
        pub = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        cert_pub = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not hmac.compare_digest(pub, cert_pub):
            raise InputError(f"{key_path} does not match {cert_path}")
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else "?"
        name = cn[len("veil-") :] if cn.startswith("veil-") else cn
        return cls(name=name, key_pem=key_pem, cert_pem=cert_pem, directory=d)

    # ------------------------------------------------------------------ trusted peers
    def trust(self, peer_cert: bytes | str | Path) -> str:
        """Store a peer certificate in ``DIR/peers/<fingerprint>.pem``; returns the fingerprint."""
        if self.directory is None:
            raise ConfigError("this identity has no directory; pass peer_cert= to the channel instead")
        pem = read_cert(peer_cert)
        fp = cert_fingerprint(pem)
        peers = self.directory / PEERS_DIR
        peers.mkdir(exist_ok=True)
        atomic_write_bytes(peers / f"{fp}.pem", pem, mode=0o644)
        return fp

    def peer_cert(self, fingerprint: str) -> bytes:
        """The trusted certificate with this fingerprint (ConfigError if it was never trusted)."""
        fp = normalize_fingerprint(fingerprint)
        if self.directory is not None:
            path = self.directory / PEERS_DIR / f"{fp}.pem"
            if path.is_file():
                pem = path.read_bytes()
                if fingerprints_equal(cert_fingerprint(pem), fp):
                    return pem
                raise ConfigError(f"{path} does not hold the certificate with fingerprint {fp}")
        raise ConfigError(
            f"no certificate for peer fingerprint {fp} in "
            f"{(self.directory / PEERS_DIR) if self.directory else 'this identity'}; "
            "add it with `veil keys trust DIR PEER_CERT.pem` or pass peer_cert="
        )


def read_cert(cert: bytes | str | Path) -> bytes:
    """PEM bytes from PEM bytes, a certificate file, or an identity directory."""
    if isinstance(cert, bytes):
        pem = cert
    else:
        p = Path(cert)
        if p.is_dir():
            p = p / CERT_FILE
        if not p.is_file():
            raise InputError(f"certificate file not found: {p}")
        pem = p.read_bytes()
    _load_cert(pem, "peer certificate")
    return pem
