"""The KMS state: SQLite on disk, every secret sealed by the KMS's own enclave.

Tables: ``keys`` (one row per data-key version, key material sealed with aad = key id),
``meta`` (the sealed service identity), ``audit`` (every release and refusal). Restarting the KMS
with the same enclave (same code, same platform) unseals everything again; another enclave
cannot.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from veil.comm import codec
from veil.crypto.aead import X25519KeyPair
from veil.crypto.random import random_below, random_bytes
from veil.errors import DecryptionError, KMSError
from veil.serve.errors import UnknownKey
from veil.serve.kms.wire import AuditEntry, KeyInfo, ServiceIdentity
from veil.tee import Enclave

__all__ = ["KMSStore", "new_service_identity"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
  key_id TEXT PRIMARY KEY, model TEXT NOT NULL, version INTEGER NOT NULL, sealed BLOB NOT NULL,
  signer TEXT NOT NULL, created REAL NOT NULL, retired_at REAL,
  UNIQUE(model, version));
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, event TEXT NOT NULL, outcome TEXT NOT NULL,
  reason TEXT NOT NULL, measurement TEXT NOT NULL, tee TEXT NOT NULL, key_ids TEXT NOT NULL,
  worker_id TEXT NOT NULL, peer TEXT NOT NULL);
"""


