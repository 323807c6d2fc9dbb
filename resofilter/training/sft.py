"""Supervised fine-tuning as Lightning modules.

:class:`SFTDataModule` turns tokenized samples into shuffled, right-padded batches;
:class:`SFTModule` trains any causal LM on them with the response-only loss (prompt
positions are ``-100``). The optimizer is a ``_partial_`` config finished in
``configure_optimizers``; the schedule is warmup + cosine / linear / constant.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from resofilter.data.tokenize import IGNORE_INDEX, Collator, TokenizedSample
from resofilter.errors import ConfigError

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s``: linear warmup, then the decay."""
    if schedule not in SCHEDULES:
        raise ConfigError("finetune.scheduler.name", f"unknown schedule {schedule!r}; expected {SCHEDULES}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return f


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over all response tokens of the batch, and their count."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return loss / max(n, 1), n


class SFTDataModule(pl.LightningDataModule):
    def __init__(self, samples: Sequence[TokenizedSample], pad_token_id: int, batch_size: int,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not samples:
            raise ConfigError("data", "no training samples after tokenization")
        self.samples = list(samples)
        self.collate = Collator(pad_token_id, "right")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.samples, batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=self.collate, num_workers=self.num_workers)


class SFTModule(pl.LightningModule):
    """Causal-LM SFT with response-only loss; logs ``train/loss``, ``train/lr``, ``train/tokens_per_s``."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_cfg = dict(scheduler or {"name": "constant", "warmup_ratio": 0.0})
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self._t_last: float | None = None
        self.tokens_seen = 0

    def on_train_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; dropout must be on while training

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return causal_lm_loss(out.logits, batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self(batch)
        n_tok = int(batch["attention_mask"].sum())
        self.tokens_seen += n_tok
        now = time.perf_counter()
        if self._t_last is not None:
            self.log("train/tokens_per_s", n_tok / max(now - self._t_last, 1e-9), on_step=True)
        self._t_last = now
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(self.scheduler_cfg.get("warmup_ratio", 0.0) * total))
        fn = lr_lambda(self.scheduler_cfg.get("name", "constant"), total, warmup,
                       self.scheduler_cfg.get("min_lr_ratio", 0.0))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
        log.info("optimizer %s, %d steps (%d warmup), schedule %s", type(opt).__name__, total, warmup,
                 self.scheduler_cfg.get("name"))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
