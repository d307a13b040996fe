"""``veil serve up``: KMS, workers and gateway as separate processes on 127.0.0.1.

Children are started with ``PR_SET_PDEATHSIG`` (Linux) so they die with the supervisor even if it
is killed hard, and are stopped in order (gateway, workers, KMS) with SIGTERM then SIGKILL after a
timeout on Ctrl-C / SIGTERM / :meth:`LocalCluster.stop`. No orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from veil.atomic import atomic_write_text
from veil.crypto.random import random_bytes
from veil.errors import ConfigError
from veil.serve.errors import ServeError
from veil.serve.kms.client import KMSClient
from veil.serve.package import KeyFile, read_package

__all__ = ["LocalCluster", "free_port"]

log = logging.getLogger("veil.serve.cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Proc:
    name: str
    argv: list[str]
    url: str
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def admin_token_file(path: Path) -> str:
    """The cluster's KMS admin token: read from ``path``, or made and written there.

    Finding H-10: the file used to be created with the umask's mode and chmod-ed afterwards
    (readable by other local users in between); now it appears, by rename, already 0600 and
    complete (veil.atomic).
    """
    if path.exists():
        return path.read_text().strip()
    token = random_bytes(24).hex()
    atomic_write_text(path, token, mode=0o600)
    return token


@dataclass
class LocalCluster:
    packages: list[Path]
    workers: int = 3
    state_dir: Path = field(default_factory=lambda: Path(".veil-serve"))
    key_files: list[Path] = field(default_factory=list)
    gateway_port: int = 0
    policy: str = "round-robin"
    tee: str = "simulated"
    allow_simulated: bool = True
    reattest_s: float = 30.0
    admin_token: str = ""
    capture_file: Path | None = None
    worker_tls: bool = False
    """Workers serve HTTPS with the shared service identity; the gateway pins its certificate."""
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    verify: Any = True
    _added: int = 0
    _service_cert: Path | None = None
    kms_url: str = ""
    gateway_url: str = ""

    def _spawn(self, p: Proc, env: dict[str, str] | None = None) -> None:
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        p.log_path = logs / f"{p.name}.log"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **self.env,
            **(env or {}),
        }
        with p.log_path.open("ab") as fh:
            p.popen = subprocess.Popen(
                p.argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_pdeathsig,
                stdin=subprocess.DEVNULL,
            )
        self.procs.append(p)

    def _wait_http(self, p: Proc, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.popen is not None and p.popen.poll() is not None:
                raise ServeError(
                    f"{p.name} exited with code {p.popen.returncode}; see {p.log_path}:\n" + self.tail(p)
                )
            try:
                if httpx.get(p.url + path, timeout=1.0, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServeError(f"{p.name} not ready after {timeout:.0f}s; see {p.log_path}:\n" + self.tail(p))

    @staticmethod
    def tail(p: Proc, n: int = 15) -> str:
        if p.log_path is None or not p.log_path.exists():
            return ""
        return "\n".join(p.log_path.read_text(errors="replace").splitlines()[-n:])

    def start(self, timeout: float = 120.0) -> str:
        from veil.serve.worker.app import worker_measurement
        from veil.tee import platform_public_key

        if self.workers < 1:
            raise ConfigError("--workers must be >= 1")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        manifests = [read_package(Path(p)).manifest for p in self.packages]
        token_path = self.state_dir / "admin-token"
        if not self.admin_token:
            self.admin_token = admin_token_file(token_path)
        py = sys.executable
        kport = free_port()
        self.kms_url = f"http://127.0.0.1:{kport}"
        kms_argv = [
            py,
            "-m",
            "veil.serve.kms",
            "serve",
            "--listen",
            f"127.0.0.1:{kport}",
            "--state",
            str(self.state_dir / "kms"),
            "--admin-token-file",
            str(token_path),
            "--allow-measurement",
            worker_measurement(),
            "--tee",
            self.tee,
        ]
        if self.allow_simulated:
            kms_argv += ["--allow-simulated", "--simulated-platform-key", platform_public_key().hex()]
        self._spawn(Proc("kms", kms_argv, self.kms_url))
        try:
            self._wait_http(self.procs[-1], "/v1/health", timeout)
            self._register_keys(manifests)
            service_cert: Path | None = None
            if self.worker_tls:
                from veil.serve.gateway.app import pinned_context

                with KMSClient(self.kms_url) as kms:
                    service_cert = self.state_dir / "service-cert.pem"
                    atomic_write_text(service_cert, str(kms.service()["tls_cert_pem"]))
                self.verify = pinned_context(service_cert)
            scheme = "https" if self.worker_tls else "http"
            wurls = []
            for i in range(self.workers):
                for j, pkg in enumerate(self.packages):
                    port = free_port()
                    url = f"{scheme}://127.0.0.1:{port}"
                    argv = [
                        py,
                        "-m",
                        "veil.serve",
                        "worker",
                        "--package",
                        str(pkg),
                        "--kms",
                        self.kms_url,
                        "--listen",
                        f"127.0.0.1:{port}",
                        "--tee",
                        self.tee,
                        "--worker-id",
                        f"w{i}-m{j}",
                        "--reattest-s",
                        str(self.reattest_s),
                    ]
                    if self.worker_tls:
                        argv.append("--tls")
                    self._spawn(Proc(f"worker-{i}-{manifests[j].name}", argv, url))
                    wurls.append(url)
            gport = self.gateway_port or free_port()
            self.gateway_url = f"http://127.0.0.1:{gport}"
            gargv = [
                py,
                "-m",
                "veil.serve",
                "gateway",
                "--listen",
                f"127.0.0.1:{gport}",
                "--policy",
                self.policy,
                "--poll-s",
                "0.25",
            ]
            for u in wurls:
                gargv += ["--worker", u]
            gargv += ["--admin-token-file", str(token_path)]
            if service_cert is not None:
                gargv += ["--worker-ca", str(service_cert)]
            self._service_cert = service_cert
            if self.capture_file is not None:
                gargv += ["--capture-file", str(self.capture_file)]
            for p in [p for p in self.procs if p.name.startswith("worker")]:
                self._wait_http(p, "/v2/health/ready", timeout)
            self._spawn(Proc("gateway", gargv, self.gateway_url))
            self._wait_http(self.procs[-1], "/v2/health/ready", timeout)
        except BaseException:
            self.stop()
            raise
        return self.gateway_url

    def _register_keys(self, manifests: Sequence[object]) -> None:
        with KMSClient(self.kms_url, admin_token=self.admin_token) as kms:
            for kf_path in self.key_files:
                kf = KeyFile.read(kf_path)
                known = {k.key_id for k in kms.list_keys(kf.model)}
                if kf.key_id not in known:
                    kms.import_key(kf.model, kf.key_id, bytes.fromhex(kf.key), kf.signer)
                    log.info("registered key %s for %s with the KMS", kf.key_id[:8], kf.model)

    def _worker_argv(self, package: Path, port: int, worker_id: str) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "veil.serve",
            "worker",
            "--package",
            str(package),
            "--kms",
            self.kms_url,
            "--listen",
            f"127.0.0.1:{port}",
            "--tee",
            self.tee,
            "--worker-id",
            worker_id,
            "--reattest-s",
            str(self.reattest_s),
        ]
        if self.worker_tls:
            argv.append("--tls")
        return argv

    def add_worker(self, host: str = "local", package: Path | None = None, timeout: float = 120.0) -> str:
        """Start one more worker (simulated EPC host ``host``), wait until ready, add it to the gateway.

        Returns the replica id the gateway uses (``127.0.0.1:PORT``).
        """
        if not self.gateway_url:
            raise ServeError("cluster not started")
        pkg = Path(package or self.packages[0])
        port = free_port()
        scheme = "https" if self.worker_tls else "http"
        url = f"{scheme}://127.0.0.1:{port}"
        self._added += 1
        p = Proc(
            f"worker-added{self._added}-{host}", self._worker_argv(pkg, port, f"add{self._added}-{host}"), url
        )
        self._spawn(p, env={"VEIL_SIM_HOST": host})
        self._wait_http(p, "/v2/health/ready", timeout)
        r = httpx.post(
            self.gateway_url + "/veil/v1/replicas",
            json={"url": url, "host": host},
            headers={"authorization": f"Bearer {self.admin_token}"},
            timeout=30,
        )
        if r.status_code != 200:
            raise ServeError(f"gateway refused the new replica: {r.status_code} {r.text[:200]}")
        rid: str = r.json()["id"]
        return rid

    def remove_worker(self, rid: str, timeout: float = 60.0) -> None:
        """Drain replica ``rid`` at the gateway (no new requests, in-flight ones finish), then stop it."""
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.delete(
                self.gateway_url + f"/veil/v1/replicas/{rid}",
                headers={"authorization": f"Bearer {self.admin_token}"},
                timeout=30,
            )
            if r.status_code != 200:
                raise ServeError(f"gateway refused to drain {rid}: {r.status_code} {r.text[:200]}")
            if r.json()["removed"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for p in self.worker_procs():
            if p.url.split("//", 1)[-1] == rid:
                self._terminate(p)

    def respawn_dead_workers(self) -> list[str]:
        """Restart every worker process that exited (same argv and port: it re-attests to the KMS and
        the gateway's next status poll marks it healthy again). Returns the restarted names."""
        restarted = []
        for p in self.worker_procs():
            if p.popen is not None and p.popen.poll() is not None and not p.name.startswith("worker-added"):
                log.warning("worker %s exited with %s; restarting it", p.name, p.popen.returncode)
                self.procs.remove(p)
                self._spawn(Proc(p.name, p.argv, p.url))
                restarted.append(p.name)
        return restarted

    def worker_procs(self) -> list[Proc]:
        return [p for p in self.procs if p.name.startswith("worker")]

    def restart_kms(self, timeout: float = 60.0) -> None:
        """Stop and start the KMS on the same port and state (fault tests)."""
        kms = next(p for p in self.procs if p.name == "kms")
        self._terminate(kms)
        self.procs.remove(kms)
        self._spawn(Proc("kms", kms.argv, kms.url))
        self._wait_http(self.procs[-1], "/v1/health", timeout)

    @staticmethod
    def _terminate(p: Proc, timeout: float = 10.0) -> None:
        if p.popen is None or p.popen.poll() is not None:
            return
        p.popen.send_signal(signal.SIGTERM)
        try:
            p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(5)

    def stop(self) -> None:
        order = (
            [p for p in self.procs if p.name == "gateway"]
            + self.worker_procs()
            + [p for p in self.procs if p.name == "kms"]
        )
        for p in order:
            if p.popen is not None and p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.send_signal(signal.SIGTERM)
        for p in order:
            self._terminate(p)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