def new_service_identity(
    common_name: str = "veil-service", hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> ServiceIdentity:
    """A fresh service identity: X25519 key + P-256 TLS key and a self-signed certificate."""
    kp = X25519KeyPair.generate()
    curve_order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    tls_key = ec.derive_private_key(random_below(curve_order - 1) + 1, ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(tls_key.public_key())
        .serial_number(int.from_bytes(random_bytes(16), "big") >> 1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(tls_key, hashes.SHA256())
    )
    return ServiceIdentity(
        x25519_private=kp.private_bytes(),
        x25519_public=kp.public_bytes,
        tls_key_pem=tls_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        tls_cert_pem=cert.public_bytes(serialization.Encoding.PEM),
    )


class KMSStore:
    """Sealed SQLite state. Thread-safe (one connection, one lock)."""

    def __init__(self, state_dir: Path, enclave: Enclave, *, clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.enclave = enclave
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "kms.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self.identity = self._load_or_create_identity()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ identity
    def _load_or_create_identity(self) -> ServiceIdentity:
        aad = b"veil-kms|service-identity"
        with self._lock:
            row = self._db.execute("SELECT v FROM meta WHERE k='service_identity'").fetchone()
            if row is not None:
                try:
                    return codec.decode(self.enclave.unseal(row[0], aad), ServiceIdentity)
                except DecryptionError as exc:
                    raise KMSError(
                        f"cannot unseal the KMS state in {self.dir}: it was sealed by another "
                        f"enclave or platform ({exc})"
                    ) from None
            ident = new_service_identity()
            self._db.execute(
                "INSERT INTO meta (k, v) VALUES ('service_identity', ?)",
                (self.enclave.seal(codec.encode(ident), aad),),
            )
            return ident

    # ------------------------------------------------------------------ keys
    @staticmethod
    def _aad(key_id: str, model: str, version: int) -> bytes:
        return f"veil-kms|key|{key_id}|{model}|{version}".encode()

    def add_key(self, model: str, key_id: str, key: bytes, signer: str) -> KeyInfo:
        if len(key) != 32:
            raise KMSError("data keys are 32 bytes")
        with self._lock:
            if self._db.execute("SELECT 1 FROM keys WHERE key_id=?", (key_id,)).fetchone():
                raise KMSError(f"key id {key_id} is already registered")
            row = self._db.execute("SELECT MAX(version) FROM keys WHERE model=?", (model,)).fetchone()
            version = int(row[0] or 0) + 1
            now = float(self.clock())
            self._db.execute(
                "INSERT INTO keys (key_id, model, version, sealed, signer, created) VALUES (?,?,?,?,?,?)",
                (
                    key_id,
                    model,
                    version,
                    self.enclave.seal(key, self._aad(key_id, model, version)),
                    signer,
                    now,
                ),
            )
        return KeyInfo(model=model, key_id=key_id, version=version, signer=signer, created=now, retired=False)

    def new_key(self, model: str, signer: str) -> tuple[KeyInfo, bytes]:
        key = random_bytes(32)
        return self.add_key(model, random_bytes(16).hex(), key, signer), key

    def retire(self, key_id: str) -> KeyInfo:
        with self._lock:
            cur = self._db.execute(
                "UPDATE keys SET retired_at=? WHERE key_id=? AND retired_at IS NULL",
                (float(self.clock()), key_id),
            )
            if (
                cur.rowcount == 0
                and not self._db.execute("SELECT 1 FROM keys WHERE key_id=?", (key_id,)).fetchone()
            ):
                raise UnknownKey(f"no key {key_id}")
        return self.info(key_id)

    def info(self, key_id: str) -> KeyInfo:
        with self._lock:
            row = self._db.execute(
                "SELECT model, key_id, version, signer, created, retired_at FROM keys WHERE key_id=?",
                (key_id,),
            ).fetchone()
        if row is None:
            raise UnknownKey(f"no key {key_id}")
        return KeyInfo(
            model=row[0],
            key_id=row[1],
            version=row[2],
            signer=row[3],
            created=row[4],
            retired=row[5] is not None,
        )

    def list_keys(self, model: str | None = None) -> list[KeyInfo]:
        q = "SELECT model, key_id, version, signer, created, retired_at FROM keys"
        args: tuple[str, ...] = ()
        if model:
            q += " WHERE model=?"
            args = (model,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY model, version", args).fetchall()
        return [
            KeyInfo(
                model=r[0], key_id=r[1], version=r[2], signer=r[3], created=r[4], retired=r[5] is not None
            )
            for r in rows
        ]

    def get_key(self, key_id: str) -> tuple[KeyInfo, bytes]:
        """The unsealed key; UnknownKey if absent or retired."""
        info = self.info(key_id)
        if info.retired:
            raise UnknownKey(f"key {key_id} ({info.model} v{info.version}) is retired")
        with self._lock:
            row = self._db.execute("SELECT sealed FROM keys WHERE key_id=?", (key_id,)).fetchone()
        try:
            key = self.enclave.unseal(row[0], self._aad(key_id, info.model, info.version))
        except DecryptionError as exc:
            raise KMSError(f"sealed key {key_id} does not unseal: {exc}") from None
        return info, key

    # ------------------------------------------------------------------ audit
    def audit(
        self,
        *,
        event: str,
        outcome: str,
        reason: str = "",
        measurement: str = "",
        tee: str = "",
        key_ids: list[str] | None = None,
        worker_id: str = "",
        peer: str = "",
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO audit (ts, event, outcome, reason, measurement, tee, key_ids, worker_id, peer) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    float(self.clock()),
                    event,
                    outcome,
                    reason,
                    measurement,
                    tee,
                    json.dumps(key_ids or []),
                    worker_id,
                    peer,
                ),
            )

    def audit_log(
        self, *, limit: int = 100, outcome: str | None = None, since_id: int = 0
    ) -> list[AuditEntry]:
        q = (
            "SELECT id, ts, event, outcome, reason, measurement, tee, key_ids, worker_id, peer "
            "FROM audit WHERE id>?"
        )
        args: list[object] = [since_id]
        if outcome:
            q += " AND outcome=?"
            args.append(outcome)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(q, args).fetchall()
        return [
            AuditEntry(
                id=r[0],
                ts=r[1],
                event=r[2],
                outcome=r[3],
                reason=r[4],
                measurement=r[5],
                tee=r[6],
                key_ids=json.loads(r[7]),
                worker_id=r[8],
                peer=r[9],
            )
            for r in rows
        ]
