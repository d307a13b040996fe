"""Centralized (unsplit, no TEE, no network) fine-tuning with the same interface as the client.

Used as the baseline in benchmarks and tests: ``train_micro`` / ``score`` match
:class:`veil.tune.client.TuneClient`, so :func:`~veil.tune.client.train_split` and
:func:`~veil.tune.client.evaluate_classification` drive both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from veil.errors import ConfigError
from veil.tune.adapters import DEFAULT_LORA_TARGETS
from veil.tune.data import Batch
from veil.tune.messages import EvalResult, StepResult
from veil.tune.split import (
    head_last_logprobs,
    head_loss,
    head_sequence_logprobs,
    model_family,
    num_layers,
    set_mode,
)

__all__ = ["LocalLoRATrainer"]


class LocalLoRATrainer:
    """peft LoRA on the whole model (or on ``layers``), AdamW, in one process."""

    def __init__(
        self,
        model: Any,
        *,
        r: int = 8,
        alpha: int = 16,
        lr: float = 1e-3,
        layers: Sequence[int] | None = None,
        target_modules: list[str] | None = None,
    ) -> None:
        from peft import LoraConfig, get_peft_model

        fam = model_family(model)
        n = num_layers(model)
        if layers is not None and (not layers or min(layers) < 0 or max(layers) >= n):
            raise ConfigError(f"LoRA layers must be within 0..{n - 1}")
        cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=target_modules or DEFAULT_LORA_TARGETS[fam],
            layers_to_transform=list(layers) if layers is not None else None,
            fan_in_fan_out=fam == "gpt2",
        )
        self.model = get_peft_model(model, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.step = 0
        self.bytes_sent = 0
        inner: Any = self.model.get_base_model()  # the CausalLM with LoRA layers injected
        self._decoder = inner.model if fam == "llama" else inner.transformer
        self._lm_head = inner.lm_head

    def _final_hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self._decoder(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state  # type: ignore[no-any-return]

    def train_micro(self, batch: Batch, step: int, micro: int = 0, n_micro: int = 1) -> StepResult:
        set_mode(self.model, True)
        ids = torch.from_numpy(batch.input_ids)
        mask = torch.from_numpy(batch.attention_mask)
        labels = torch.from_numpy(batch.labels)
        loss = head_loss(self._final_hidden(ids, mask), self._lm_head, labels)
        (loss / n_micro).backward()
        applied = micro == n_micro - 1
        if applied:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        return StepResult(
            step=step,
            micro=micro,
            loss=float(loss.detach()),
            tokens=int(mask.sum()),
            applied=applied,
            server_step=self.step,
        )

    def score(self, batch: Batch, candidates: Sequence[int] = ()) -> EvalResult:
        set_mode(self.model, False)
        with torch.no_grad():
            mask = torch.from_numpy(batch.attention_mask)
            fh = self._final_hidden(torch.from_numpy(batch.input_ids), mask)
            if candidates:
                scores = head_last_logprobs(fh, self._lm_head, mask, torch.tensor(list(candidates)))
            else:
                scores = head_sequence_logprobs(fh, self._lm_head, torch.from_numpy(batch.labels))
        return EvalResult(scores=scores.numpy().astype(np.float32), loss=float("nan"))
