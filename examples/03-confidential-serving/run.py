"""Serve an encrypted model with `veil serve package` + `veil serve up`, then call it.

    python examples/03-confidential-serving/run.py            # 50 requests
    python examples/03-confidential-serving/run.py --quick    # 5 requests

1. Train a small classifier (breast cancer, scikit-learn) and export it to ONNX.
2. `veil serve package`: sign it and encrypt it; the data key goes to a separate key file.
3. `veil serve up`: KMS + 2 workers (SIMULATED TEE) + gateway as local processes. Each worker
   attests to the KMS and receives the key only if its measurement is allowed.
4. Plain KServe v2 requests (any Open Inference Protocol client works), then requests encrypted
   end to end to the attested service key with veil.serve.client.ServeClient.
5. Ctrl-C-equivalent (SIGTERM) stops every process.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

VEIL = str(Path(sys.executable).with_name("veil"))


def train_onnx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(xtr, ytr)
    onx = to_onnx(model, xtr[:1], options={id(model.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return xte, yte


def wait_for_url(proc: subprocess.Popen[str], timeout: float) -> str:
    """Read `veil serve up`'s output until it prints the gateway URL."""
    end = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise SystemExit(f"veil serve up exited with code {proc.returncode}")
            continue
        print("  |", line.rstrip())
        if line.startswith("veil serving at "):
            return line.split()[3]
    raise SystemExit("veil serve up did not become ready in time")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 requests instead of 50")
    ap.add_argument("--out", type=Path, default=Path("runs/example-03"), help="working folder")
    a = ap.parse_args()
    out = a.out
    (out / "pkg").mkdir(parents=True, exist_ok=True)
    xte, yte = train_onnx(out / "cancer.onnx")
    subprocess.run([VEIL, "serve", "package", str(out / "cancer.onnx"), "--name", "cancer",
                    "--out", str(out / "pkg" / "cancer.veil"),
                    "--key-out", str(out / "keys" / "cancer.key.json"),  # never beside the package
                    "--signing-key", str(out / "signer.key")], check=True, timeout=120)
    up = subprocess.Popen(
        [VEIL, "serve", "up", "--model", str(out / "pkg" / "cancer.veil"),
         "--key-file", str(out / "keys" / "cancer.key.json"), "--workers", "2", "--port", "0",
         "--state", str(out / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = wait_for_url(up, 300)
        n = 5 if a.quick else 50
        correct = 0
        t0 = time.perf_counter()
        with httpx.Client(timeout=30) as http:
            for i in range(n):
                x = xte[i % len(xte)][None, :]
                body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(x.shape),
                                    "data": x.ravel().tolist()}]}
                r = http.post(f"{url}/v2/models/cancer/infer", json=body)
                r.raise_for_status()
                label = {o["name"]: o for o in r.json()["outputs"]}["label"]["data"][0]
                correct += int(label == yte[i % len(yte)])
        ms = (time.perf_counter() - t0) / n * 1e3
        print(f"{n} KServe v2 requests, {correct} correct, {ms:.1f} ms each")

        from veil.serve.client import ServeClient
        from veil.serve.worker.app import worker_measurement
        from veil.tee import Policy, platform_public_key

        policy = Policy(allowed_measurements={worker_measurement()}, allow_simulated=True,
                        simulated_platform_keys={platform_public_key().hex()})
        with ServeClient(url, policy=policy, e2e=True) as client:
            claims = client.attest()
            probs = client.infer("cancer", {"X": xte[:3]})["probabilities"]
        benign = [round(float(v), 3) for v in probs[:, 1]]
        print(f"end-to-end encrypted: service attested ({claims.label}, "
              f"measurement {claims.measurement[:16]}…); P(benign) = {benign}")
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            rest, _ = up.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            rest, _ = up.communicate()
        for line in (rest or "").splitlines():
            print("  |", line)
    return 0 if up.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
