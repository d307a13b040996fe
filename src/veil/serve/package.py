"""Encrypted model packages (``model.veil``).

Layout (all integers big-endian)::

    magic      8 bytes   b"VEILPKG\\x01"
    header    14 bytes   manifest_len u32 | signature_len u16 | payload_len u64
    manifest   JSON (UTF-8, canonical: sorted keys, no spaces), <= MAX_MANIFEST_BYTES
    signature  Ed25519 over magic || header || manifest (64 bytes)
    payload    AES-256-GCM ciphertext (tag included) of the model bytes

The manifest carries name, version, format, input/output schema, the key id the payload is
encrypted under, the GCM nonce, the SHA-256 and length of the payload and the packager's
Ed25519 public key. The parser is strict: the file must be exactly as long as the header says,
every field is validated, the signature must verify and the payload hash must match before
anything is decrypted; any deviation is a :class:`PackageError` (an ``IntegrityError``).

The data key is never written beside the package: it is registered with the KMS or written to a
separate key file (:class:`KeyFile`) for later registration.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from veil.crypto.random import random_bytes
from veil.errors import InputError
from veil.serve import signing
from veil.serve.errors import PackageError

__all__ = [
    "MAGIC",
    "MAX_MANIFEST_BYTES",
    "MAX_PAYLOAD_BYTES",
    "KeyFile",
    "Manifest",
    "ModelFormat",
    "Package",
    "TensorSpec",
    "build_package",
    "decrypt_payload",
    "detect_format",
    "payload_aad",
    "read_package",
    "unpack_bundle",
]

MAGIC = b"VEILPKG\x01"
_HEADER = struct.Struct(">IHQ")
MAX_MANIFEST_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 8 << 30
MAX_BUNDLE_FILES = 64
SIGNATURE_LEN = 64
FORMAT_VERSION = 1

ModelFormat = Literal["onnx", "xgboost", "hf-causal-lm"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DATATYPES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
}
# Files of a Hugging Face directory that may go into a package: no pickles (.bin/.pt), ever.
_HF_ALLOWED = re.compile(
    r"^(config\.json|generation_config\.json|[A-Za-z0-9_.-]*\.safetensors|model\.safetensors\.index\.json|"
    r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|tokenizer\.model|vocab\.json|merges\.txt|"
    r"chat_template\.jinja|adapter_config\.json)$"
)


class TensorSpec(BaseModel):
    """One input or output tensor of the KServe v2 model metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=128)
    datatype: str
    shape: list[int] = Field(max_length=16)

    @field_validator("datatype")
    @classmethod
    def _dt(cls, v: str) -> str:
        if v not in _DATATYPES:
            raise ValueError(f"unknown datatype {v!r}")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if any(d < -1 for d in v):
            raise ValueError("shape dims must be >= -1 (-1 = dynamic)")
        return v


class Manifest(BaseModel):
    """The signed description of a package (everything but the model itself)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    name: str
    version: str = Field(default="1", pattern=r"^[A-Za-z0-9._-]{1,32}$")
    format: ModelFormat
    inputs: list[TensorSpec] = Field(max_length=64)
    outputs: list[TensorSpec] = Field(max_length=64)
    key_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    cipher: Literal["aes-256-gcm"] = "aes-256-gcm"
    payload_nonce: str = Field(pattern=r"^[0-9a-f]{24}$")
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    payload_len: int = Field(ge=16, le=MAX_PAYLOAD_BYTES)
    plaintext_len: int = Field(ge=0, le=MAX_PAYLOAD_BYTES)
    signer: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: float = Field(ge=0)
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("model name must be 1-64 chars of [A-Za-z0-9._-] and start alphanumeric")
        return v

    @field_validator("format_version")
    @classmethod
    def _fv(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"unsupported package format version {v}")
        return v

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Package:
    """A parsed, signature-checked package; the payload is still encrypted."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    payload: bytes

    @property
    def signer(self) -> bytes:
        return bytes.fromhex(self.manifest.signer)


class KeyFile(BaseModel):
    """The data key of a package, kept apart from it until registered with the KMS."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["veil-package-key"] = "veil-package-key"
    model: str
    key_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    signer: str = Field(pattern=r"^[0-9a-f]{64}$")

    def write(self, path: Path) -> None:
        from veil.atomic import atomic_write_text

        # hardening (issue 9): 0600 from creation (no open-then-chmod window) and atomic
        atomic_write_text(Path(path), self.model_dump_json(indent=2), mode=0o600)

    @classmethod
    def read(cls, path: Path) -> KeyFile:
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValidationError) as exc:
            raise InputError(f"cannot read key file {path}: {exc}") from None


def payload_aad(manifest_name: str, version: str, key_id: str, fmt: str) -> bytes:
    return f"veil-pkg-v1|{manifest_name}|{version}|{key_id}|{fmt}".encode()


# ----------------------------------------------------------------------------- format helpers


def detect_format(path: Path) -> ModelFormat:
    """Guess the model format of ``path`` (file or directory)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf-causal-lm"
        raise InputError(f"{path} is a directory without config.json (not a Hugging Face model)")
    if not path.is_file():
        raise InputError(f"model path {path} does not exist")
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix in (".json", ".ubj"):
        return "xgboost"
    raise InputError(f"cannot tell the format of {path}: use .onnx, an XGBoost .json, or an HF directory")


