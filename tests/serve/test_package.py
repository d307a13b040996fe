"""Encrypted model packages: round trip, strict parsing, tamper detection, in-memory runners."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from veil.crypto.random import random_bytes
from veil.errors import InputError, IntegrityError
from veil.serve import signing
from veil.serve.package import (
    KeyFile,
    build_package,
    decrypt_payload,
    read_package,
)
from veil.serve.worker.runners import load_runner


def _pkg(model: Path, name: str = "tiny", **kw: object) -> tuple[bytes, bytes, signing.SigningKey]:
    key = random_bytes(32)
    sk = signing.SigningKey.generate()
    data = build_package(model, name=name, signing_key=sk, data_key=key, key_id=random_bytes(16).hex(), **kw)
    return data, key, sk


def test_onnx_round_trip_equals_onnxruntime(onnx_model: Path) -> None:
    import onnxruntime as ort

    data, key, sk = _pkg(onnx_model)
    pkg = read_package(data, trusted_signers={sk.public_bytes.hex()})
    m = pkg.manifest
    assert m.format == "onnx" and m.inputs[0].name == "x" and m.inputs[0].shape == [-1, 4]
    assert m.outputs[0].name == "probs" and m.outputs[0].datatype == "FP32"
    # the model bytes never appear in the package
    assert onnx_model.read_bytes()[-64:] not in data
    runner = load_runner(m, decrypt_payload(pkg, key))
    x = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
    ref = ort.InferenceSession(str(onnx_model)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(runner.infer({"x": x}, [])["probs"], ref)


def test_xgboost_round_trip(xgb_model: Path) -> None:
    import xgboost as xgb

    data, key, _ = _pkg(xgb_model, name="xgb")
    pkg = read_package(data)
    assert pkg.manifest.format == "xgboost" and pkg.manifest.inputs[0].shape == [-1, 5]
    runner = load_runner(pkg.manifest, decrypt_payload(pkg, key))
    x = np.random.default_rng(4).normal(size=(7, 5)).astype(np.float32)
    b = xgb.Booster()
    b.load_model(str(xgb_model))
    np.testing.assert_allclose(
        runner.infer({"input__0": x}, [])["output__0"], b.predict(xgb.DMatrix(x)), rtol=1e-6
    )


def test_every_flipped_byte_is_rejected(onnx_model: Path) -> None:
    data, key, _ = _pkg(onnx_model)
    # every byte of the header/manifest/signature, and a spread of payload bytes
    positions = list(range(0, len(data) - 400)) if len(data) < 3000 else list(range(0, 1200))
    positions += [*list(range(len(data) - 400, len(data), 7)), len(data) - 1]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            pkg = read_package(bytes(bad))
            decrypt_payload(pkg, key)


def test_truncated_padded_and_wrong_key(onnx_model: Path) -> None:
    data, _, _ = _pkg(onnx_model)
    with pytest.raises(IntegrityError, match="length"):
        read_package(data[:-1])
    with pytest.raises(IntegrityError, match="length"):
        read_package(data + b"\x00")
    with pytest.raises(IntegrityError, match="magic"):
        read_package(b"garbage")
    with pytest.raises(IntegrityError, match="decrypt"):
        decrypt_payload(read_package(data), random_bytes(32))
    with pytest.raises(IntegrityError, match="untrusted"):
        read_package(data, trusted_signers={"00" * 32})


def test_size_limit_enforced(onnx_model: Path) -> None:
    data, _, _ = _pkg(onnx_model)
    with pytest.raises(IntegrityError, match="exceeds the limit"):
        read_package(data, max_payload=100)


def test_key_file_is_separate_and_private(tmp_path: Path, onnx_model: Path) -> None:
    kf = KeyFile(model="m", key_id="ab" * 16, key="cd" * 32, signer="ef" * 32)
    p = tmp_path / "k.json"
    kf.write(p)
    assert (p.stat().st_mode & 0o077) == 0
    assert KeyFile.read(p) == kf
    p.write_text("{}")
    with pytest.raises(InputError):
        KeyFile.read(p)


def test_pickle_weights_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="pickle"):
        _pkg(d)


def test_hf_round_trip_equals_transformers(hf_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    data, key, _ = _pkg(hf_model, name="llm")
    pkg = read_package(data)
    assert pkg.manifest.format == "hf-causal-lm"
    runner = load_runner(pkg.manifest, decrypt_payload(pkg, key))
    ids = np.array([[1, 5, 9, 12]], dtype=np.int64)
    ref = AutoModelForCausalLM.from_pretrained(hf_model).eval()
    with torch.inference_mode():
        want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(runner.infer({"input_ids": ids}, [])["logits"], want, rtol=1e-5, atol=1e-5)
