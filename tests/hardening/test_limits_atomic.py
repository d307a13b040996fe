"""veil.limits (env-configurable, clear errors) and veil.atomic (no torn files)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from veil.atomic import atomic_write_bytes, atomic_write_text, stale_temp_files
from veil.errors import ConfigError, InputError, ResourceLimitError
from veil.limits import (
    Limits,
    SessionLimiter,
    check_message_bytes,
    check_rows,
    check_sequence_length,
    get_limits,
    reset_limits,
)


@pytest.fixture(autouse=True)
def _fresh_limits():
    reset_limits()
    yield
    reset_limits()


def test_limits_read_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_LIMIT_MAX_ROWS", "1234")
    monkeypatch.setenv("VEIL_LIMIT_REQUEST_TIMEOUT_S", "2.5")
    lim = get_limits()
    assert lim.max_rows == 1234 and lim.request_timeout_s == 2.5
    check_rows(1234)
    with pytest.raises(ResourceLimitError, match="VEIL_LIMIT_MAX_ROWS"):
        check_rows(1235)


def test_invalid_env_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEIL_LIMIT_MAX_SEQUENCE_LENGTH", "-3")
    with pytest.raises(ConfigError, match="VEIL_LIMIT_MAX_SEQUENCE_LENGTH"):
        get_limits()
    monkeypatch.setenv("VEIL_LIMIT_MAX_SEQUENCE_LENGTH", "lots")
    reset_limits()
    with pytest.raises(ConfigError):
        get_limits()


def test_checks_name_the_limit() -> None:
    lim = Limits(max_message_bytes=2048, max_sequence_length=16)
    assert check_message_bytes(2048, limits=lim) == 2048
    with pytest.raises(ResourceLimitError, match="2049 exceeds the limit of 2048"):
        check_message_bytes(2049, "request body", limits=lim)
    with pytest.raises(ResourceLimitError, match="MAX_SEQUENCE_LENGTH"):
        check_sequence_length(17, limits=lim)
    with pytest.raises(ResourceLimitError, match="negative"):
        check_rows(-1, limits=lim)


def test_session_limiter_refuses_and_releases() -> None:
    lim = SessionLimiter(max_per_client=2)
    lim.acquire("c1")
    with lim.session("c1"):
        with pytest.raises(ResourceLimitError, match="2 open sessions"):
            lim.acquire("c1")
        lim.acquire("c2")  # other clients are not affected
    assert lim.open_sessions("c1") == 1
    lim.acquire("c1")
    assert lim.open_sessions("c1") == 2
    with pytest.raises(ConfigError):
        SessionLimiter(max_per_client=0)


def test_session_limiter_is_thread_safe() -> None:
    lim = SessionLimiter(max_per_client=5)
    ok: list[int] = []
    refused: list[int] = []
    barrier = threading.Barrier(20)

    def grab(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            lim.acquire("same")
            ok.append(i)
        except ResourceLimitError:
            refused.append(i)

    ts = [threading.Thread(target=grab, args=(i,)) for i in range(20)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=10)
    assert len(ok) == 5 and len(refused) == 15


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "model.bin"
    atomic_write_bytes(p, b"old" * 1000)
    atomic_write_text(p, "new contents")
    assert p.read_text() == "new contents"
    assert stale_temp_files(p.parent) == []
    atomic_write_bytes(tmp_path / "secret", b"k", mode=0o600)
    assert (os.stat(tmp_path / "secret").st_mode & 0o777) == 0o600


def test_atomic_write_failure_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "ckpt"
    atomic_write_bytes(p, b"complete-v1")

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(InputError, match="disk full"):
        atomic_write_bytes(p, b"half")
    assert p.read_bytes() == b"complete-v1"
    assert stale_temp_files(tmp_path) == []


def test_atomic_write_interrupted_by_kill_leaves_old_file(tmp_path: Path) -> None:
    """A writer process SIGKILLed in the middle never leaves a torn target."""
    import subprocess
    import sys

    p = tmp_path / "model.bin"
    atomic_write_bytes(p, b"A" * 4096)
    code = (
        "import sys, os\n"
        "from veil.atomic import atomic_write_bytes\n"
        "import veil.atomic as m\n"
        "real = os.fsync\n"
        "def slow(fd):\n"
        "    sys.stdout.write('x'); sys.stdout.flush(); import time; time.sleep(30)\n"
        "os.fsync = slow\n"
        f"atomic_write_bytes({str(p)!r}, b'B' * 4096)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    import select

    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready:
        proc.kill()
        pytest.fail("writer process did not reach fsync within 60 s")
    assert proc.stdout.read(1) == b"x"  # inside fsync, before the rename
    proc.kill()
    proc.wait(timeout=10)
    assert p.read_bytes() == b"A" * 4096  # old file intact
    assert len(stale_temp_files(tmp_path)) == 1  # the orphan temp is identifiable for cleanup


def test_atomic_write_to_directory_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory"):
        atomic_write_bytes(tmp_path, b"x")


@pytest.mark.parametrize("what", ["signing_key", "data_key_file"])
def test_regression_secret_files_created_0600_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """serve.signing.SigningKey.save and serve.package.KeyFile.write opened the file with the
    default mode and chmod-ed it afterwards: another local user could open it in that window and
    read the secret later. Now the file only appears (by rename) already 0600 and complete."""
    from veil.serve import signing
    from veil.serve.package import KeyFile

    target = tmp_path / "secret"
    seen: list[int] = []
    real_replace = os.replace

    def spy(src: str, dst: os.PathLike[str]) -> None:
        assert not Path(dst).exists() or (os.stat(dst).st_mode & 0o077) == 0
        seen.append(os.stat(src).st_mode & 0o777)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    if what == "signing_key":
        sk = signing.SigningKey.generate()
        sk.save(target)
        assert signing.SigningKey.load(target).public_bytes == sk.public_bytes
    else:
        kf = KeyFile(model="m", key_id="ab" * 16, key="cd" * 32, signer="ef" * 32)
        kf.write(target)
        assert KeyFile.read(target) == kf
    assert seen == [0o600]
    assert (os.stat(target).st_mode & 0o777) == 0o600


def _replace_spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Records the mode of every file veil.atomic renames into place (by target name)."""
    seen: dict[str, int] = {}
    real_replace = os.replace

    def spy(src: str, dst: os.PathLike[str]) -> None:
        seen[Path(dst).name] = os.stat(src).st_mode & 0o777
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return seen


