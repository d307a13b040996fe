"""Fixtures for veil.serve tests: tiny ONNX / XGBoost / HF models built on the fly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="module")
def _veil_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # per test module, restored afterwards (cluster processes inherit it): a private simulated
    # platform key (same directory for every module) and EPC registry
    home = tmp_path_factory.getbasetemp() / "veil-serve-home"
    home.mkdir(exist_ok=True, mode=0o700)
    saved = {k: os.environ.get(k) for k in ("VEIL_HOME", "VEIL_SIM_EPC_DIR")}
    os.environ["VEIL_HOME"] = str(home)
    os.environ["VEIL_SIM_EPC_DIR"] = str(tmp_path_factory.getbasetemp() / "veil-serve-epc")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 3])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def xgb_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import xgboost as xgb

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgb.DMatrix(x, label=y),
        num_boost_round=5,
    )
    path = tmp_path_factory.mktemp("xgb") / "model.json"
    booster.save_model(str(path))
    return path


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def cpu_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env
