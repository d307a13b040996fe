"""Act 3: confidential serving — encrypted package, KMS, attested workers, a refused impostor.

1. The model owner trains a small classifier on the breast-cancer table, exports it to ONNX
   (skl2onnx) and seals it into a signed, AES-256-GCM encrypted package; the data key goes to
   the KMS, never beside the package. (The act-1 model stays secret-shared between its two
   parties: veil.boost has no plaintext XGBoost export, by design.) In the full demo, when act 2
   left an adapter, SmolLM2-135M + that LoRA adapter is packaged and served as well.
2. ``veil serve``'s local cluster starts the KMS, 2 enclave workers (SIMULATED TEE) and the
   gateway as separate processes; each worker attests to the KMS and only then gets the key.
3. Real KServe v2 (Open Inference Protocol) requests go through the gateway and are checked
   against local onnxruntime; one more request is encrypted end to end to the attested
   service key (``veil.serve.client.ServeClient(e2e=True)``): the gateway's capture of the
   traffic shows it never saw the inputs or outputs.
4. A tampered worker (a copy of the worker code with one line added, so its measurement
   differs) asks the KMS for the key: refused, and the refusal is in the KMS audit log.
5. Everything is shut down; the act checks that no child process is left.

Writes ``act3.json`` and ``act3_latency.png``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from veil.demo._common import SIMULATED_NOTE, DemoError, progress, pyplot, write_json
from veil.demo.runner import ActResult

__all__ = ["run"]

TITLE = "Confidential serving: encrypted package, KMS, attested workers"
MODEL = "cancer-lr"
INPUT = "X"  # skl2onnx's name for the input tensor
LLM = "smollm2-bbc"
TAMPER_LINE = "\n# TAMPERED: an operator patched this worker to copy decrypted inputs elsewhere\n"


# ------------------------------------------------------------------------------------ model


def build_onnx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A scaled logistic regression on breast cancer as ONNX; returns (test x, test y)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float32)
    y = np.asarray(data.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=7, stratify=y)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(xtr, ytr)
    onx = to_onnx(pipe, xtr[:1], options={id(pipe.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return xte, yte


def _package(model: Path, name: str, out: Path, adapter: Path | None = None) -> tuple[Path, Path, str]:
    """Encrypt + sign ``model`` into ``out/<name>.veil``; the data key goes to a key file elsewhere."""
    from veil.crypto.random import random_bytes
    from veil.serve import signing
    from veil.serve.package import KeyFile, build_package

    sk = signing.SigningKey.generate()
    key, kid = random_bytes(32), random_bytes(16).hex()
    pkg = out / "packages" / f"{name}.veil"
    pkg.parent.mkdir(parents=True, exist_ok=True)
    pkg.write_bytes(build_package(model, name=name, signing_key=sk, data_key=key, key_id=kid,
                                  adapter=adapter))
    kf = out / "owner-keys" / f"{name}.key.json"
    KeyFile(model=name, key_id=kid, key=key.hex(), signer=sk.public_bytes.hex()).write(kf)
    return pkg, kf, kid


def _llm_dir(act2_dir: Path) -> tuple[Path, Path] | None:
    """SmolLM2 as a safetensors HF directory + act 2's decrypted adapter, when act 2 ran."""
    adapter, base = act2_dir / "adapter", act2_dir / "base-hf"  # both written by act 2 (full demo)
    if not (adapter / "adapter_config.json").is_file() or not (base / "config.json").is_file():
        return None
    return base, adapter


# ------------------------------------------------------------------------------------ impostor


def _tampered_tree(work: Path) -> Path:
    """A copy of the installed veil package with one line added to the worker code."""
    import veil

    src = Path(veil.__file__).resolve().parent
    root = work / "tampered-src"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(src, root / "veil", ignore=shutil.ignore_patterns("__pycache__"))
    app = root / "veil" / "serve" / "worker" / "app.py"
    app.write_text(app.read_text() + TAMPER_LINE)
    return root


