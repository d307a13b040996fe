"""The ``simulated`` enclave backend: same code path as a real TEE, no hardware protection.

* measurement = SHA-256 over the code (files, directories, bytes) and the canonical JSON of the
  config the enclave loads (see :func:`measure`);
* evidence is signed with a per-machine *simulated platform key* (Ed25519), kept at
  ``$VEIL_HOME/sim-platform-key`` (default ``~/.veil``), mode 0600, created on first use;
* sealing key = HKDF-SHA256(platform key, info = measurement); seal = AES-256-GCM with aad.

Anyone who can read the platform key file can forge evidence and unseal data, so verifiers
refuse simulated evidence unless their policy says ``allow_simulated=True`` and every log line
and result says ``simulated``. It exists so the whole stack runs and is tested without SGX/TDX.

:class:`SimulatedEnclave` runs in-process; :class:`SimulatedEnclaveProcess` keeps the platform
key in a child process and talks to it over a pipe with msgspec-encoded messages, so the parent
never holds the key. (The start-up arguments — code paths, config JSON — reach the child through
multiprocessing's spawn, which pickles them; every request and answer afterwards is msgspec.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.crypto.aead import aead_decrypt, aead_encrypt, hkdf_sha256
from veil.crypto.random import random_bytes
from veil.errors import AttestationError, ConfigError, DecryptionError, InputError, VeilError
from veil.tee.base import register_backend
from veil.tee.evidence import REPORT_DATA_SIZE, Evidence, pad_report_data, signed_body

__all__ = [
    "SimulatedEnclave",
    "SimulatedEnclaveProcess",
    "load_platform_key",
    "measure",
    "platform_public_key",
    "veil_home",
]

log = logging.getLogger("veil.tee.simulated")

BACKEND = "simulated"
_MEASURE_DOMAIN = b"veil-measurement-v1"
_SEAL_VERSION = b"\x01"
_SEAL_SALT = b"veil-simulated-seal-v1"


def veil_home() -> Path:
    """``$VEIL_HOME`` or ``~/.veil``."""
    env = os.environ.get("VEIL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".veil"


# ---------------------------------------------------------------- measurement


def _lp(b: bytes) -> bytes:
    return struct.pack(">Q", len(b)) + b


def canonical_config(config: Mapping[str, Any]) -> bytes:
    """Canonical JSON of ``config`` (sorted keys, no spaces); ConfigError if not JSON-able."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"enclave config must be JSON-serialisable: {e}") from e