_ONNX_DT = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}


def _onnx_schema(raw: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    try:
        model = onnx.load_model_from_string(raw)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise InputError(f"not a valid ONNX model: {exc}") from None

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"ONNX value {vi.name!r} is not a tensor (sequence/map outputs are unsupported)")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        dt = _ONNX_DT.get(tt.elem_type)
        if dt is None:
            raise InputError(f"unsupported ONNX element type {tt.elem_type} for {vi.name!r}")
        return TensorSpec(name=vi.name, datatype=dt, shape=dims)

    inits = {i.name for i in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in inits]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def _xgb_schema(raw: bytes) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, str | int | float | bool]]:
    import xgboost as xgb

    booster = xgb.Booster()
    try:
        booster.load_model(bytearray(raw))
    except xgb.core.XGBoostError as exc:
        raise InputError(f"not a valid XGBoost model: {exc}") from None
    nf = booster.num_features()
    cfg = json.loads(booster.save_config())
    objective = str(cfg["learner"]["objective"]["name"])
    n_class = int(cfg["learner"]["learner_model_param"].get("num_class", "0") or 0)
    out_shape = [-1, n_class] if objective.startswith("multi:softprob") else [-1]
    params: dict[str, str | int | float | bool] = {"objective": objective, "num_features": nf}
    return (
        [TensorSpec(name="input__0", datatype="FP32", shape=[-1, nf])],
        [TensorSpec(name="output__0", datatype="FP32", shape=out_shape)],
        params,
    )


def _hf_bundle(
    model_dir: Path, adapter_dir: Path | None
) -> tuple[bytes, dict[str, str | int | float | bool]]:
    files: dict[str, bytes] = {}
    for prefix, d in (("model/", model_dir), ("adapter/", adapter_dir)):
        if d is None:
            continue
        d = Path(d)
        if not d.is_dir():
            raise InputError(f"{d} is not a directory")
        for f in sorted(d.iterdir()):
            if f.is_file() and _HF_ALLOWED.match(f.name):
                files[prefix + f.name] = f.read_bytes()
            elif f.is_file() and f.suffix in (".bin", ".pt", ".pth", ".pkl"):
                raise InputError(f"{f}: pickle-based weights are refused; save with safetensors")
    if "model/config.json" not in files:
        raise InputError(f"{model_dir} has no config.json")
    if not any(k.startswith("model/") and k.endswith(".safetensors") for k in files):
        raise InputError(f"{model_dir} has no *.safetensors weights")
    if adapter_dir is not None and "adapter/adapter_config.json" not in files:
        raise InputError(f"{adapter_dir} has no adapter_config.json")
    if len(files) > MAX_BUNDLE_FILES:
        raise InputError(f"too many files in the model directory ({len(files)} > {MAX_BUNDLE_FILES})")
    cfg = json.loads(files["model/config.json"])
    params: dict[str, str | int | float | bool] = {
        "model_type": str(cfg.get("model_type", "")),
        "vocab_size": int(cfg.get("vocab_size", 0)),
        "adapter": adapter_dir is not None,
        "tokenizer": "model/tokenizer.json" in files,
    }
    return msgspec.msgpack.encode(files), params


def unpack_bundle(plain: bytes) -> dict[str, bytes]:
    """Decode the file bundle of an ``hf-causal-lm`` payload (strictly typed)."""
    try:
        files = msgspec.msgpack.decode(plain, type=dict[str, bytes])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # invalid utf-8 name (hardening, issue 9)
        raise PackageError(f"malformed model bundle: {exc}") from None
    if len(files) > MAX_BUNDLE_FILES or any(not _HF_ALLOWED.match(k.split("/", 1)[-1]) for k in files):
        raise PackageError("model bundle contains unexpected files")
    return files


# ----------------------------------------------------------------------------- build / read


