from __future__ import annotations

import hashlib
import time
import tomllib
from pathlib import Path

import pytest

from veil.errors import AttestationError, ConfigError, DecryptionError, InputError
from veil.tee import Policy, SgxPolicy, Verifier, load_enclave
from veil.tee.dcap.testing import TestPKI
from veil.tee.gramine import ATTESTATION_DEVICE, GramineEnclave, gramine_available, write_manifest

MRENCLAVE = hashlib.sha256(b"gramine enclave").digest()
MRSIGNER = hashlib.sha256(b"gramine signer").digest()


def test_manifest_renders_as_toml(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    out = write_manifest(
        "veil.tune.enclave_server",
        tmp_path / "veil.manifest.template",
        [model, data_dir],
        "8G",
        args=["--port", "7000"],
        max_threads=16,
        env={"VEIL_LOG": 'a "quoted" value'},
        isv_prod_id=3,
        isv_svn=2,
        allowed_files=[tmp_path / "public.txt"],
    )
    m = tomllib.loads(out.read_text())
    assert m["loader"]["argv"][1:] == ["-m", "veil.tune.enclave_server", "--port", "7000"]
    assert m["libos"]["entrypoint"] == m["loader"]["argv"][0]
    assert m["loader"]["entrypoint"]["uri"] == "file:{{ gramine.libos }}"
    assert m["loader"]["env"]["VEIL_LOG"] == 'a "quoted" value'
    assert m["loader"]["env"]["VEIL_TEE_BACKEND"] == "gramine"
    sgx = m["sgx"]
    assert sgx["enclave_size"] == "8G" and sgx["max_threads"] == 16
    assert sgx["debug"] is False and sgx["remote_attestation"] == "dcap"
    assert sgx["isvprodid"] == 3 and sgx["isvsvn"] == 2
    trusted = sgx["trusted_files"]
    assert f"file:{model.resolve()}" in trusted and f"file:{data_dir.resolve()}/" in trusted
    veil_dir = Path(__import__("veil").__file__).resolve().parent
    assert any(t.startswith("file:") and str(veil_dir).startswith(t[5:].rstrip("/")) for t in trusted)
    assert sgx["allowed_files"] == [f"file:{(tmp_path / 'public.txt').resolve()}"]
    mounts = m["fs"]["mounts"]
    assert {"type": "tmpfs", "path": "/tmp"} in mounts
    assert any(x.get("type") == "encrypted" and x["key_name"] == "_sgx_mrenclave" for x in mounts)


def test_manifest_script_entrypoint_and_validation(tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text("print(1)\n")
    m = tomllib.loads(write_manifest(script, tmp_path / "m.toml", enclave_size="512M").read_text())
    assert m["loader"]["argv"][1] == str(script.resolve())
    assert f"file:{script.resolve()}" in m["sgx"]["trusted_files"]
    with pytest.raises(ConfigError, match="power of two"):
        write_manifest(script, tmp_path / "x", enclave_size="3G")
    with pytest.raises(ConfigError):
        write_manifest(script, tmp_path / "x", enclave_size="lots")
    with pytest.raises(ConfigError):
        write_manifest(script, tmp_path / "x", max_threads=0)
    with pytest.raises(ConfigError):
        write_manifest(script, tmp_path / "x", env={"BAD KEY": "1"})
    with pytest.raises(InputError):
        write_manifest("not a module!", tmp_path / "x")


def test_refuses_without_device(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="not running inside Gramine"):
        GramineEnclave(device=tmp_path / "no-attestation")
    with pytest.raises(AttestationError, match="not running inside Gramine"):
        load_enclave("gramine", code=[], config={}, device=tmp_path / "nope")


def _fake_device(tmp_path: Path, pki: TestPKI, report_data: bytes) -> Path:
    """A directory laid out like /dev/attestation whose quote carries `report_data`."""
    dev = tmp_path / "attestation"
    (dev / "keys").mkdir(parents=True)
    (dev / "attestation_type").write_text("dcap")
    (dev / "user_report_data").write_bytes(b"\x00" * 64)
    (dev / "quote").write_bytes(
        pki.sgx_quote(mr_enclave=MRENCLAVE, mr_signer=MRSIGNER, report_data=report_data)
    )
    (dev / "keys" / "_sgx_mrenclave").write_bytes(b"\x5a" * 16)
    return dev


def test_reads_fake_attestation_device(tmp_path: Path) -> None:
    """The /dev/attestation code path against a fake device tree holding a test-PKI quote."""
    pki = TestPKI.create()
    rd = b"R" * 64
    dev = _fake_device(tmp_path, pki, rd)
    enc = GramineEnclave(device=dev)
    assert enc.measurement == MRENCLAVE.hex() and not enc.simulated
    ev = enc.attest(rd)
    assert (dev / "user_report_data").read_bytes() == rd  # written before the quote was read
    assert ev.backend == "sgx-dcap" and ev.report_data == rd
    pol = Policy(
        allowed_measurements={MRENCLAVE.hex()},
        sgx=SgxPolicy(trusted_root_der=pki.root_der, accepted_tcb_statuses={"NotEvaluated"}),
    )
    assert Verifier(pol).verify(ev, report_data=rd).measurement == MRENCLAVE.hex()
    # the device returned a quote for other report data: refused at the source
    with pytest.raises(AttestationError, match="does not carry"):
        enc.attest(b"other")
    blob = enc.seal(b"secret", b"aad")
    assert enc.unseal(blob, b"aad") == b"secret"
    with pytest.raises(DecryptionError):
        enc.unseal(blob, b"other")
    (dev / "attestation_type").write_text("none")
    with pytest.raises(AttestationError, match="dcap"):
        GramineEnclave(device=dev)


@pytest.mark.skipif(not gramine_available(), reason="not inside Gramine-SGX: /dev/attestation is absent")
def test_real_gramine_device() -> None:  # pragma: no cover - needs SGX hardware
    enc = GramineEnclave()
    nonce = hashlib.sha256(str(time.time()).encode()).digest()
    ev = enc.attest(nonce)
    assert ev.report_data[:32] == nonce and ev.measurement == enc.measurement
    assert ATTESTATION_DEVICE.exists()
