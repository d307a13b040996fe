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
from veil.tune.split import causal_lm_loss, model_family, num_layers, sequence_logprobs

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

    def train_micro(self, batch: Batch, step: int, micro: int = 0, n_micro: int = 1) -> StepResult:
        self.model.train()
        ids = torch.from_numpy(batch.input_ids)
        mask = torch.from_numpy(batch.attention_mask)
        labels = torch.from_numpy(batch.labels)
        logits = self.model(input_ids=ids, attention_mask=mask).logits
        loss = causal_lm_loss(logits, labels)
        (loss / n_micro).backward()
        applied = micro == n_micro - 1
        if applied:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        return StepResult(
            step=step, micro=micro, loss=float(loss.detach()), tokens=int(mask.sum()), applied=applied,
            server_step=self.step,
        )

    def score(self, batch: Batch, candidates: Sequence[int] = ()) -> EvalResult:
        self.model.eval()
        with torch.no_grad():
            mask = torch.from_numpy(batch.attention_mask)
            logits = self.model(input_ids=torch.from_numpy(batch.input_ids), attention_mask=mask).logits
            if candidates:
                last = mask.sum(dim=1) - 1
                rows = logits[torch.arange(logits.shape[0]), last.clamp(min=0)].float()
                scores = torch.log_softmax(rows, dim=-1)[:, torch.tensor(list(candidates))]
            else:
                scores = sequence_logprobs(logits, torch.from_numpy(batch.labels))
        return EvalResult(scores=scores.numpy().astype(np.float32), loss=float("nan"))