def build_package(
    model: Path,
    *,
    name: str,
    signing_key: signing.SigningKey,
    data_key: bytes,
    key_id: str,
    version: str = "1",
    adapter: Path | None = None,
    fmt: ModelFormat | None = None,
    clock: Any = time.time,
) -> bytes:
    """Encrypt ``model`` under ``data_key`` and return the signed package bytes."""
    from veil.crypto.aead import aead_encrypt

    if len(data_key) != 32:
        raise InputError("data key must be 32 bytes (AES-256)")
    fmt = fmt or detect_format(model)
    params: dict[str, str | int | float | bool] = {}
    if fmt == "onnx":
        plain = Path(model).read_bytes()
        inputs, outputs = _onnx_schema(plain)
    elif fmt == "xgboost":
        plain = Path(model).read_bytes()
        inputs, outputs, params = _xgb_schema(plain)
    elif fmt == "hf-causal-lm":
        plain, params = _hf_bundle(Path(model), adapter)
        vocab = int(params["vocab_size"])
        inputs = [TensorSpec(name="input_ids", datatype="INT64", shape=[-1, -1])]
        outputs = [TensorSpec(name="logits", datatype="FP32", shape=[-1, -1, vocab])]
    else:  # pragma: no cover - Literal guards this
        raise InputError(f"unknown format {fmt}")
    if adapter is not None and fmt != "hf-causal-lm":
        raise InputError("--adapter only applies to Hugging Face causal LM directories")
    if len(plain) > MAX_PAYLOAD_BYTES - 16:
        raise InputError(f"model is too large ({len(plain)} bytes > {MAX_PAYLOAD_BYTES})")
    nonce = random_bytes(12)
    ct = aead_encrypt(data_key, nonce, plain, payload_aad(name, version, key_id, fmt))
    try:
        manifest = Manifest(
            name=name,
            version=version,
            format=fmt,
            inputs=inputs,
            outputs=outputs,
            key_id=key_id,
            payload_nonce=nonce.hex(),
            payload_sha256=hashlib.sha256(ct).hexdigest(),
            payload_len=len(ct),
            plaintext_len=len(plain),
            signer=signing_key.public_bytes.hex(),
            created=float(clock()),
            parameters=params,
        )
    except ValidationError as exc:
        raise InputError(f"invalid package metadata: {exc}") from None
    mbytes = manifest.canonical_bytes()
    if len(mbytes) > MAX_MANIFEST_BYTES:
        raise InputError("manifest too large")
    header = _HEADER.pack(len(mbytes), SIGNATURE_LEN, len(ct))
    sig = signing_key.sign(MAGIC + header + mbytes)
    out = io.BytesIO()
    for part in (MAGIC, header, mbytes, sig, ct):
        out.write(part)
    return out.getvalue()


def read_package(
    data: bytes | Path,
    *,
    trusted_signers: Mapping[str, Any] | set[str] | None = None,
    max_payload: int = MAX_PAYLOAD_BYTES,
) -> Package:
    """Parse and verify a package (signature, lengths, payload hash). Nothing is decrypted."""
    if isinstance(data, Path):
        try:
            size = data.stat().st_size
        except OSError as exc:
            raise InputError(f"cannot read package {data}: {exc}") from None
        if size > max_payload + MAX_MANIFEST_BYTES + 1024:
            raise PackageError(f"package {data} is too large ({size} bytes)")
        data = data.read_bytes()
    data = bytes(data)
    hlen = len(MAGIC) + _HEADER.size
    if len(data) < hlen or data[: len(MAGIC)] != MAGIC:
        raise PackageError("not a veil package (bad magic)")
    mlen, slen, plen = _HEADER.unpack_from(data, len(MAGIC))
    if mlen > MAX_MANIFEST_BYTES:
        raise PackageError(f"manifest length {mlen} exceeds the limit {MAX_MANIFEST_BYTES}")
    if slen != SIGNATURE_LEN:
        raise PackageError(f"bad signature length {slen}")
    if plen > max_payload:
        raise PackageError(f"payload length {plen} exceeds the limit {max_payload}")
    if len(data) != hlen + mlen + slen + plen:
        raise PackageError(f"package length {len(data)} does not match its header (truncated or padded)")
    mbytes = data[hlen : hlen + mlen]
    sig = data[hlen + mlen : hlen + mlen + slen]
    payload = data[hlen + mlen + slen :]
    try:
        raw = json.loads(mbytes.decode("utf-8"))
        manifest = Manifest.model_validate(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
        raise PackageError(f"malformed manifest: {str(exc).splitlines()[0]}") from None
    if manifest.canonical_bytes() != mbytes:
        raise PackageError("manifest is not in canonical form")
    signer = bytes.fromhex(manifest.signer)
    if not signing.verify(signer, sig, data[:hlen] + mbytes):
        raise PackageError("package signature does not verify")
    if trusted_signers is not None and manifest.signer not in trusted_signers:
        raise PackageError(f"package signed by an untrusted key {manifest.signer[:16]}…")
    if manifest.payload_len != plen:
        raise PackageError("payload length does not match the manifest")
    if hashlib.sha256(payload).hexdigest() != manifest.payload_sha256:
        raise PackageError("payload SHA-256 does not match the manifest")
    return Package(manifest=manifest, manifest_bytes=mbytes, signature=sig, payload=payload)


def decrypt_payload(pkg: Package, data_key: bytes) -> bytes:
    """Decrypt the payload in memory (``IntegrityError`` if the key or ciphertext is wrong)."""
    from veil.crypto.aead import aead_decrypt
    from veil.errors import DecryptionError

    m = pkg.manifest
    try:
        plain = aead_decrypt(
            data_key,
            bytes.fromhex(m.payload_nonce),
            pkg.payload,
            payload_aad(m.name, m.version, m.key_id, m.format),
        )
    except DecryptionError as exc:
        raise PackageError(f"payload does not decrypt under the released key: {exc}") from None
    if len(plain) != m.plaintext_len:
        raise PackageError("decrypted payload length does not match the manifest")
    return plain
