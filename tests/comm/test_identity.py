"""PartyIdentity: files, permissions, fingerprints, trust store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from veil.comm.identity import PartyIdentity, cert_fingerprint, fingerprints_equal, normalize_fingerprint
from veil.errors import ConfigError, InputError


def test_create_and_load(tmp_path: Path) -> None:
    made = PartyIdentity.create("alice", tmp_path)
    loaded = PartyIdentity.load(tmp_path)
    assert loaded.name == "alice" and loaded.fingerprint == made.fingerprint
    der = x509.load_pem_x509_certificate(made.cert_pem).public_bytes(serialization.Encoding.DER)
    assert made.fingerprint == hashlib.sha256(der).hexdigest()
    cert = x509.load_pem_x509_certificate(made.cert_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert made.dns_name == "veil-alice"
    assert os.stat(tmp_path / "key.pem").st_mode & 0o777 == 0o600
    assert "PRIVATE" not in repr(made)


def test_two_identities_differ() -> None:
    a, b = PartyIdentity.generate("a"), PartyIdentity.generate("a")
    assert a.fingerprint != b.fingerprint and a.key_pem != b.key_pem


def test_load_refuses_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no party identity"):
        PartyIdentity.load(tmp_path)
    PartyIdentity.create("alice", tmp_path / "a")
    PartyIdentity.create("bob", tmp_path / "b")
    os.chmod(tmp_path / "a" / "key.pem", 0o644)
    with pytest.raises(InputError, match="readable by other users"):
        PartyIdentity.load(tmp_path / "a")
    os.chmod(tmp_path / "a" / "key.pem", 0o600)
    (tmp_path / "a" / "cert.pem").write_bytes((tmp_path / "b" / "cert.pem").read_bytes())
    with pytest.raises(InputError, match="does not match"):
        PartyIdentity.load(tmp_path / "a")
    (tmp_path / "a" / "cert.pem").write_text("garbage")
    with pytest.raises(InputError, match="not a PEM certificate"):
        PartyIdentity.load(tmp_path / "a")


def test_no_overwrite(tmp_path: Path) -> None:
    first = PartyIdentity.create("alice", tmp_path)
    with pytest.raises(InputError, match="refusing to overwrite"):
        PartyIdentity.create("alice", tmp_path)
    assert PartyIdentity.load(tmp_path).fingerprint == first.fingerprint
    second = PartyIdentity.create("alice", tmp_path, overwrite=True)
    assert PartyIdentity.load(tmp_path).fingerprint == second.fingerprint != first.fingerprint


def test_fingerprint_spellings() -> None:
    fp = PartyIdentity.generate("x").fingerprint
    colon = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    assert normalize_fingerprint(colon) == fp
    assert normalize_fingerprint("sha256:" + fp.upper()) == fp
    assert fingerprints_equal(colon, fp)
    assert not fingerprints_equal(fp, fp[:-1] + ("0" if fp[-1] != "0" else "1"))
    for bad in ("", "abc", fp + "00", "zz" * 32):
        with pytest.raises(ConfigError):
            normalize_fingerprint(bad)


def test_trust_store(tmp_path: Path) -> None:
    alice = PartyIdentity.create("alice", tmp_path / "a")
    bob = PartyIdentity.generate("bob")
    with pytest.raises(ConfigError, match="veil keys trust"):
        alice.peer_cert(bob.fingerprint)
    assert alice.trust(bob.cert_pem) == bob.fingerprint
    assert alice.peer_cert(bob.fingerprint) == bob.cert_pem
    # a tampered store entry is refused
    (tmp_path / "a" / "peers" / f"{bob.fingerprint}.pem").write_bytes(PartyIdentity.generate("m").cert_pem)
    with pytest.raises(ConfigError, match="does not hold"):
        alice.peer_cert(bob.fingerprint)
    with pytest.raises(InputError):
        alice.trust(b"not a cert")
    assert cert_fingerprint(bob.cert_pem) == bob.fingerprint
