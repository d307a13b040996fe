"""The ``gramine`` backend: a Gramine-SGX manifest for a veil entry point, and evidence from
Gramine's ``/dev/attestation`` pseudo-filesystem when veil runs inside a Gramine enclave.

Inside Gramine-SGX (``sgx.remote_attestation = "dcap"``):

* ``/dev/attestation/attestation_type`` reads ``dcap``;
* writing 64 bytes to ``/dev/attestation/user_report_data`` and then reading
  ``/dev/attestation/quote`` returns an SGX DCAP quote whose report data is those bytes;
* ``/dev/attestation/keys/_sgx_mrenclave`` is the 16-byte MRENCLAVE-bound sealing key.

The enclave's measurement is MRENCLAVE, i.e. what ``gramine-sgx-sign`` measured from the manifest
and its trusted files; the ``code``/``config`` given to :func:`load_enclave` are covered only if
they are trusted files. Evidence is ``backend="sgx-dcap"`` and is verified like any DCAP quote.
Outside Gramine the device is absent and :class:`GramineEnclave` raises ``AttestationError``: no
fallback to simulation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from veil.crypto.aead import aead_decrypt, aead_encrypt, hkdf_sha256
from veil.crypto.random import random_bytes
from veil.errors import AttestationError, ConfigError, DecryptionError, InputError
from veil.tee.base import register_backend
from veil.tee.dcap.quote import parse_quote
from veil.tee.dcap.verify import evidence_from_quote
from veil.tee.evidence import REPORT_DATA_SIZE, Evidence, pad_report_data

__all__ = ["ATTESTATION_DEVICE", "GramineEnclave", "gramine_available", "render_manifest", "write_manifest"]

log = logging.getLogger("veil.tee.gramine")

ATTESTATION_DEVICE = Path("/dev/attestation")
_SIZE_RE = re.compile(r"^(\d+)([KMG])$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEAL_VERSION = b"\x01"


def gramine_available(device: Path = ATTESTATION_DEVICE) -> bool:
    """True when running inside Gramine with an attestation device."""
    return (device / "quote").exists() and (device / "user_report_data").exists()


# ------------------------------------------------------------------ manifest


def _check_size(size: str) -> str:
    m = _SIZE_RE.match(size)
    if not m:
        raise ConfigError(f"enclave_size {size!r} must look like 512M, 4G, ... (a number and K/M/G)")
    n = int(m.group(1))
    if n <= 0 or n & (n - 1):
        raise ConfigError(f"enclave_size {size!r} must be a power of two (Gramine requires it)")
    return size


def render_manifest(
    entrypoint: str | Path,
    trusted_files: Sequence[str | Path] = (),
    enclave_size: str = "4G",
    *,
    args: Sequence[str] = (),
    python: str | None = None,
    max_threads: int = 32,
    debug: bool = False,
    edmm: bool = False,
    remote_attestation: Literal["dcap", "none"] = "dcap",
    env: Mapping[str, str] | None = None,
    allowed_files: Sequence[str | Path] = (),
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    sealed_dir: str | None = "/sealed",
    sealed_host_dir: str = "sealed",
    log_level: str = "error",
    arch_libdir: str = "/lib/x86_64-linux-gnu",
    omp_threads: int = 4,
    out_name: str = "veil.manifest.template",
) -> str:
    """The manifest template text (TOML with ``gramine-manifest`` placeholders in strings).

    ``entrypoint`` is a Python module (``veil.tune.enclave_server``) or a ``.py`` path. The Python
    standard library, the environment's site-packages (veil and its dependencies) and
    ``trusted_files`` are trusted (hashed into MRENCLAVE); ``allowed_files`` are readable but NOT
    integrity-protected (use only for data that is authenticated another way).
    """
    _check_size(enclave_size)
    if max_threads < 1:
        raise ConfigError("max_threads must be at least 1")
    if remote_attestation not in ("dcap", "none"):
        raise ConfigError("remote_attestation must be 'dcap' or 'none'")
    if not 0 <= isv_prod_id < 2**16 or not 0 <= isv_svn < 2**16:
        raise ConfigError("isv_prod_id and isv_svn must fit in 16 bits")
    if log_level not in ("none", "error", "warning", "debug", "trace", "all"):
        raise ConfigError(f"unknown Gramine log level {log_level!r}")
    env = dict(env or {})
    for k in env:
        if not _ENV_KEY_RE.match(k):
            raise ConfigError(f"environment variable name {k!r} is not valid")
    py = str(Path(python or sys.executable).resolve())
    ep = str(entrypoint)
    if ep.endswith(".py"):
        script = Path(ep).resolve()
        argv = [py, str(script), *args]
        entry_files = [str(script)]
        label = script.name
    else:
        if not re.match(r"^[A-Za-z_][\w.]*$", ep):
            raise InputError(f"entrypoint {ep!r} is neither a .py file nor a module name")
        argv = [py, "-m", ep, *args]
        entry_files = []
        label = ep
    paths = sysconfig.get_paths()
    veil_pkg = Path(__file__).resolve().parents[1]  # .../veil (editable installs live outside site-packages)
    lib_dirs = [str(Path(paths[k]).resolve()) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    code_dirs = _minimal_dirs([*lib_dirs, str(veil_pkg)])
    prefixes = [str(Path(sys.prefix).resolve()), str(Path(sys.base_prefix).resolve()), str(Path(py).parent)]
    mounts = _minimal_dirs([*prefixes, *code_dirs])
    trusted = [py, *(f"{d}/" for d in code_dirs), *entry_files,
               *(str(Path(f).resolve()) + ("/" if Path(f).is_dir() else "") for f in trusted_files)]
    q = _toml_str
    gl, grt = "{{ gramine.libos }}", "{{ gramine.runtimedir() }}"
    lines = [
        f"# Gramine manifest template for the veil entry point {label}",
        "# Generated by veil.tee.gramine.write_manifest. The {{ ... }} placeholders are filled by",
        "# `gramine-manifest`; `gramine-sgx-sign` then measures every trusted file into MRENCLAVE:",
        f"#   gramine-manifest {out_name} > veil.manifest",
        "#   gramine-sgx-sign --manifest veil.manifest --output veil.manifest.sgx && gramine-sgx veil",
        "",
        f"libos.entrypoint = {q(py)}",
        f"loader.entrypoint.uri = {q('file:' + gl)}",
        f"loader.log_level = {q(log_level)}",
        f"loader.argv = [{', '.join(q(a) for a in argv)}]",
        f"loader.env.LD_LIBRARY_PATH = {q(f'/lib:{arch_libdir}:/usr{arch_libdir}')}",
        'loader.env.PYTHONDONTWRITEBYTECODE = "1"',
        f"loader.env.OMP_NUM_THREADS = {q(str(omp_threads))}",
        'loader.env.VEIL_TEE_BACKEND = "gramine"',
        *(f"loader.env.{k} = {q(v)}" for k, v in sorted(env.items())),
        "",
        "sys.enable_sigterm_injection = true",
        'sys.stack.size = "2M"',
        "",
        "fs.mounts = [",
        f"  {{ path = \"/lib\", uri = {q('file:' + grt)} }},",
        f"  {{ path = {q(arch_libdir)}, uri = {q('file:' + arch_libdir)} }},",
        f"  {{ path = {q('/usr' + arch_libdir)}, uri = {q('file:/usr' + arch_libdir)} }},",
        *(f"  {{ path = {q(d)}, uri = {q('file:' + d)} }}," for d in mounts),
        '  { type = "tmpfs", path = "/tmp" },',
    ]
    if sealed_dir:
        lines.append(
            f"  {{ type = \"encrypted\", path = {q(sealed_dir)}, uri = {q('file:' + sealed_host_dir)}, "
            'key_name = "_sgx_mrenclave" },'
        )
    lines += [
        "]",
        "",
        f"sgx.enclave_size = {q(enclave_size)}",
        f"sgx.max_threads = {max_threads}",
        f"sgx.edmm_enable = {str(edmm).lower()}",
        f"sgx.debug = {str(debug).lower()}",
        f"sgx.remote_attestation = {q(remote_attestation)}",
        f"sgx.isvprodid = {isv_prod_id}",
        f"sgx.isvsvn = {isv_svn}",
        "",
        "sgx.trusted_files = [",
        f"  {q('file:' + gl)},",
        f"  {q('file:' + grt + '/')},",
        f"  {q('file:' + arch_libdir + '/')},",
        f"  {q('file:/usr' + arch_libdir + '/')},",
        *(f"  {q('file:' + f)}," for f in trusted),
        "]",
        "",
        "sgx.allowed_files = [",
        *(f"  {q('file:' + str(Path(f).resolve()))}," for f in allowed_files),
        "]",
        "",
    ]
    return "\n".join(lines)


def _minimal_dirs(dirs: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated directories with those inside another one removed."""
    out: list[str] = []
    for d in sorted(set(dirs)):
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in out):
            out.append(d)
    return out


