"""KMS over HTTPS as a real process, the kms/serve CLIs' error handling, and the Gramine manifest."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from veil.cli.kms import app as kms_app
from veil.cli.serve import app as serve_app
from veil.serve.cluster.local import free_port
from veil.serve.kms.client import KMSClient
from veil.serve.kms.store import new_service_identity
from veil.serve.package import decrypt_payload, read_package
from veil.tee import SimulatedEnclave, platform_public_key


@pytest.mark.slow
def test_kms_over_https_releases_to_attested_worker(tmp_path: Path, onnx_model: Path) -> None:
    ident = new_service_identity(hosts=("127.0.0.1",))
    cert, key = tmp_path / "kms.pem", tmp_path / "kms.key"
    cert.write_bytes(ident.tls_cert_pem)
    key.write_bytes(ident.tls_key_pem)
    worker = SimulatedEnclave(code=[b"w"], config={})
    port = free_port()
    token = "a" * 32
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "veil.serve.kms",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--state",
            str(tmp_path / "state"),
            "--admin-token",
            token,
            "--allow-measurement",
            worker.measurement,
            "--allow-simulated",
            "--simulated-platform-key",
            platform_public_key().hex(),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/v1/health", verify=str(cert), timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with KMSClient(url, admin_token=token, ca=cert) as k:
            info, data_key = k.new_key("m", "ab" * 32)
            rel = k.attest_and_release(worker, [info.key_id], worker_id="tls-w")
            assert rel.keys[0].key == data_key
        # `veil serve package --kms`: the KMS makes the next key version; nothing lands beside the package
        pkg = tmp_path / "out" / "m.veil"
        r = CliRunner().invoke(
            serve_app,
            [
                "package",
                str(onnx_model),
                "--out",
                str(pkg),
                "--name",
                "m",
                "--kms",
                url,
                "--admin-token",
                token,
                "--kms-ca",
                str(cert),
                "--signing-key",
                str(tmp_path / "sk"),
            ],
        )
        assert r.exit_code == 0, r.output
        assert sorted(p.name for p in pkg.parent.iterdir()) == ["m.veil"]
        parsed = read_package(pkg)
        with KMSClient(url, admin_token=token, ca=cert) as k:
            versions = {i.key_id: i.version for i in k.list_keys("m")}
            assert versions[parsed.manifest.key_id] == 2  # rotation: version 1 still there
            rel = k.attest_and_release(worker, [parsed.manifest.key_id, info.key_id])
        got = {x.key_id: x.key for x in rel.keys}
        assert decrypt_payload(parsed, got[parsed.manifest.key_id]) == onnx_model.read_bytes()
        with pytest.raises(httpx.HTTPError):  # the certificate is not in the default trust store
            httpx.get(url + "/v1/health", timeout=5)
    finally:
        proc.terminate()
        proc.wait(20)


def test_kms_cli_errors_are_one_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(kms_app, ["serve", "--state", str(tmp_path), "--admin-token", "x" * 20])
    assert r.exit_code == 2 and "allows no worker measurement" in r.output
    r = CliRunner().invoke(kms_app, ["serve", "--state", str(tmp_path), "--listen", "nope"])
    assert r.exit_code == 2 and "HOST:PORT" in r.output


def test_serve_package_cli_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        serve_app, ["package", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "x.veil")]
    )
    assert r.exit_code == 2 and "does not exist" in r.output
    bad = tmp_path / "bad.veil"
    bad.write_bytes(b"VEILPKG\x01" + b"\x00" * 40)
    r = CliRunner().invoke(serve_app, ["inspect", str(bad)])
    assert r.exit_code == 1 and "error:" in r.output


def test_gramine_manifest_trusts_the_package(tmp_path: Path, onnx_model: Path) -> None:
    out_pkg = tmp_path / "pkg" / "m.veil"
    r = CliRunner().invoke(
        serve_app,
        [
            "package",
            str(onnx_model),
            "--out",
            str(out_pkg),
            "--signing-key",
            str(tmp_path / "sk"),
            "--key-out",
            str(tmp_path / "keys" / "k.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    man = tmp_path / "w.manifest.template"
    r = CliRunner().invoke(
        serve_app,
        ["gramine-manifest", "--package", str(out_pkg), "--kms", "https://kms:8700", "--out", str(man)],
    )
    assert r.exit_code == 0, r.output
    text = man.read_text()
    assert '"--tee", "gramine"' in text and f"file:{out_pkg.resolve()}" in text
