"""A tiny HF Llama + LoRA adapter: `veil serve package` and `veil serve up` as real CLI processes,
called with tritonclient (logits) and /v1/completions (plain and end-to-end encrypted)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from veil.serve.client import ServeClient
from veil.tee import Policy, platform_public_key

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory, hf_model: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(hf_model)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft_model.save_pretrained(out)
    return out


def _reference(hf_model: Path, adapter: Path) -> object:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_model), adapter).eval()


def _procs_mentioning(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_llm_with_adapter_via_cli(tmp_path: Path, hf_model: Path, lora_adapter: Path) -> None:
    import torch
    import tritonclient.http as httpclient

    py = [sys.executable, "-m", "veil.serve"]
    pkg = tmp_path / "pkg" / "llm.veil"
    key = tmp_path / "secrets" / "llm.key.json"
    r = subprocess.run(
        [
            *py,
            "package",
            str(hf_model),
            "--out",
            str(pkg),
            "--name",
            "llm",
            "--adapter",
            str(lora_adapter),
            "--key-out",
            str(key),
            "--signing-key",
            str(tmp_path / "secrets" / "sk"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    # refusing to put the key beside the package
    r2 = subprocess.run(
        [*py, "package", str(hf_model), "--out", str(pkg), "--key-out", str(pkg.parent / "k.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r2.returncode != 0 and "beside the package" in r2.stderr and "Traceback" not in r2.stderr

    state = tmp_path / "state"
    up = subprocess.Popen(
        [
            *py,
            "up",
            "--model",
            str(pkg),
            "--key-file",
            str(key),
            "--workers",
            "1",
            "--port",
            "0",
            "--state",
            str(state),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = ""
        deadline = time.monotonic() + 240
        assert up.stdout is not None
        while time.monotonic() < deadline and not url:
            line = up.stdout.readline()
            if not line and up.poll() is not None:
                pytest.fail(f"veil serve up exited: {up.stderr.read() if up.stderr else ''}")
            m = re.search(r"veil serving at (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                assert "SIMULATED" in line
        assert url, "no endpoint printed"

        ref = _reference(hf_model, lora_adapter)
        ids = np.array([[1, 7, 3, 22, 9]], dtype=np.int64)
        with torch.inference_mode():
            want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()  # type: ignore[operator]
        tc = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        inp = httpclient.InferInput("input_ids", list(ids.shape), "INT64")
        inp.set_data_from_numpy(ids)
        got = tc.infer("llm", [inp]).as_numpy("logits")
        tc.close()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

        prompt = "w3 w5 w7"
        with torch.inference_mode():
            gen = ref.generate(
                input_ids=torch.tensor([[6, 8, 10]]),
                max_new_tokens=5,
                do_sample=False,  # type: ignore[attr-defined]
                attention_mask=torch.ones(1, 3, dtype=torch.long),
                pad_token_id=0,
            )
        want_ids = gen[0, 3:].tolist()
        with ServeClient(url) as c:
            out = c.complete("llm", prompt, max_tokens=5)
        assert out["choices"][0]["token_ids"] == want_ids and out["tee"] == "simulated"
        policy = Policy(
            allow_any_measurement=True,
            allow_simulated=True,
            simulated_platform_keys={platform_public_key().hex()},
        )
        with ServeClient(url, policy=policy, e2e=True) as c:
            assert c.complete("llm", prompt, max_tokens=5)["choices"][0]["token_ids"] == want_ids
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert up.returncode == 0
    time.sleep(0.5)
    assert _procs_mentioning(str(state)) == [], "orphan processes after veil serve up stopped"
