from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from veil.errors import AttestationError
from veil.tee import Policy, SgxPolicy, Verifier
from veil.tee.dcap.testing import TestPKI
from veil.tee.tsm import TSM_REPORT_ROOT, TsmEnclave, tsm_available

MRTD = hashlib.sha384(b"confidential vm").digest()


def _fake_tsm(tmp_path: Path, outblob: bytes, provider: str) -> Path:
    """A configfs-tsm report tree with one pre-made entry (plain dirs cannot emulate configfs mkdir)."""
    root = tmp_path / "tsm" / "report"
    e = root / "veil"
    e.mkdir(parents=True)
    (e / "outblob").write_bytes(outblob)
    (e / "provider").write_text(provider + "\n")
    (e / "generation").write_text("1\n")
    return root


def test_refuses_when_absent(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="configfs-tsm"):
        TsmEnclave(root=tmp_path / "missing")


def test_tdx_through_fake_configfs(tmp_path: Path) -> None:
    pki = TestPKI.create()
    rd = b"T" * 64
    root = _fake_tsm(tmp_path, pki.tdx_quote(mr_td=MRTD, report_data=rd), "tdx_guest")
    enc = TsmEnclave(root=root, entry="veil")
    assert enc.backend == "tdx-dcap" and enc.measurement == MRTD.hex() and not enc.simulated
    ev = enc.attest(rd)
    assert (root / "veil" / "inblob").read_bytes() == rd
    pol = Policy(
        allowed_measurements={MRTD.hex()},
        sgx=SgxPolicy(trusted_root_der=pki.root_der, accepted_tcb_statuses={"NotEvaluated"}),
    )
    assert Verifier(pol).verify(ev, report_data=rd).backend == "tdx-dcap"
    with pytest.raises(AttestationError, match="does not carry"):
        enc.attest(b"x")
    with pytest.raises(AttestationError, match="sealing"):
        enc.seal(b"x")


def test_sev_snp_report_is_produced_but_refused_by_verifier(tmp_path: Path) -> None:
    rd = b"S" * 64
    report = bytearray(0x4A0)
    report[0:4] = struct.pack("<I", 2)
    report[0x08:0x10] = struct.pack("<Q", 1 << 17)  # policy without the debug bit
    report[0x50:0x90] = rd
    report[0x90:0xC0] = b"\x77" * 48
    root = _fake_tsm(tmp_path, bytes(report), "sev_guest")
    enc = TsmEnclave(root=root, entry="veil")
    ev = enc.attest(rd)
    assert ev.backend == "sev-snp" and ev.measurement == "77" * 48 and not ev.debug
    with pytest.raises(AttestationError, match="check 'backend'"):
        Verifier(Policy(allowed_measurements={"77" * 48})).verify(ev)


@pytest.mark.skipif(
    not tsm_available(), reason="no configfs-tsm (/sys/kernel/config/tsm/report): not a TDX/SNP guest"
)
def test_real_configfs_tsm() -> None:  # pragma: no cover - needs a confidential VM
    if os.geteuid() != 0:
        pytest.skip("configfs-tsm needs root")
    enc = TsmEnclave()
    ev = enc.attest(b"n" * 64)
    assert ev.report_data == b"n" * 64 and TSM_REPORT_ROOT.exists()
