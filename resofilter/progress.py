"""Progress wherever the output goes: bars in a terminal, a plain log line every N seconds otherwise.

A log file (Slurm, nohup, CI) cannot show a redrawn bar: it gets garbled ``\\r`` lines or, for
rich bars, nothing at all for hours. When stderr is not a terminal (or ``progress.bars=false``
is not set and ``bars=auto``), long loops log ``desc: done/total (pct), rate, ETA`` every
``progress.log_every_s`` seconds and once at the end instead.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import pytorch_lightning as pl

from resofilter.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

_SETTINGS: dict[str, Any] = {"bars": "auto", "log_every_s": 30.0}


def configure(bars: Any = "auto", log_every_s: float = 30.0) -> None:
    """Set from the ``progress`` config section (the CLI does, once per command)."""
    if bars not in ("auto", True, False):
        raise ConfigError("progress.bars", f"must be auto, true or false, got {bars!r}")
    if not log_every_s >= 0:
        raise ConfigError("progress.log_every_s", f"must be ≥ 0 seconds, got {log_every_s!r}")
    _SETTINGS.update(bars=bars, log_every_s=float(log_every_s))
    _third_party_bars()


def bars() -> bool:
    """Whether to draw progress bars (a terminal, or forced), rather than log lines."""
    if _SETTINGS["bars"] == "auto":
        return sys.stderr.isatty()
    return bool(_SETTINGS["bars"])


def _third_party_bars() -> None:
    """transformers' own tqdm bars (weight loading) draw ``\r`` lines into a log file: only in a terminal."""
    from transformers.utils import logging as hf_logging

    if bars():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Throttled:
    """Logs ``desc: done/total (pct), rate unit/s, ETA`` at most every ``every_s`` seconds, and at the end."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", every_s: float | None = None,
                 clock: Any = time.monotonic) -> None:
        self.desc, self.total, self.unit, self.clock = desc, total, unit, clock
        self.every_s = _SETTINGS["log_every_s"] if every_s is None else every_s
        self.start = self.last = clock()
        self.done = 0
        self.logged: int | None = None

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if now - self.last >= self.every_s or (self.total is not None and done >= self.total):
            self._line(now)

    def close(self) -> None:
        """The last line, unless the last update logged it already."""
        if self.logged != self.done:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self.last = now
        self.logged = self.done
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %d/%d %s (%.0f%%), %.2f %s/s, elapsed %s, ETA %s", self.desc, self.done, self.total,
                     self.unit, 100 * self.done / self.total, rate, self.unit, _duration(elapsed),
                     "?" if eta == float("inf") else _duration(eta))
        else:
            log.info("%s: %d %s, %.2f %s/s, elapsed %s", self.desc, self.done, self.unit, rate, self.unit,
                     _duration(elapsed))


def iterate(items: Iterable[T], total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """``items`` with a tqdm bar in a terminal, throttled log lines otherwise (nothing if not ``enabled``)."""
    if not enabled:
        yield from items
        return
    if bars():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    t = Throttled(desc, total, unit)
    for i, item in enumerate(items, 1):
        yield item
        t.update(i)
    t.close()


class LogProgress(pl.Callback):
    """Throttled log lines for Lightning's fit (optimizer steps) and predict (batches) loops."""

    def __init__(self, desc: str = "") -> None:
        self.desc = desc
        self._t: Throttled | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        self._t = Throttled(self.desc or "training", total, "steps")
        self._t.done = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t is not None and trainer.global_step != self._t.done:
            loss = trainer.callback_metrics.get("train/loss")
            self._t.desc = f"{self.desc or 'training'}" + (f" (loss {float(loss):.4f})" if loss is not None else "")
            self._t.update(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t is not None:
            self._t.close()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t = Throttled(self.desc or "predicting", int(sum(trainer.num_predict_batches)), "batches")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._t is not None:
            self._t.update(self._t.done + 1)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t is not None:
            self._t.close()


def trainer_progress(enabled: bool, desc: str) -> dict[str, Any]:
    """Trainer kwargs: a bar in a terminal, else :class:`LogProgress` (callbacks to add under ``callbacks``)."""
    if not enabled:
        return {"enable_progress_bar": False, "callbacks": []}
    if bars():
        return {"enable_progress_bar": True, "callbacks": []}
    return {"enable_progress_bar": False, "callbacks": [LogProgress(desc)]}