def test_regression_h10_cluster_admin_token_created_0600_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding H-10: LocalCluster created state/admin-token with the umask's mode and chmod-ed
    it afterwards (another local user could open it in between and read the KMS admin token).
    Now it appears, by rename, already 0600 and complete; an existing token is reused."""
    from veil.serve.cluster.local import admin_token_file

    seen = _replace_spy(monkeypatch)
    old = os.umask(0)
    try:
        token = admin_token_file(tmp_path / "admin-token")
    finally:
        os.umask(old)
    assert seen == {"admin-token": 0o600}
    assert (os.stat(tmp_path / "admin-token").st_mode & 0o777) == 0o600
    assert len(token) == 48 and admin_token_file(tmp_path / "admin-token") == token


def test_party_identity_key_and_trusted_certs_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from veil.comm.identity import PartyIdentity

    seen = _replace_spy(monkeypatch)
    a = PartyIdentity.create("alice", tmp_path / "a")
    assert seen == {"key.pem": 0o600, "cert.pem": 0o644}
    assert (os.stat(tmp_path / "a" / "key.pem").st_mode & 0o777) == 0o600
    with pytest.raises(InputError, match="refusing to overwrite"):
        PartyIdentity.create("alice", tmp_path / "a")
    b = PartyIdentity.create("bob", tmp_path / "b")
    fp = b.trust(a.cert_pem)
    assert seen[f"{fp}.pem"] == 0o644
    assert PartyIdentity.load(tmp_path / "a").cert_pem == a.cert_pem
    again = PartyIdentity.create("alice", tmp_path / "a", overwrite=True)  # replaced, still 0600
    assert PartyIdentity.load(tmp_path / "a").key_pem == again.key_pem != a.key_pem
    assert (os.stat(tmp_path / "a" / "key.pem").st_mode & 0o777) == 0o600


def test_epc_registry_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.atomic import stale_temp_files
    from veil.serve.epc import open_epc

    seen = _replace_spy(monkeypatch)
    mon = open_epc(simulated=True, worker_id="w1", enclave_mb=64.0, host="h1", epc_mb=128.0, root=tmp_path)
    try:
        assert seen.get("epc.json") == 0o644
        assert mon.usage().used_mb == pytest.approx(64.0)
    finally:
        mon.close()
    assert stale_temp_files(tmp_path / "h1") == []


def test_tune_export_dir_written_atomically_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decrypted export (adapter weights) lands owner-only (0600), each file by rename."""
    torch = pytest.importorskip("torch")
    from veil.crypto.aead import X25519KeyPair
    from veil.tune import export as ex

    owner = X25519KeyPair.generate()
    tensors = {"base_model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.ones(2, 4)}
    payload = ex.export_payload(tensors, {"kind": "adapter", "adapter_config": {"r": 2}})
    blob = ex.encrypt_to_owner(payload, owner.public_bytes)
    seen = _replace_spy(monkeypatch)
    meta = ex.write_export_dir(blob, owner, tmp_path / "out")
    assert meta["kind"] == "adapter"
    assert seen["adapter_model.safetensors"] == 0o600 and "veil_export.json" in seen
    assert list(seen)[-1] == "veil_export.json"  # metadata last: its presence means complete
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert torch.equal(next(iter(got.values())), torch.ones(2, 4))
