"""Supervised fine-tuning as Lightning modules.

:class:`SFTDataModule` turns tokenized samples into shuffled, right-padded batches;
:class:`SFTModule` trains any causal LM on them with the response-only loss (prompt
positions are ``-100``). The optimizer and the schedule (``transformers.get_scheduler``) are
``_partial_`` configs finished in ``configure_optimizers``.

Training resumes exactly from a mid-epoch checkpoint: the batch order is a pure function of
(seed, epoch, rank, world size) (:class:`EpochBatchSampler`), the data module records in
the checkpoint how many batches of the epoch were trained and skips them on resume, and the
random state of every batch (dropout) is seeded from (seed, epoch, batch, rank), so nothing
random is carried from one batch to the next.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from resofilter._io import follow_umask
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


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                batch_size: int | None = None) -> list[int]:
    """The sample indices one rank trains on in ``epoch``, in order.

    One process: the ``epoch``-th pass of ``DataLoader(shuffle=True, generator=Generator(seed),
    batch_size=batch_size)`` as Lightning iterates it, replayed from the seed so that any epoch
    can be produced on its own; the embedded base model and every fine-tune made before
    resumable training see the same order. Each pass draws the loader's base seed and a
    permutation from the one generator; ``RandomSampler`` draws one more (empty) permutation
    when asked past the end, which happens only while a partial last batch is filled
    (Lightning stops at ``len(loader)`` batches, so a full last batch never asks).
    Several processes: ``torch.utils.data.DistributedSampler(shuffle=True, seed=seed)`` at
    ``epoch``, as Lightning's DDP used (padded to a multiple of the world size, ``rank::world``).
    """
    if world_size > 1:
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    partial_last = batch_size is None or n % batch_size != 0
    for _ in range(epoch + 1):
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader iterator's base seed
        order = torch.randperm(n, generator=g).tolist()
        if partial_last:
            torch.randperm(n, generator=g)  # RandomSampler's trailing (empty) slice
    return order


class EpochSampler(Sampler[int]):
    """:func:`epoch_order` of the epoch Lightning last announced through :meth:`set_epoch`."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None) -> None:
        self.n, self.seed, self.rank, self.world_size, self.batch_size = n, seed, rank, world_size, batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch, self.rank, self.world_size, self.batch_size))


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of an :class:`EpochSampler`; after :meth:`resume_at` the resumed epoch skips what was trained.

    ``len`` is always the full epoch (Lightning counts the resumed epoch's batches from the
    checkpoint). Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` before every epoch.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self._skip: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def resume_at(self, epoch: int, batches: int) -> None:
        self._skip = (epoch, batches)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        skip = 0
        if self._skip is not None and self._skip[0] == self.sampler.epoch:
            skip, self._skip = self._skip[1], None
        for start in range(skip * self.batch_size, len(order), self.batch_size):
            yield order[start:start + self.batch_size]


class SFTDataModule(pl.LightningDataModule):
    """Tokenized samples → right-padded batches in :func:`epoch_order`, resumable mid-epoch.

    The checkpoint holds ``{"epoch", "batches"}``: the batches of the current epoch trained so
    far, computed from ``trainer.global_step`` (checkpoints are taken right after an optimizer
    step, so every trained batch has stepped; every epoch has the same number of batches).
    """

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
        self._resume: dict[str, int] | None = None
        self.sampler: EpochBatchSampler | None = None

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.sampler = EpochBatchSampler(EpochSampler(len(self.samples), self.seed, rank, world, self.batch_size),
                                         self.batch_size)
        if self._resume is not None:
            self.sampler.resume_at(self._resume["epoch"], self._resume["batches"])
        return DataLoader(self.samples, batch_sampler=self.sampler, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None or self.sampler is None:
            return {}
        per_epoch = len(self.sampler)
        steps_per_epoch = math.ceil(per_epoch / self.trainer.accumulate_grad_batches)
        epoch = self.trainer.current_epoch
        done = (self.trainer.global_step - epoch * steps_per_epoch) * self.trainer.accumulate_grad_batches
        return {"epoch": epoch, "batches": min(max(done, 0), per_epoch), "world_size": self.trainer.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        world = self.trainer.world_size if self.trainer else 1
        if state_dict.get("world_size", 1) != world:
            raise ConfigError("trainer.devices", f"the checkpoint was trained by {state_dict['world_size']} "
                              f"processes and this run has {world}: the data order differs, so it cannot resume")
        self._resume = {"epoch": state_dict["epoch"], "batches": state_dict["batches"]}


@contextlib.contextmanager
def quiet_resume_warning() -> Iterator[None]:
    """Hide Lightning's "dataloader is not resumable" warning, which :class:`SFTDataModule` makes false.

    (The data module, not the loader, carries the position: Lightning loads a stateful loader's
    state only after ``estimated_stepping_batches`` has built the loader, Lightning issue 20550.)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch "
                                r"ended and your dataloader is not resumable")
        yield


def batch_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The random seed of one training batch: a hash of (seed, epoch, batch, rank), stateless."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{batch_idx}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SFTModule(pl.LightningModule):
    """Causal-LM SFT with response-only loss; logs ``train/loss``, ``train/lr``, ``train/tokens_per_s``."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        warmup_ratio: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler  # a _partial_ transformers.get_scheduler (None: constant)
        self.warmup_ratio = warmup_ratio
        self.seed = seed
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self._t_last: float | None = None
        self.tokens_seen = 0

    def on_train_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; dropout must be on while training

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout's randomness from where the batch is, not from what ran before: a resumed run
        # draws what the uninterrupted one drew
        torch.manual_seed(batch_seed(self.seed, self.current_epoch, batch_idx, self.global_rank))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["resofilter"] = {"tokens_seen": self.tokens_seen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("resofilter", {}).get("tokens_seen", 0)

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


class PeriodicCheckpoint(pl.Callback):
    """Save the full training state every ``every_n_steps`` optimizer steps to one file, atomically.

    The file (``trainer.save_checkpoint``: weights, optimizer, scheduler, loop progress, the
    data module's position) is written under a temporary name and renamed over the previous one,
    so a kill at any moment leaves the last complete checkpoint. Saves happen right after an
    optimizer step, never at the final step (the stage saves the finished model itself).
    """

    def __init__(self, path: str | Path, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ConfigError("finetune.checkpoint_every_n_steps",
                              f"must be ≥ 1 (or null for none), got {every_n_steps}")
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._last_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run does not re-save the step it resumed from

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return  # no optimizer step at this batch (accumulating), or not a save step
        self._last_step = step
        if 0 < trainer.max_steps <= step:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the full state; collective under DDP: rank 0 writes
        if trainer.is_global_zero:
            follow_umask(tmp)
            os.replace(tmp, self.path)
        trainer.strategy.barrier("periodic-checkpoint")
        log.debug("training state at step %d → %s", step, self.path)
