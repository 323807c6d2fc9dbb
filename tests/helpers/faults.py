"""Fault injection for in-process kill-and-resume tests (used through ``trainer.callbacks`` configs)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class InjectedFault(RuntimeError):
    """What a fault injector raises: a stand-in for the process dying."""


class RaiseAtStep(pl.Callback):
    """Raise once ``trainer.global_step`` reaches ``step`` (before the stage's own checkpoint callback runs).

    ``interrupt=True`` raises ``KeyboardInterrupt`` instead, which Lightning turns into a
    graceful stop (as on Ctrl-C or Slurm's SIGTERM): ``fit`` returns normally.
    """

    def __init__(self, step: int, interrupt: bool = False) -> None:
        self.step, self.interrupt = step, interrupt

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise KeyboardInterrupt if self.interrupt else InjectedFault(f"killed at step {trainer.global_step}")
