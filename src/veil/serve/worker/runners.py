"""Model runners: build an inference engine from decrypted model bytes, in memory only.

Nothing here writes model bytes to disk: ONNX sessions are built from bytes, XGBoost boosters
from a bytearray, Hugging Face models from ``config.json`` + safetensors bytes (and an optional
PEFT LoRA adapter, merged).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Protocol

import numpy as np

from veil.serve.errors import InferenceInputError, PackageError
from veil.serve.package import Manifest, unpack_bundle
from veil.serve.v2 import DTYPES

__all__ = ["HFRunner", "ModelRunner", "OnnxRunner", "XGBoostRunner", "load_runner"]

log = logging.getLogger("veil.serve.worker")


class ModelRunner(Protocol):
    manifest: Manifest
    footprint_bytes: int

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...


def _check_inputs(manifest: Manifest, inputs: dict[str, np.ndarray]) -> None:
    want = {t.name: t for t in manifest.inputs}
    if set(inputs) != set(want):
        raise InferenceInputError(
            f"model {manifest.name!r} expects inputs {sorted(want)}, got {sorted(inputs)}"
        )
    for name, arr in inputs.items():
        spec = want[name]
        if spec.datatype != "BYTES" and arr.dtype != DTYPES.get(spec.datatype):
            raise InferenceInputError(f"input {name!r} must be {spec.datatype}, got {arr.dtype}")
        if len(arr.shape) != len(spec.shape) or any(
            s != -1 and s != d for s, d in zip(spec.shape, arr.shape, strict=True)
        ):
            raise InferenceInputError(
                f"input {name!r} has shape {list(arr.shape)}, model expects {spec.shape}"
            )


def _select(manifest: Manifest, result: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    if not outputs:
        return result
    unknown = [o for o in outputs if o not in result]
    if unknown:
        raise InferenceInputError(f"unknown outputs {unknown}; model {manifest.name!r} has {sorted(result)}")
    return {o: result[o] for o in outputs}


class OnnxRunner:
    def __init__(self, manifest: Manifest, raw: bytes, *, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(raw, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise PackageError(f"onnxruntime cannot load the decrypted model: {exc}") from None
        self.manifest = manifest
        self.footprint_bytes = len(raw)
        self._names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        _check_inputs(self.manifest, inputs)
        try:
            res = self.session.run(outputs or None, inputs)
        except Exception as exc:
            raise InferenceInputError(f"onnxruntime rejected the request: {exc}") from None
        return dict(zip(outputs or self._names, (np.asarray(r) for r in res), strict=True))


class XGBoostRunner:
    def __init__(self, manifest: Manifest, raw: bytes) -> None:
        import xgboost as xgb

        self.booster = xgb.Booster()
        try:
            self.booster.load_model(bytearray(raw))
        except xgb.core.XGBoostError as exc:
            raise PackageError(f"xgboost cannot load the decrypted model: {exc}") from None
        self.booster.set_param({"nthread": 1})
        self.manifest = manifest
        self.footprint_bytes = len(raw)
        self._lock = threading.Lock()

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        _check_inputs(self.manifest, inputs)
        x = inputs["input__0"]
        with self._lock:
            pred = self.booster.inplace_predict(x)
        return _select(self.manifest, {"output__0": np.asarray(pred, dtype=np.float32)}, outputs)


class HFRunner:
    """A Hugging Face causal LM (+ merged LoRA adapter) built from in-memory files."""

    def __init__(self, manifest: Manifest, raw: bytes) -> None:
        import safetensors.torch
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        files = unpack_bundle(raw)
        cfg = json.loads(files["model/config.json"])
        model_type = cfg.pop("model_type", None)
        if not isinstance(model_type, str):
            raise PackageError("config.json has no model_type")
        for k in ("architectures", "transformers_version"):
            cfg.pop(k, None)
        config = AutoConfig.for_model(model_type, **cfg)
        torch.manual_seed(0)  # initialisation is overwritten by the weights below
        model = AutoModelForCausalLM.from_config(config)
        state: dict[str, Any] = {}
        for name, blob in files.items():
            if name.startswith("model/") and name.endswith(".safetensors"):
                state.update(safetensors.torch.load(blob))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise PackageError(
                f"weights do not match the config (missing {list(missing)[:3]}, "
                f"unexpected {list(unexpected)[:3]})"
            )
        if tied:
            model.tie_weights()
        if "adapter/adapter_config.json" in files:
            model = self._merge_adapter(model, files)
        model.eval()
        self.model = model
        self.torch = torch
        self.manifest = manifest
        self.footprint_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.tokenizer: Any = None
        if "model/tokenizer.json" in files:
            from tokenizers import Tokenizer
            from transformers import PreTrainedTokenizerFast

            tcfg: dict[str, Any] = {}
            if "model/tokenizer_config.json" in files:
                raw_cfg = json.loads(files["model/tokenizer_config.json"])
                tcfg = {
                    k: v
                    for k, v in raw_cfg.items()
                    if k in ("bos_token", "eos_token", "unk_token", "pad_token") and isinstance(v, str)
                }
            self.tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=Tokenizer.from_str(files["model/tokenizer.json"].decode()), **tcfg
            )
        self._lock = threading.Lock()

    @staticmethod
    def _merge_adapter(model: Any, files: dict[str, bytes]) -> Any:
        import safetensors.torch
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

        acfg = json.loads(files["adapter/adapter_config.json"])
        acfg.pop("base_model_name_or_path", None)
        try:
            pconf = PeftConfig.from_peft_type(**acfg)
        except (TypeError, ValueError) as exc:
            raise PackageError(f"bad adapter_config.json: {exc}") from None
        peft_model = get_peft_model(model, pconf)
        state: dict[str, Any] = {}
        for name, blob in files.items():
            if name.startswith("adapter/") and name.endswith(".safetensors"):
                state.update(safetensors.torch.load(blob))
        res = set_peft_model_state_dict(peft_model, state)
        unexpected: list[str] = list(getattr(res, "unexpected_keys", None) or [])
        if unexpected:
            raise PackageError(f"adapter weights do not match its config: {unexpected[:3]}")
        return peft_model.merge_and_unload()

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        _check_inputs(self.manifest, inputs)
        ids = inputs["input_ids"]
        vocab = int(self.manifest.parameters.get("vocab_size", 0) or 0)
        if ids.size == 0 or (vocab and (ids.min() < 0 or ids.max() >= vocab)):
            raise InferenceInputError(f"input_ids must be non-empty token ids in [0, {vocab})")
        with self._lock, self.torch.inference_mode():
            logits = self.model(input_ids=self.torch.from_numpy(ids.astype(np.int64))).logits
        return _select(self.manifest, {"logits": logits.float().numpy()}, outputs)

    def complete(self, prompt: str | list[int], max_tokens: int) -> tuple[str, list[int], list[int]]:
        """Greedy completion; returns (text, prompt ids, new token ids)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InferenceInputError("this package has no tokenizer: send token ids as the prompt")
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        else:
            ids = list(prompt)
        vocab = int(self.manifest.parameters.get("vocab_size", 0) or 0)
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise InferenceInputError("prompt must encode to at least one valid token id")
        with self._lock, self.torch.inference_mode():
            out = self.model.generate(
                self.torch.tensor([ids], dtype=self.torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                attention_mask=self.torch.ones(1, len(ids), dtype=self.torch.long),
                pad_token_id=0,
            )
        new = out[0, len(ids) :].tolist()
        text = self.tokenizer.decode(new) if self.tokenizer is not None else ""
        return text, ids, new


def load_runner(manifest: Manifest, plain: bytes) -> ModelRunner:
    """Build the runner for a decrypted payload."""
    runner: ModelRunner
    if manifest.format == "onnx":
        runner = OnnxRunner(manifest, plain)
    elif manifest.format == "xgboost":
        runner = XGBoostRunner(manifest, plain)
    else:
        runner = HFRunner(manifest, plain)
    log.info(
        "loaded %s model %s v%s (%d bytes in enclave memory)",
        manifest.format,
        manifest.name,
        manifest.version,
        runner.footprint_bytes,
    )
    return runner
