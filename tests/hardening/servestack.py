"""A real serving stack in one test process: KMS, one enclave worker and the gateway, each a uvicorn
server on 127.0.0.1 in its own thread (simulated TEE). The worker attests to the KMS for real."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.crypto.random import random_bytes

ADMIN_TOKEN = "h" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_thread(app: Any, *, timeout: float = 30.0) -> Served:
    import uvicorn

    port = free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(cfg)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    t = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not t.is_alive():
            raise RuntimeError(f"uvicorn on port {port} did not start")
        time.sleep(0.02)
    return Served(f"http://127.0.0.1:{port}", server, t)


def tiny_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["probs"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@dataclass
class Stack:
    tmp: Path
    kms_service: Any
    kms: Served
    worker: Any
    worker_srv: Served
    gateway: Any
    gateway_srv: Served
    package: bytes
    data_key: bytes
    signer_hex: str
    model_name: str = "tiny"
    extra: list[Served] = field(default_factory=list)

    def close(self) -> None:
        for s in (self.gateway_srv, self.worker_srv, self.kms, *self.extra):
            s.stop()
        self.worker.stop()


def start_stack(tmp: Path, *, model_name: str = "tiny") -> Stack:
    from veil.serve import signing
    from veil.serve.gateway.app import Gateway, GatewayConfig
    from veil.serve.gateway.app import create_app as gateway_app
    from veil.serve.kms.app import KMSConfig, KMSService
    from veil.serve.kms.app import create_app as kms_app
    from veil.serve.package import build_package
    from veil.serve.worker.app import Worker, WorkerConfig, worker_measurement
    from veil.serve.worker.app import create_app as worker_app
    from veil.tee import Policy, platform_public_key

    tmp.mkdir(parents=True, exist_ok=True)
    policy = Policy(
        allowed_measurements={worker_measurement()},
        allow_simulated=True,
        simulated_platform_keys={platform_public_key().hex()},
    )
    # the fuzz campaign is one client opening thousands of key-release sessions it never uses;
    # the per-client session budget itself is tested in test_limits_serve.py
    svc = KMSService(KMSConfig(state_dir=tmp / "kms", admin_token=ADMIN_TOKEN, policy=policy,
                               max_sessions_per_client=1_000_000))
    kms = serve_in_thread(kms_app(svc))
    key, kid = random_bytes(32), random_bytes(16).hex()
    sk = signing.SigningKey.generate()
    svc.store.add_key(model_name, kid, key, sk.public_bytes.hex())
    pkg = build_package(tiny_onnx(tmp / "m.onnx"), name=model_name, signing_key=sk, data_key=key, key_id=kid)
    (tmp / "m.veilpkg").write_bytes(pkg)
    worker = Worker(WorkerConfig(package=tmp / "m.veilpkg", kms_url=kms.url, reattest_s=0, worker_id="w-a"))
    worker.start()
    wsrv = serve_in_thread(worker_app(worker))
    gw = Gateway(GatewayConfig(workers=[wsrv.url], request_timeout_s=10, poll_s=0.2, max_attempts=2))
    gsrv = serve_in_thread(gateway_app(gw))
    deadline = time.monotonic() + 20
    while not any(r.healthy for r in gw.router.replicas.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("gateway never saw the worker ready")
        time.sleep(0.05)
    return Stack(tmp, svc, kms, worker, wsrv, gw, gsrv, pkg, key, sk.public_bytes.hex(), model_name)
