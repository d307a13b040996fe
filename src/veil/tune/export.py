"""Export of the fine-tuned weights, encrypted to the model owner's X25519 public key.

The enclave serialises either the adapter only (peft-compatible names for the *unsplit* model
plus an ``adapter_config``) or the merged server-part weights (LoRA folded into the base
weights) as safetensors, and encrypts the bytes to the owner's key (X25519 ephemeral-static +
HKDF-SHA256 + AES-256-GCM, all from :mod:`veil.crypto.aead`). Only the owner's private key
opens the file; the host that stores it sees ciphertext.

File layout: ``b"VEILTEX1" || ephemeral_public (32) || nonce (12) || AES-GCM(ct || tag)``,
with the 8-byte magic + ephemeral key + owner key fingerprint as associated data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from veil.atomic import atomic_write_bytes, atomic_write_text
from veil.crypto.aead import X25519KeyPair, aead_decrypt, aead_encrypt, hkdf_sha256
from veil.crypto.random import random_bytes
from veil.errors import CryptoError, DecryptionError, InputError, IntegrityError

__all__ = [
    "OWNER_PRIVATE_FILE",
    "OWNER_PUBLIC_FILE",
    "decrypt_export",
    "encrypt_to_owner",
    "export_payload",
    "generate_owner_keys",
    "load_owner_private",
    "load_owner_public",
    "write_export_dir",
]

MAGIC = b"VEILTEX1"
_INFO = b"veil-tune-export-v1"
OWNER_PRIVATE_FILE = "owner.x25519"
OWNER_PUBLIC_FILE = "owner.x25519.pub"


def _key_for(shared: bytes, eph_pub: bytes, owner_pub: bytes) -> bytes:
    return hkdf_sha256(shared, salt=eph_pub + owner_pub, info=_INFO)


def _aad(eph_pub: bytes, owner_pub: bytes) -> bytes:
    return MAGIC + eph_pub + hashlib.sha256(owner_pub).digest()


def encrypt_to_owner(data: bytes, owner_public: bytes) -> bytes:
    """Encrypt ``data`` so that only the holder of the owner's X25519 private key can read it."""
    if len(owner_public) != 32:
        raise InputError("the model owner's public key must be a 32-byte X25519 key")
    eph = X25519KeyPair.generate()
    try:
        shared = eph.exchange(owner_public)
    except CryptoError as e:
        raise InputError(f"invalid model-owner public key: {e}") from e
    key = _key_for(shared, eph.public_bytes, owner_public)
    nonce = random_bytes(12)
    return (
        MAGIC
        + eph.public_bytes
        + nonce
        + aead_encrypt(key, nonce, data, _aad(eph.public_bytes, owner_public))
    )


def decrypt_export(blob: bytes, owner: X25519KeyPair) -> bytes:
    """Open an export with the owner's key pair; :class:`DecryptionError` if it is not for us."""
    if len(blob) < 8 + 32 + 12 + 16 or blob[:8] != MAGIC:
        raise DecryptionError("not a veil tune export (bad magic or truncated)")
    eph_pub, nonce, ct = blob[8:40], blob[40:52], blob[52:]
    shared = owner.exchange(eph_pub)
    key = _key_for(shared, eph_pub, owner.public_bytes)
    return aead_decrypt(key, nonce, ct, _aad(eph_pub, owner.public_bytes))


def export_payload(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """safetensors bytes with the (JSON-encoded) metadata."""
    return bytes(
        st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"veil": json.dumps(meta)})
    )


def read_payload(raw: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = st_load(raw)
    except Exception as e:  # safetensors has its own error type
        raise IntegrityError(f"export payload is malformed: {e}") from e
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.get("__metadata__", {}).get("veil", "{}"))
    return tensors, meta


def write_export_dir(blob: bytes, owner: X25519KeyPair, out_dir: Path) -> dict[str, Any]:
    """Decrypt an export and write it as files the owner can use.

    Adapter-only LoRA → ``adapter_model.safetensors`` + ``adapter_config.json`` (peft layout, for
    ``PeftModel.from_pretrained(base, out_dir)``); merged → ``model.safetensors`` holding the
    server-part tensors under the unsplit model's names. Returns the metadata.
    """
    raw = decrypt_export(blob, owner)
    tensors, meta = read_payload(raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    # decrypted weights: owner-only files, each written atomically (veil.atomic); the metadata
    # file comes last, so its presence means the weights beside it are complete
    if meta.get("kind") == "adapter":
        atomic_write_bytes(out_dir / "adapter_model.safetensors", bytes(st_save(tensors)), mode=0o600)
        cfg = json.dumps(meta.get("adapter_config", {}), indent=2)
        atomic_write_text(out_dir / "adapter_config.json", cfg)
    else:
        atomic_write_bytes(out_dir / "model.safetensors", bytes(st_save(tensors)), mode=0o600)
    atomic_write_text(out_dir / "veil_export.json", json.dumps(meta, indent=2))
    return dict(meta)


# ------------------------------------------------------------------ owner keys


def generate_owner_keys(out_dir: Path) -> bytes:
    """Create the model owner's X25519 key pair in ``out_dir``; returns the public key."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kp = X25519KeyPair.generate()
    priv = out_dir / OWNER_PRIVATE_FILE
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(kp.private_bytes().hex() + "\n")
    (out_dir / OWNER_PUBLIC_FILE).write_text(kp.public_bytes.hex() + "\n")
    return kp.public_bytes


def _read_hex_key(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise InputError(f"{what} file {path} is not hex") from None
    if len(key) != 32:
        raise InputError(f"{what} file {path} must hold a 32-byte X25519 key")
    return key


def load_owner_public(path: Path) -> bytes:
    p = path / OWNER_PUBLIC_FILE if path.is_dir() else path
    return _read_hex_key(p, "owner public key")


def load_owner_private(path: Path) -> X25519KeyPair:
    p = path / OWNER_PRIVATE_FILE if path.is_dir() else path
    return X25519KeyPair.from_private_bytes(_read_hex_key(p, "owner private key"))
