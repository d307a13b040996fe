from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import msgspec
import pytest

from veil.comm import codec
from veil.errors import ConfigError, DecryptionError, InputError
from veil.tee import Evidence, SimulatedEnclave, SimulatedEnclaveProcess, load_enclave, measure
from veil.tee.simulated import platform_public_key


def test_measurement_covers_code_and_config(tmp_path: Path) -> None:
    f = tmp_path / "model.py"
    f.write_text("print('a')\n")
    m1 = measure([f], {"lr": 0.1})
    assert m1 == measure([f], {"lr": 0.1})
    assert len(bytes.fromhex(m1)) == 32
    assert m1 != measure([f], {"lr": 0.2})
    f.write_text("print('b')\n")
    assert m1 != measure([f], {"lr": 0.1})
    # concatenation ambiguity is ruled out by length prefixes
    assert measure([b"ab", b"c"], {}) != measure([b"a", b"bc"], {})
    # directories: relative paths and contents count
    d = tmp_path / "pkg"
    d.mkdir()
    (d / "x.py").write_text("1")
    md = measure([d], {})
    (d / "x.py").rename(d / "y.py")
    assert measure([d], {}) != md


def test_measurement_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        measure([tmp_path / "missing.py"], {})
    with pytest.raises(ConfigError):
        measure([b"x"], {"f": object()})


def test_platform_key_created_private_and_stable(veil_home: Path) -> None:
    pk1 = platform_public_key()
    path = veil_home / "sim-platform-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert platform_public_key() == pk1
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="0600"):
        platform_public_key()


def test_attest_labels_and_signature_fields() -> None:
    enc = SimulatedEnclave(code=[b"code"], config={"a": 1})
    ev = enc.attest(b"hello")
    assert ev.backend == "simulated" and ev.simulated is True
    assert ev.report_data == b"hello" + b"\x00" * 59
    assert len(ev.signature) == 64 and len(ev.platform_key) == 32
    assert ev.measurement == enc.measurement
    assert "SIMULATED" in ev.describe()
    with pytest.raises(InputError):
        enc.attest(b"x" * 65)
    # evidence crosses the wire as a veil.comm message
    back = codec.decode(codec.encode(ev), Evidence)
    assert back == ev


def test_logs_say_simulated(caplog: pytest.LogCaptureFixture) -> None:
    from veil.tee import EnclaveKeyExchange, Policy, Verifier, client_key_exchange, new_nonce

    with caplog.at_level(logging.DEBUG, logger="veil.tee"):
        enc = load_enclave("simulated", code=[b"c"], config={})
        kx = EnclaveKeyExchange(enc)
        nonce = new_nonce()
        verifier = Verifier(
            Policy(
                allow_simulated=True,
                trust_any_simulated_platform=True,
                allowed_measurements={enc.measurement},
            )
        )
        pub, _ = client_key_exchange(kx.offer(nonce), verifier, nonce)
        kx.finish(pub)
        enc.seal(b"x")
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("veil.tee")]
    assert len(msgs) >= 5
    assert all("simulated" in m.lower() for m in msgs), msgs


def test_seal_unseal() -> None:
    enc = SimulatedEnclave(code=[b"code"], config={})
    blob = enc.seal(b"secret weights", aad=b"model-1")
    assert b"secret weights" not in blob
    assert enc.unseal(blob, aad=b"model-1") == b"secret weights"
    # same code + same platform -> same sealing key (survives restart)
    assert SimulatedEnclave(code=[b"code"], config={}).unseal(blob, aad=b"model-1") == b"secret weights"
    with pytest.raises(DecryptionError):
        enc.unseal(blob, aad=b"model-2")
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        enc.unseal(bytes(tampered), aad=b"model-1")
    other = SimulatedEnclave(code=[b"other code"], config={})
    with pytest.raises(DecryptionError):
        other.unseal(blob, aad=b"model-1")
    with pytest.raises(DecryptionError):
        enc.unseal(b"\x01short")


def test_other_platform_cannot_unseal(tmp_path: Path) -> None:
    a = SimulatedEnclave(code=[b"code"], config={}, home=tmp_path / "a")
    b = SimulatedEnclave(code=[b"code"], config={}, home=tmp_path / "b")
    assert a.measurement == b.measurement
    with pytest.raises(DecryptionError):
        b.unseal(a.seal(b"x"))


def test_unknown_backend() -> None:
    with pytest.raises(ConfigError, match="unknown TEE backend"):
        load_enclave("nope", code=[], config={})


def test_child_process_enclave(tmp_path: Path) -> None:
    f = tmp_path / "entry.py"
    f.write_text("x = 1\n")
    local = SimulatedEnclave(code=[f], config={"k": "v"})
    with SimulatedEnclaveProcess(code=[f], config={"k": "v"}, timeout=60) as enc:
        assert enc.pid is not None and enc.pid != os.getpid()
        assert enc.measurement == local.measurement
        ev = enc.attest(b"nonce")
        assert ev.simulated and ev.platform_key == local.platform_key
        blob = enc.seal(b"data", b"aad")
        assert local.unseal(blob, b"aad") == b"data"
        with pytest.raises(DecryptionError):
            enc.unseal(blob, b"other")
        with pytest.raises(InputError):
            enc.attest(b"x" * 100)
    # the evidence is a plain msgspec struct, no pickle involved
    assert isinstance(msgspec.msgpack.encode(ev), bytes)
