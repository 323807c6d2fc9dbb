"""Supervised fine-tuning as Lightning modules.

:class:`SFTDataModule` turns tokenized samples into shuffled, right-padded batches;
:class:`SFTModule` trains any causal LM on them with the response-only loss (prompt
positions are ``-100``). The optimizer and the schedule (``transformers.get_scheduler``) are
``_partial_`` configs finished in ``configure_optimizers``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from resofilter.data.tokenize import IGNORE_INDEX, Collator, TokenizedSample
from resofilter.errors import ConfigError

log = logging.getLogger(__name__)

def make_scheduler(scheduler: Callable[..., Any] | None, optimizer: torch.optim.Optimizer, total_steps: int,
                   warmup_ratio: float) -> tuple[Any, int]:
    """Finish a ``_partial_`` ``transformers.get_scheduler`` with the optimizer and the step counts.

    Warmup is ``round(warmup_ratio × total_steps)`` optimizer steps (linear from 0); ``None`` is
    a constant learning rate. Returns (scheduler, warmup steps).
    """
    from transformers import get_scheduler

    warmup = int(round(warmup_ratio * total_steps))
    factory = scheduler or functools.partial(get_scheduler, name="constant_with_warmup")
    return factory(optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps), warmup


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
        scheduler: Callable[..., Any] | None = None,
        warmup_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler  # a _partial_ transformers.get_scheduler (None: constant)
        self.warmup_ratio = warmup_ratio
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
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
        sched, warmup = make_scheduler(self.scheduler_factory, opt, total, self.warmup_ratio)
        name = self.scheduler_factory.keywords.get("name") if self.scheduler_factory else "constant"
        log.info("optimizer %s, %d steps (%d warmup), schedule %s", type(opt).__name__, total, warmup, name)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