def _run_tampered_worker(work: Path, package: Path, kms_url: str) -> dict[str, Any]:
    root = _tampered_tree(work)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "veil.serve", "worker", "--package", str(package), "--kms", kms_url,
            "--listen", "127.0.0.1:0", "--worker-id", "tampered-worker", "--attest-timeout-s", "20",
            "--reattest-s", "0"]
    try:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DemoError("the tampered worker neither started nor exited within 180 s") from None
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return {"returncode": r.returncode, "stderr_last": lines[-1] if lines else ""}


# ------------------------------------------------------------------------------------ act


def _client_policy() -> Any:
    from veil.serve.worker.app import worker_measurement
    from veil.tee import Policy, platform_public_key

    return Policy(allowed_measurements={worker_measurement()}, allow_simulated=True,
                  simulated_platform_keys={platform_public_key().hex()})


def _plot(path: Path, plain_ms: list[float], e2e_ms: list[float]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(range(1, len(plain_ms) + 1), plain_ms, "o-", markersize=3, label="KServe v2 JSON (plain)")
    ax.plot(range(1, len(e2e_ms) + 1), e2e_ms, "s-", markersize=3, label="end-to-end encrypted")
    ax.set_xlabel("request")
    ax.set_ylabel("latency through the gateway (ms)")
    ax.set_title("Confidential serving, 2 workers on a SIMULATED TEE (shared CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _v2_body(x: np.ndarray, rid: str) -> dict[str, Any]:
    return {"id": rid, "inputs": [{"name": INPUT, "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}


def run(out_dir: Path, quick: bool, console: Console) -> ActResult:
    """Run act 3; returns its headline metrics and artefacts."""
    import httpx
    import onnxruntime as ort

    from veil.serve.client import ServeClient
    from veil.serve.cluster.local import LocalCluster
    from veil.serve.kms.client import KMSClient
    from veil.serve.worker.app import worker_measurement

    t_start = time.perf_counter()
    console.print(SIMULATED_NOTE)
    n_requests = 10 if quick else 40
    n_e2e = 3 if quick else 10
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"{MODEL}.onnx"
    xte, yte = build_onnx(onnx_path)
    pkg, kf, _ = _package(onnx_path, MODEL, work)
    packages, key_files = [pkg], [kf]
    llm = None if quick else _llm_dir(out_dir.parent / "act2")
    if llm is not None:
        lpkg, lkf, _ = _package(llm[0], LLM, work, adapter=llm[1])
        packages.append(lpkg)
        key_files.append(lkf)
    console.print(
        f"packaged {', '.join(p.name for p in packages)} (signed, AES-256-GCM; data keys held by the KMS); "
        f"worker measurement {worker_measurement()[:16]}…"
    )
    state = work / "cluster"
    shutil.rmtree(state, ignore_errors=True)
    capture = work / "gateway-capture.bin"
    capture.unlink(missing_ok=True)
    cluster = LocalCluster(packages=packages, workers=2, state_dir=state, key_files=key_files,
                           capture_file=capture, reattest_s=30.0)
    local = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    result: dict[str, Any] = {}
    with progress(console) as prog:
        t_up = prog.add_task("start KMS + 2 attested workers + gateway (separate processes)", total=1)
        try:
            cluster.start(timeout=300)
            prog.update(t_up, completed=1)
            prog.console.print(f"  · gateway {cluster.gateway_url}, KMS {cluster.kms_url}; "
                               f"{len(cluster.worker_procs())} workers attested and hold the key")
            # 1) plain KServe v2 requests, checked against local onnxruntime
            t_req = prog.add_task("KServe v2 inference requests", total=n_requests)
            plain_ms: list[float] = []
            mismatches = 0
            with httpx.Client(timeout=30) as http:
                for i in range(n_requests):
                    x = xte[(i * 4) % (len(xte) - 4):][:4]
                    t0 = time.perf_counter()
                    r = http.post(f"{cluster.gateway_url}/v2/models/{MODEL}/infer",
                                  json=_v2_body(x, f"req-{i}"))
                    plain_ms.append((time.perf_counter() - t0) * 1e3)
                    if r.status_code != 200:
                        raise DemoError(f"request {i} failed: {r.status_code} {r.text[:200]}")
                    outs = {o["name"]: o for o in r.json()["outputs"]}
                    got = np.asarray(outs["probabilities"]["data"], dtype=np.float32).reshape(-1, 2)
                    want = local.run(["probabilities"], {INPUT: x})[0]
                    mismatches += int(not np.allclose(got, want, rtol=1e-5, atol=1e-6))
                    prog.update(t_req, completed=i + 1)
                meta = http.get(f"{cluster.gateway_url}/v2/models/{MODEL}").json()
            # accuracy of the served model on the whole test split, one batch
            with httpx.Client(timeout=60) as http:
                r = http.post(f"{cluster.gateway_url}/v2/models/{MODEL}/infer", json=_v2_body(xte, "batch"))
                outs = {o["name"]: o for o in r.json()["outputs"]}
                served_acc = float(np.mean(np.asarray(outs["label"]["data"]) == yte))
            # 2) end-to-end encrypted requests to the attested service key
            t_e2e = prog.add_task("end-to-end encrypted requests (attested service key)", total=n_e2e)
            start = capture.stat().st_size if capture.exists() else 0
            e2e_ms: list[float] = []
            x_secret = (xte[:2] + np.float32(0.001)).astype(np.float32)
            with ServeClient(cluster.gateway_url, policy=_client_policy(), e2e=True) as sc:
                claims = sc.attest()
                for i in range(n_e2e):
                    t0 = time.perf_counter()
                    got_e2e = sc.infer(MODEL, {INPUT: x_secret}, request_id=f"e2e-{i}")["probabilities"]
                    e2e_ms.append((time.perf_counter() - t0) * 1e3)
                    prog.update(t_e2e, completed=i + 1)
            want_e2e = local.run(["probabilities"], {INPUT: x_secret})[0]
            e2e_equal = bool(np.allclose(got_e2e, want_e2e, rtol=1e-5, atol=1e-6))
            seen = capture.read_bytes()[start:] if capture.exists() else b""
            leaked = [s for s in (x_secret.tobytes(), want_e2e.tobytes(), b"probabilities") if s in seen]
            prog.console.print(
                f"  · E2E: service attested ({claims.label}, measurement {claims.measurement[:16]}…); "
                f"gateway captured {len(seen)} bytes of this traffic, plaintext found in it: {bool(leaked)}"
            )
            # 3) the LLM with the act-2 adapter (full demo only)
            llm_out: dict[str, Any] | None = None
            if llm is not None:
                t_llm = prog.add_task("SmolLM2 + act-2 LoRA adapter: one completion", total=1)
                with ServeClient(cluster.gateway_url, timeout=300) as sc:
                    t0 = time.perf_counter()
                    comp = sc.complete(LLM, "Article: Shares in the bank fell sharply after profits dropped."
                                       "\nTopic:", max_tokens=3)
                    llm_out = {"completion": comp, "seconds": time.perf_counter() - t0}
                prog.update(t_llm, completed=1)
                text = str(comp.get("choices", [{}])[0].get("text", "")).strip().splitlines()
                prog.console.print(f"  · SmolLM2 + act-2 adapter in the enclave workers: 'Shares in the bank "
                                   f"fell…  Topic:' -> {text[0] if text else ''!r}")
            # 4) a tampered worker asks the KMS for the key
            t_bad = prog.add_task("tampered worker asks the KMS for the key", total=1)
            tampered = _run_tampered_worker(work, pkg, cluster.kms_url)
            with KMSClient(cluster.kms_url, admin_token=cluster.admin_token) as kms:
                refusals = [e for e in kms.audit(outcome="refused", limit=50)
                            if e.worker_id == "tampered-worker"]
                released = kms.audit(outcome="released", limit=50)
            prog.update(t_bad, completed=1)
            if tampered["returncode"] == 0 or not refusals:
                raise DemoError(f"the tampered worker was NOT refused: {tampered}")
            audit = refusals[0]
            if audit.measurement == worker_measurement():
                raise DemoError("the tampered worker reported the genuine measurement (copy not used)")
            prog.console.print(
                f"  · [red]refused[/red]: {tampered['stderr_last']}\n"
                f"  · KMS audit: event={audit.event} outcome={audit.outcome} worker={audit.worker_id} "
                f"tee={audit.tee} measurement={audit.measurement[:16]}… reason: {audit.reason}"
            )
            result = {
                "plain_ms": plain_ms, "e2e_ms": e2e_ms, "mismatches": mismatches, "served_acc": served_acc,
                "meta": meta, "claims": claims.to_dict(), "e2e_equal": e2e_equal, "leaked": len(leaked),
                "captured_bytes": len(seen), "tampered": tampered, "audit": audit.model_dump(),
                "releases": len(released), "llm": llm_out,
                "gateway_metrics_lines": _gateway_requests(cluster.gateway_url),
            }
        finally:
            t_down = prog.add_task("shut down gateway, workers, KMS", total=1)
            cluster.stop()
            prog.update(t_down, completed=1)
    alive = [p.name for p in cluster.procs if p.popen is not None and p.popen.poll() is None]
    if alive:
        raise DemoError(f"processes still running after shutdown: {alive}")
    png = out_dir / "act3_latency.png"
    _plot(png, result["plain_ms"], result["e2e_ms"])
    p50 = statistics.median(result["plain_ms"])
    p50_e2e = statistics.median(result["e2e_ms"])
    t = Table(title="Act 3 · confidential serving (2 workers, SIMULATED TEE)")
    for col in ("requests", "equal to local ONNX", "p50 plain", "p50 E2E", "gateway saw plaintext",
                "tampered worker"):
        t.add_column(col, justify="right")
    t.add_row(str(len(result["plain_ms"]) + len(result["e2e_ms"])),
              "yes" if result["mismatches"] == 0 and result["e2e_equal"] else "NO",
              f"{p50:.1f} ms", f"{p50_e2e:.1f} ms", "no" if result["leaked"] == 0 else "YES",
              "refused + audited")
    console.print(t)
    summary = {
        "act": 3, "quick": quick, "tee": "simulated (no hardware protection)", "simulated_tee": True,
        "model": {"name": MODEL, "format": "onnx (skl2onnx: StandardScaler + LogisticRegression)",
                  "served_test_accuracy": result["served_acc"], "test_rows": len(yte)},
        "llm": {"name": LLM, "served": llm is not None, "result": result["llm"]},
        "workers": 2, "worker_measurement": worker_measurement(),
        "requests": {"plain": len(result["plain_ms"]), "e2e": len(result["e2e_ms"]),
                     "mismatches_vs_local_onnx": result["mismatches"], "e2e_equal_local": result["e2e_equal"],
                     "p50_ms": p50, "p50_e2e_ms": p50_e2e, "latencies_ms": result["plain_ms"],
                     "latencies_e2e_ms": result["e2e_ms"]},
        "e2e": {"claims": result["claims"], "gateway_captured_bytes": result["captured_bytes"],
                "plaintext_found_in_capture": result["leaked"] > 0},
        "tampered_worker": {**result["tampered"], "audit": result["audit"]},
        "kms_releases": result["releases"], "gateway_metrics": result["gateway_metrics_lines"],
        "shutdown": {"processes": [p.name for p in cluster.procs], "left_running": alive},
        "machine": {"cpu_count": os.cpu_count(), "note": "shared CPU; latencies include contention"},
        "wall_s": time.perf_counter() - t_start,
    }
    js = write_json(out_dir / "act3.json", summary)
    if result["mismatches"] or not result["e2e_equal"] or result["leaked"]:
        raise DemoError(f"serving check failed: {result['mismatches']} mismatches, e2e equal "
                        f"{result['e2e_equal']}, plaintext in gateway capture {result['leaked']}")
    metrics: dict[str, Any] = {
        "requests served": len(result["plain_ms"]) + len(result["e2e_ms"]) + 1,
        "p50 latency": f"{p50:.1f} ms (E2E {p50_e2e:.1f} ms)",
        "served accuracy": round(result["served_acc"], 3),
        "tampered worker": "refused by the KMS (audited)",
    }
    if llm is not None and result["llm"] is not None:
        metrics["LLM + adapter"] = f"served ({result['llm']['seconds']:.1f} s / completion)"
    return ActResult(act=3, title=TITLE, ok=True, seconds=0.0, metrics=metrics,
                     artefacts=[str(js), str(png), *map(str, packages)], simulated_tee=True)


def _gateway_requests(url: str) -> list[str]:
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(url + "/metrics", timeout=5).text
        return [ln for ln in text.splitlines() if ln.startswith("veil_gateway_requests_total")]
    return []