def measure(code: Sequence[Path | bytes], config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over the code items in order and the canonical config.

    A file contributes its bytes; a directory contributes every regular file below it, sorted,
    as (relative POSIX path, bytes); raw bytes contribute themselves. Everything is
    length-prefixed and tagged, so no two different inputs hash alike by concatenation.
    """
    h = hashlib.sha256(_MEASURE_DOMAIN)
    for item in code:
        if isinstance(item, bytes | bytearray):
            h.update(b"B" + _lp(bytes(item)))
            continue
        path = Path(item)
        if path.is_file():
            h.update(b"F" + _lp(path.read_bytes()))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
            h.update(b"D" + struct.pack(">Q", len(files)))
            for f in files:
                h.update(_lp(f.relative_to(path).as_posix().encode()) + _lp(f.read_bytes()))
        else:
            raise InputError(f"enclave code item {path} does not exist")
    h.update(b"C" + _lp(canonical_config(config)))
    return h.hexdigest()


# ---------------------------------------------------------------- platform key

_key_lock = threading.Lock()


def _key_path(home: Path | None) -> Path:
    return (home if home is not None else veil_home()) / "sim-platform-key"


def load_platform_key(home: Path | None = None) -> Ed25519PrivateKey:
    """The simulated platform key, created (0600, atomically) on first use."""
    path = _key_path(home)
    with _key_lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = Ed25519PrivateKey.from_private_bytes(random_bytes(32))
            raw = key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{random_bytes(4).hex()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, raw)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # atomic; loses gracefully to a concurrent creator
                log.warning("created SIMULATED platform key at %s (not hardware-backed)", path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"simulated platform key {path} must be private (mode 0600), has {oct(mode)}")
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ConfigError(f"simulated platform key {path} is corrupt ({len(raw)} bytes, expected 32)")
        return Ed25519PrivateKey.from_private_bytes(raw)


def _public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def platform_public_key(home: Path | None = None) -> bytes:
    """Raw 32-byte Ed25519 public key of this machine's simulated platform (for policies)."""
    return _public_raw(load_platform_key(home))


# ---------------------------------------------------------------- enclave


class SimulatedEnclave:
    """In-process simulated enclave. Loudly insecure; see the module docstring."""

    backend = BACKEND
    simulated = True

    def __init__(
        self,
        *,
        code: Sequence[Path | bytes] = (),
        config: Mapping[str, Any] | None = None,
        debug: bool = False,
        home: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = dict(config or {})
        self.measurement = measure(code, self.config)
        self.debug = debug
        self._clock = clock
        self._key = load_platform_key(home)
        self.platform_key = _public_raw(self._key)
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        self._seal_key = hkdf_sha256(raw, salt=_SEAL_SALT, info=b"seal:" + bytes.fromhex(self.measurement))
        log.warning("SIMULATED enclave loaded, measurement %s (no hardware protection)", self.measurement)

    def __repr__(self) -> str:
        return f"SimulatedEnclave(measurement={self.measurement[:16]}…, simulated=True)"

    def attest(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, bytes | bytearray) or len(report_data) > REPORT_DATA_SIZE:
            raise InputError(f"report_data must be at most {REPORT_DATA_SIZE} bytes")
        rd = pad_report_data(bytes(report_data))
        ts = float(self._clock())
        body = signed_body(
            backend=BACKEND, measurement=self.measurement, report_data=rd, timestamp=ts,
            debug=self.debug, simulated=True, platform_key=self.platform_key,
        )
        ev = Evidence(
            backend=BACKEND, measurement=self.measurement, report_data=rd, timestamp=ts, debug=self.debug,
            simulated=True, quote=b"", signature=self._key.sign(body), platform_key=self.platform_key,
        )
        log.info("SIMULATED evidence produced for measurement %s", self.measurement[:16])
        return ev

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        nonce = random_bytes(12)
        ct = aead_encrypt(self._seal_key, nonce, bytes(data), _SEAL_VERSION + bytes(aad))
        return _SEAL_VERSION + nonce + ct

    def unseal(self, blob: bytes, aad: bytes = b"") -> bytes:
        if len(blob) < 1 + 12 + 16 or blob[:1] != _SEAL_VERSION:
            raise DecryptionError("sealed blob is malformed or of an unknown version (simulated enclave)")
        try:
            return aead_decrypt(self._seal_key, blob[1:13], blob[13:], _SEAL_VERSION + bytes(aad))
        except DecryptionError as e:
            raise DecryptionError(
                "unseal failed: tampered blob, wrong aad, or sealed by another enclave/platform (simulated)"
            ) from e


# ---------------------------------------------------------------- child-process variant


class _Req(msgspec.Struct, frozen=True):
    op: str
    data: bytes = b""
    aad: bytes = b""


class _Resp(msgspec.Struct, frozen=True):
    ok: bool
    data: bytes = b""
    error: str = ""
    kind: str = ""


class _Hello(msgspec.Struct, frozen=True):
    measurement: str = ""
    error: str = ""


_ERRORS: dict[str, type[VeilError]] = {
    "DecryptionError": DecryptionError,
    "InputError": InputError,
    "ConfigError": ConfigError,
    "AttestationError": AttestationError,
}


def _child_main(conn: Connection, code: list[str | bytes], config_json: str, debug: bool, home: str) -> None:
    enc = msgspec.msgpack.Encoder()
    try:
        enclave = SimulatedEnclave(
            code=[Path(c) if isinstance(c, str) else c for c in code], config=json.loads(config_json),
            debug=debug, home=Path(home),
        )
    except VeilError as e:
        conn.send_bytes(enc.encode(_Hello(error=f"{type(e).__name__}: {e}")))
        return
    conn.send_bytes(enc.encode(_Hello(measurement=enclave.measurement)))
    dec = msgspec.msgpack.Decoder(_Req)
    while True:
        try:
            req = dec.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if req.op == "close":
            return
        try:
            if req.op == "attest":
                out = msgspec.msgpack.encode(enclave.attest(req.data))
            elif req.op == "seal":
                out = enclave.seal(req.data, req.aad)
            elif req.op == "unseal":
                out = enclave.unseal(req.data, req.aad)
            else:
                raise InputError(f"unknown op {req.op!r}")
            conn.send_bytes(enc.encode(_Resp(ok=True, data=out)))
        except VeilError as e:
            conn.send_bytes(enc.encode(_Resp(ok=False, error=str(e), kind=type(e).__name__)))


class SimulatedEnclaveProcess:
    """A simulated enclave living in a child process (the parent never sees the platform key).

    Use as a context manager or call :meth:`close`. Every call has a timeout.
    """

    backend = BACKEND
    simulated = True

    def __init__(
        self,
        *,
        code: Sequence[Path | bytes] = (),
        config: Mapping[str, Any] | None = None,
        debug: bool = False,
        home: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self.debug = debug
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        items: list[str | bytes] = [str(Path(c).resolve()) if not isinstance(c, bytes) else c for c in code]
        self._proc = ctx.Process(
            target=_child_main,
            args=(child, items, canonical_config(config or {}).decode(), debug, str(home or veil_home())),
            daemon=True,
            name="veil-simulated-enclave",
        )
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        hello = msgspec.msgpack.decode(self._recv(), type=_Hello)
        if hello.error:
            self.close()
            raise ConfigError(f"simulated enclave child failed to start: {hello.error}")
        self.measurement = hello.measurement
        log.warning("SIMULATED enclave started in child process %s, measurement %s", self._proc.pid,
                    self.measurement)

    def _recv(self) -> bytes:
        if not self._conn.poll(self.timeout):
            raise AttestationError(f"simulated enclave child did not answer within {self.timeout}s")
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError) as e:
            raise AttestationError("simulated enclave child process died") from e

    def _call(self, op: str, data: bytes, aad: bytes = b"") -> bytes:
        with self._lock:
            if not self._proc.is_alive():
                raise AttestationError("simulated enclave child process is not running")
            self._conn.send_bytes(msgspec.msgpack.encode(_Req(op=op, data=bytes(data), aad=bytes(aad))))
            resp = msgspec.msgpack.decode(self._recv(), type=_Resp)
        if not resp.ok:
            raise _ERRORS.get(resp.kind, AttestationError)(resp.error)
        return resp.data

    def attest(self, report_data: bytes) -> Evidence:
        return msgspec.msgpack.decode(self._call("attest", report_data), type=Evidence)

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        return self._call("seal", data, aad)

    def unseal(self, blob: bytes, aad: bytes = b"") -> bytes:
        return self._call("unseal", blob, aad)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def close(self) -> None:
        try:
            if self._proc.is_alive():
                with self._lock:
                    self._conn.send_bytes(msgspec.msgpack.encode(_Req(op="close")))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._conn.close()

    def __enter__(self) -> SimulatedEnclaveProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _factory(
    *, code: Sequence[Path | bytes] = (), config: Mapping[str, Any] | None = None, process: bool = False,
    **options: Any,
) -> SimulatedEnclave | SimulatedEnclaveProcess:
    if process:
        return SimulatedEnclaveProcess(code=code, config=config, **options)
    return SimulatedEnclave(code=code, config=config, **options)


register_backend(BACKEND, _factory)