def _toml_str(s: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(str(s), ensure_ascii=True)


def write_manifest(
    entrypoint: str | Path,
    out: str | Path,
    trusted_files: Sequence[str | Path] = (),
    enclave_size: str = "4G",
    **options: Any,
) -> Path:
    """Write the manifest template for ``entrypoint`` to ``out``; returns the path."""
    out = Path(out)
    text = render_manifest(entrypoint, trusted_files, enclave_size, out_name=out.name, **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    log.info("Gramine manifest for %s written to %s", entrypoint, out)
    return out


# ------------------------------------------------------------------ enclave


class GramineEnclave:
    """veil running inside a Gramine-SGX enclave (hardware; NOT simulated)."""

    backend = "sgx-dcap"
    simulated = False

    def __init__(
        self,
        *,
        code: Sequence[Path | bytes] = (),
        config: Mapping[str, Any] | None = None,
        device: Path = ATTESTATION_DEVICE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device = Path(device)
        self.config = dict(config or {})
        self._clock = clock
        if not gramine_available(self.device):
            raise AttestationError(
                f"gramine backend: {self.device} not found — veil is not running inside Gramine-SGX "
                "(use backend='simulated' explicitly for development)"
            )
        att_type = self._read("attestation_type").decode(errors="replace").strip()
        if att_type != "dcap":
            raise AttestationError(
                f"gramine backend: attestation_type is {att_type!r}; set sgx.remote_attestation = \"dcap\""
            )
        q = parse_quote(self._quote(b""))
        self.measurement = q.measurement
        self.debug = q.debug
        dbg = " (DEBUG enclave)" if self.debug else ""
        log.info("Gramine-SGX enclave, MRENCLAVE %s%s", self.measurement, dbg)

    def _read(self, name: str) -> bytes:
        try:
            return (self.device / name).read_bytes()
        except OSError as e:
            raise AttestationError(f"gramine backend: cannot read {self.device / name}: {e}") from e

    def _quote(self, report_data: bytes) -> bytes:
        try:
            with open(self.device / "user_report_data", "wb") as f:
                f.write(pad_report_data(report_data))
        except OSError as e:
            raise AttestationError(f"gramine backend: cannot write user_report_data: {e}") from e
        return self._read("quote")

    def attest(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, bytes | bytearray) or len(report_data) > REPORT_DATA_SIZE:
            raise InputError(f"report_data must be at most {REPORT_DATA_SIZE} bytes")
        ev = evidence_from_quote(self._quote(bytes(report_data)), timestamp=float(self._clock()))
        if ev.report_data != pad_report_data(bytes(report_data)):
            raise AttestationError("gramine backend: the quote does not carry the requested report data")
        return ev

    def _seal_key(self) -> bytes:
        raw = self._read("keys/_sgx_mrenclave")
        return hkdf_sha256(raw, salt=b"veil-gramine-seal-v1", info=b"seal:" + bytes.fromhex(self.measurement))

    def seal(self, data: bytes, aad: bytes = b"") -> bytes:
        nonce = random_bytes(12)
        return _SEAL_VERSION + nonce + aead_encrypt(self._seal_key(), nonce, bytes(data), _SEAL_VERSION + aad)

    def unseal(self, blob: bytes, aad: bytes = b"") -> bytes:
        if len(blob) < 29 or blob[:1] != _SEAL_VERSION:
            raise DecryptionError("sealed blob is malformed or of an unknown version")
        return aead_decrypt(self._seal_key(), blob[1:13], blob[13:], _SEAL_VERSION + aad)


def _factory(
    *, code: Sequence[Path | bytes] = (), config: Mapping[str, Any] | None = None, **options: Any
) -> GramineEnclave:
    device = Path(options.pop("device", os.environ.get("VEIL_GRAMINE_DEVICE", str(ATTESTATION_DEVICE))))
    return GramineEnclave(code=code, config=config, device=device, **options)


register_backend("gramine", _factory)
