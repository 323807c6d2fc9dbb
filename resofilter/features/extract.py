"""Feature extraction as a Lightning predict loop: sharded, resumable, multi-device.

Samples are split into shards of ``shard_size`` consecutive samples; shard k goes to rank
``k % world_size``. Within a shard, batches are bucketed by length. Each finished shard is
written atomically to ``<out>/shards/shard-XXXXX.parquet``; a restarted run with the same
output dir skips finished shards, and rank 0 merges all shards into ``features.parquet``
(original order, ``sample_id`` first) and writes ``manifest.json``. A different config in
an existing output dir is an error, never a silent mix.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from resofilter import progress
from resofilter._io import (
    environment_info,
    file_hash,
    read_json,
    stable_hash,
    write_json_atomic,
    write_npy_atomic,
    write_parquet_atomic,
)
from resofilter.data.tokenize import Collator, TokenizedSample, length_buckets
from resofilter.errors import ResoFilterError
from resofilter.features.closed_form import StepConfig
from resofilter.features.fast import FastScorer, ppl, response_losses, split_devices
from resofilter.features.literal import LiteralScorer
from resofilter.features.memory import set_mmap_threshold
from resofilter.features.sketch import SKETCH_COLUMN, SKETCH_FILE, SketchSpec, sketch_layout
from resofilter.features.targets import Target
from resofilter.features.tokens import TokenSignalSpec, token_signals
from resofilter.identity import runtime_field
from resofilter.registry import register

log = logging.getLogger(__name__)

FEATURES_FILE = "features.parquet"
MANIFEST_FILE = "manifest.json"
META_COLUMNS = ("sample_id", "loss", "ppl", "n_tokens", "truncated")


def column(target: str, statistic: str) -> str:
    return f"{target}/{statistic}"


def samples_hash(samples: Sequence[TokenizedSample]) -> str:
    return stable_hash([(s.sample_id, s.input_ids, s.labels) for s in samples])


class FeatureDataModule(pl.LightningDataModule):
    """Batches of the shards this rank owns and has not finished yet."""

    def __init__(self, samples: Sequence[TokenizedSample], pad_token_id: int, shard_size: int,
                 batch_size: int, max_tokens: int | None, done: set[int],
                 alone: Sequence[TokenizedSample] | None = None,
                 spans: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.samples = list(samples)
        self.spans = spans
        self.alone = list(alone) if alone is not None else None
        self.collate = Collator(pad_token_id, "right")
        self.shard_size, self.batch_size, self.max_tokens = shard_size, batch_size, max_tokens
        self.done = done

    def n_shards(self) -> int:
        return (len(self.samples) + self.shard_size - 1) // self.shard_size

    def shard_range(self, k: int) -> range:
        return range(k * self.shard_size, min(len(self.samples), (k + 1) * self.shard_size))

    def todo(self) -> list[int]:
        return [k for k in range(self.n_shards()) if k not in self.done]

    def batches(self, rank: int, world: int) -> list[list[int]]:
        """The batches of the unfinished shards this rank owns (round robin over unfinished shards).

        A rank that owns none gets one empty batch: every rank must take part in the predict
        loop's collectives, and an empty DataLoader is an error there.
        """
        out = []
        for k in self.todo()[rank::world]:
            idx = self.shard_range(k)
            lengths = [len(self.samples[i]) for i in idx]
            out += [[idx[j] for j in b] for b in length_buckets(lengths, self.batch_size, self.max_tokens)]
        return out or [[]]

    def _collate(self, indices: list[int]) -> dict[str, Any]:
        if not indices:  # an idle rank's placeholder batch
            return {"index": torch.zeros(0, dtype=torch.long)}
        batch = self.collate([self.samples[i] for i in indices])
        batch["index"] = torch.tensor(indices)
        if self.alone is not None:
            batch["alone"] = self.collate([self.alone[i] for i in indices])
        if self.spans is not None:
            batch["answer_span"] = torch.tensor([self.spans[self.samples[i].sample_id] for i in indices])
        return batch

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        batches = self.batches(rank, world)
        return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=self._collate)


def describe_scorer(scorer: FastScorer | LiteralScorer) -> str:
    """What one scoring pass computes, for the log: matrices, statistics, signals."""
    targets = getattr(scorer, "targets", None) or getattr(scorer, "target_names", [])
    layers = sorted({t.layer for t in targets if hasattr(t, "layer")})
    where = f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}" if layers else ""
    stats = ", ".join(scorer.statistics)
    return (f"{len(targets)} matrices ({where}) × [{stats}]"
            f"{', gradient sketches' if scorer.projector is not None else ''}, token losses")


class FeatureModule(pl.LightningModule):
    """``predict_step`` returns one feature row per sample of the batch."""

    def __init__(self, model: torch.nn.Module, scorer: FastScorer | LiteralScorer, ifd: bool = False,
                 topk: int = 4, remaining_tokens: int = 0) -> None:
        super().__init__()
        self.remaining_tokens = remaining_tokens  # for the cost estimate logged after the first batch
        if split_devices(model):
            # placed over several devices (score.device_map): kept out of the module's children, so the
            # trainer's move to its one device does not gather it there
            self.__dict__["model"] = model
        else:
            self.model = model
        self.scorer = scorer
        self.ifd = ifd
        self.topk = topk

    def _log_estimate(self, batch: dict[str, Any], seconds: float) -> None:
        """After the first batch: what is scored and what the rest will cost at that batch's rate (an estimate:
        the first batch also checks the output head; lengths vary)."""
        tokens = int(batch["attention_mask"].sum())
        rest = max(self.remaining_tokens - tokens, 0) / max(tokens / seconds, 1e-9)
        log.info("scoring %s: first batch %d samples, %d tokens in %.1f s (%.0f tokens/s) → about %.0f s for the "
                 "remaining %d tokens", describe_scorer(self.scorer), len(batch["index"]), tokens, seconds,
                 tokens / seconds, rest, self.remaining_tokens - tokens)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        if not len(batch["index"]):
            return []
        t0 = time.perf_counter()
        scored = self.scorer.score_batch(batch)
        if batch_idx == 0 and self.remaining_tokens:
            self._log_estimate(batch, time.perf_counter() - t0)
        stats, n_tok = scored.stats, scored.n_tokens
        losses = scored.losses.to(torch.float64).cpu()
        rows = [{"index": int(i), "sample_id": sid, "loss": float(loss), "ppl": float(ppl(loss)),
                 "n_tokens": int(n), "truncated": bool(tr)}
                for i, sid, loss, n, tr in zip(batch["index"], batch["sample_ids"], losses, n_tok,
                                               batch["truncated"], strict=True)]
        if self.ifd:  # through the same sliced head as scoring: the whole logits never exist
            loss_alone, _ = response_losses(self.model, batch["alone"], getattr(self.scorer, "head_loss", None))
            for row, la in zip(rows, loss_alone.to(torch.float64).cpu(), strict=True):
                row["loss_alone"] = float(la)
                row["ifd"] = float(np.exp(row["loss"] - float(la)))  # ppl(r|q) / ppl(r)
        signals = token_signals(scored.token_losses, batch["labels"].to(scored.token_losses.device), self.topk,
                                batch.get("answer_span"))
        columns = {name: values for name, values in signals.items()}
        columns.update({column(target, stat): values for target, by_stat in stats.items()
                        for stat, values in by_stat.items()})
        for name, values in columns.items():
            for row, v in zip(rows, values.to(torch.float64).cpu().tolist(), strict=True):
                row[name] = v
        if scored.sketch is not None:
            for row, sk in zip(rows, scored.sketch.to(torch.float32).cpu().numpy(), strict=True):
                row[SKETCH_COLUMN] = sk
        return rows


def shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"shard-{k:05d}.parquet"


def _sum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".sha256.json")


def _ids_hash(ids: Sequence[str]) -> str:
    return stable_hash(list(ids))


def shard_ids(samples: Sequence[TokenizedSample], k: int, shard_size: int) -> list[str]:
    """The sample ids shard k holds: samples k·shard_size … (k+1)·shard_size − 1."""
    return [s.sample_id for s in samples[k * shard_size:(k + 1) * shard_size]]


class ShardWriter(BasePredictionWriter):
    """Writes a shard's rows atomically as soon as the shard is complete, then its checksum.

    ``shard-k.parquet.sha256.json`` (sha256 of the file, its row count and the hash of the
    sample ids it covers) is written after the shard: a shard without a matching one is
    recomputed on resume.
    """

    def __init__(self, shard_dir: Path, shard_size: int, n_samples: int) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir, self.shard_size, self.n = shard_dir, shard_size, n_samples
        self.pending: dict[int, list[dict[str, Any]]] = {}

    def expected(self, k: int) -> int:
        return min(self.n, (k + 1) * self.shard_size) - k * self.shard_size

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        for row in prediction:
            k = row["index"] // self.shard_size
            rows = self.pending.setdefault(k, [])
            rows.append(row)
            if len(rows) == self.expected(k):
                write_shard(self.shard_dir, k, pd.DataFrame(sorted(rows, key=lambda r: r["index"])))
                del self.pending[k]


def write_shard(shard_dir: Path, k: int, frame: pd.DataFrame) -> None:
    """Shard k atomically, then its checksum (sha256 of the file, rows, hash of its sample ids)."""
    path = shard_path(shard_dir, k)
    write_parquet_atomic(path, frame)
    write_json_atomic(_sum_path(path), {"sha256": file_hash(path, length=64), "rows": len(frame),
                                        "ids": _ids_hash(frame["sample_id"].tolist())})


def stack_sketches(features: pd.DataFrame, dim: int, shard_dir: Path) -> np.ndarray:
    """Pop the merged shards' sketch column as an (N, dim) float32 matrix; every row must hold one."""
    column = features.pop(SKETCH_COLUMN) if SKETCH_COLUMN in features else pd.Series([None] * len(features))
    bad = [i for i, v in enumerate(column.to_numpy()) if v is None or np.size(v) != dim]
    if bad:
        raise ResoFilterError(
            f"{len(bad)} of {len(features)} merged rows in {shard_dir} hold no {dim}-value sketch (first: row "
            f"{bad[0]}); shards written without score.sketch cannot be resumed with it: delete {shard_dir}")
    return np.stack(column.to_numpy()).astype(np.float32)


def finished_shards(shard_dir: Path, samples: Sequence[TokenizedSample], shard_size: int) -> set[int]:
    """Shards whose file matches its checksum and covers exactly its samples; any other is removed.

    A truncated, emptied, edited or bit-flipped shard, one with rows missing or extra, or one
    whose checksum never got written (killed in between) is named in the log and recomputed.
    """
    good: set[int] = set()
    for path in sorted(shard_dir.glob("shard-*.parquet")):
        k = int(path.stem.split("-")[1])
        expected = shard_ids(samples, k, shard_size)
        why = None
        if not _sum_path(path).exists():
            why = "no checksum (killed while writing it)"
        else:
            recorded = read_json(_sum_path(path))
            if file_hash(path, length=64) != recorded.get("sha256"):
                why = "its bytes do not match the checksum"
            elif recorded.get("rows") != len(expected) or recorded.get("ids") != _ids_hash(expected):
                why = f"it covers other samples than shard {k} of these data"
        if why:
            log.warning("shard %s is invalid (%s): recomputing it", path.name, why)
            path.unlink()
            _sum_path(path).unlink(missing_ok=True)
        else:
            good.add(k)
    return good


def flat_items(description: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"score.step.lr": 1e-05, …}``: a nested description's leaves by dotted path (for messages)."""
    out: dict[str, Any] = {}
    for k, v in description.items():
        if isinstance(v, dict) and v:
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_or_claim(shard_dir: Path, key: str, description: dict[str, Any], shard_size: int) -> int:
    """Record the config key of this output dir, or fail if it holds another config's shards.

    Returns the shard size to use: the one the existing shards were written with (a changed
    ``score.shard_size`` resumes with the recorded one, so finished shards stay valid).
    """
    key_file = shard_dir / "key.json"
    if key_file.exists():
        old = read_json(key_file)
        if old["key"] != key:
            was, now = flat_items(old["description"]), flat_items(description)
            changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
            raise ResoFilterError(
                f"{shard_dir.parent} holds features of a different config (changed: {changed}); "
                "use a new output_dir or delete it")
        recorded = int(old.get("shard_size", shard_size))
        if recorded != shard_size:
            log.info("resuming with shard_size %d recorded in %s (score.shard_size is %d)", recorded, key_file,
                     shard_size)
        return recorded
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(key_file, {"key": key, "description": description, "shard_size": shard_size})
    return shard_size


def merge_shards(shard_dir: Path, samples: Sequence[TokenizedSample], shard_size: int) -> pd.DataFrame:
    n_shards = (len(samples) + shard_size - 1) // shard_size
    frames = []
    for k in range(n_shards):
        path = shard_path(shard_dir, k)
        if not path.exists():
            raise ResoFilterError(f"{path} is missing after scoring (a bug); rerun to recompute it")
        frame = pd.read_parquet(path)
        want = shard_ids(samples, k, shard_size)
        if frame["sample_id"].tolist() != want or frame["index"].tolist() != list(range(k * shard_size,
                                                                                         k * shard_size + len(want))):
            raise ResoFilterError(f"{path} does not hold exactly samples {k * shard_size}–"
                                  f"{k * shard_size + len(want) - 1}; delete that file and rerun to recompute it")
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    cols = [c for c in META_COLUMNS] + [c for c in df.columns if c not in META_COLUMNS and c != "index"]
    return df[cols].reset_index(drop=True)


@dataclass(frozen=True)
class ScoreSettings:
    """How the scoring pass runs (``score.*``): what it computes and in what pieces."""

    mode: str = "fast"  # fast (closed form) | literal (a real optimizer step per sample, the oracle)
    literal_dtype: torch.dtype = torch.float64
    statistics: tuple[str, ...] = ("mean_abs",)
    quantiles: tuple[float, ...] = ()
    count_above: tuple[float, ...] = ()
    # how the pass is cut up and shown: not in the features' identity (the same features either way)
    chunk_elements: int = runtime_field(1 << 21)
    quantile_hold_elements: int = runtime_field(1 << 25)  # |ΔW| held per group of samples for quantiles
    logits_chunk_elements: int = runtime_field(1 << 24)
    recompute_layers: bool = runtime_field(True)  # the scored layers' activations recomputed in the backward
    mmap_threshold: int | None = runtime_field(1 << 22)  # glibc: blocks ≥ this are returned when freed (memory.py)
    batch_size: int = runtime_field(16)
    max_tokens_per_batch: int | None = runtime_field(None)
    shard_size: int = runtime_field(256)
    progress_bar: bool = runtime_field(True)
    tokens: TokenSignalSpec = TokenSignalSpec()
    sketch: SketchSpec = SketchSpec()


@dataclass(frozen=True)
class FeaturesIdentity:
    """What determines a features file, in plain values, and its hash ``key``.

    The one identity: it names the cache directory (``resofilter run``), guards resume
    (``shards/key.json``) and recognises finished features (``manifest.json``).
    """

    description: dict[str, Any]

    @classmethod
    def of(cls, description: dict[str, Any], samples: Sequence[TokenizedSample],
           target_names: Sequence[str]) -> FeaturesIdentity:
        """The run's description + the exact samples (ids, tokens, labels) + the scored matrices."""
        return cls({**description, "samples": samples_hash(samples), "targets": list(target_names)})

    @property
    def key(self) -> str:
        return stable_hash(self.description)


def completed_features(out_dir: str | Path, identity: FeaturesIdentity) -> tuple[pd.DataFrame, dict] | None:
    """(features, manifest) when ``out_dir`` already holds the finished features of ``identity``.

    ``None`` when it holds none; an error when it holds another config's.
    """
    out_dir = Path(out_dir)
    final = out_dir / FEATURES_FILE
    if not (final.exists() and (out_dir / MANIFEST_FILE).exists()):
        return None
    manifest = read_json(out_dir / MANIFEST_FILE)
    key = identity.key
    if manifest.get("key") != key:
        raise ResoFilterError(f"{out_dir} holds features of a different config; use a new output_dir")
    log.info("features already complete in %s (key %s): reusing", out_dir, key)
    return pd.read_parquet(final), manifest


UpdateScorer = FastScorer | LiteralScorer
ExtractorBuilder = Callable[[torch.nn.Module, Sequence[Target], StepConfig, ScoreSettings], UpdateScorer]
EXTRACTORS: dict[str, ExtractorBuilder] = {}  # score.mode → builder; config_check validates score.mode against it


def register_extractor(name: str) -> Callable[[ExtractorBuilder], ExtractorBuilder]:
    """Register a per-sample update scorer for ``score.mode=<name>`` (a builder from the model, its
    targets, the scored step and the settings); it must give every sample's statistics of the one step."""

    def add(builder: ExtractorBuilder) -> ExtractorBuilder:
        register(EXTRACTORS, "extractor", name, builder)
        return builder

    return add


def _statistics_of(settings: ScoreSettings) -> dict[str, Any]:
    return dict(statistics=settings.statistics, quantiles=settings.quantiles, count_above=settings.count_above,
                sketch=settings.sketch)


@register_extractor("fast")
def fast_extractor(model: torch.nn.Module, targets: Sequence[Target], step: StepConfig,
                   settings: ScoreSettings) -> FastScorer:
    """The step in closed form from per-sample gradients, one batched pass (features/fast.py)."""
    set_mmap_threshold(settings.mmap_threshold)
    return FastScorer(model, targets, step, chunk_elements=settings.chunk_elements,
                      logits_chunk_elements=settings.logits_chunk_elements, recompute=settings.recompute_layers,
                      quantile_hold_elements=settings.quantile_hold_elements, **_statistics_of(settings))


@register_extractor("literal")
def literal_extractor(model: torch.nn.Module, targets: Sequence[Target], step: StepConfig,
                      settings: ScoreSettings) -> LiteralScorer:
    """The authors' loop: a real optimizer step per sample on a copy in ``literal_dtype`` (the oracle)."""
    return LiteralScorer(model, targets, step, dtype=settings.literal_dtype, **_statistics_of(settings))


def update_scorer(model: torch.nn.Module, targets: Sequence[Target], step: StepConfig,
                  settings: ScoreSettings) -> UpdateScorer:
    """The per-sample update scorer of ``settings.mode``, from the extractor registry."""
    if settings.mode not in EXTRACTORS:
        raise ResoFilterError(f"score.mode={settings.mode!r}: no such extractor; registered: {sorted(EXTRACTORS)}")
    return EXTRACTORS[settings.mode](model, targets, step, settings)


@dataclass(frozen=True)
class ScoredShards:
    """Every sample scored and merged from its shards (rank 0), not yet the stage's output: the
    features, their sketches and what the pass records; :func:`write_features` makes them final."""

    features: pd.DataFrame
    sketches: np.ndarray | None
    record: dict[str, Any]  # key, description, counts, timing, world size, token signals, sketch layout
    shard_dir: Path


def score_shards(
    model: torch.nn.Module,
    samples: Sequence[TokenizedSample],
    targets: Sequence[Target],
    step: StepConfig,
    settings: ScoreSettings,
    out_dir: str | Path,
    pad_token_id: int,
    identity: FeaturesIdentity,
    make_trainer: Callable[..., pl.Trainer] | None = None,
    alone: Sequence[TokenizedSample] | None = None,
    spans: dict[str, tuple[int, int]] | None = None,
) -> ScoredShards | None:
    """Score every sample into shards under ``out_dir`` and merge them; ``None`` on ranks other than 0.

    Finished features are the caller's to look for first (:func:`completed_features`, which
    needs no weights); this resumes from finished shards of the same ``identity``. Nothing final
    is written: a check that fails on the merged features (the precision check) leaves the shards
    for a rerun and neither ``features.parquet`` nor ``manifest.json``.
    """
    if not samples:
        raise ResoFilterError("no samples to score (empty data after tokenization)")
    if identity.description.get("targets") != [t.name for t in targets]:
        raise ResoFilterError(f"the identity names targets {identity.description.get('targets')}, the model has "
                              f"{[t.name for t in targets]} (a bug: build it with FeaturesIdentity.of)")
    shard_dir = Path(out_dir) / "shards"
    shard_size = check_or_claim(shard_dir, identity.key, identity.description, settings.shard_size)
    done = finished_shards(shard_dir, samples, shard_size)
    dm = FeatureDataModule(samples, pad_token_id, shard_size, settings.batch_size, settings.max_tokens_per_batch,
                           done, alone, spans)
    if done:
        log.info("resuming: %d of %d shards already done in %s", len(done), dm.n_shards(), shard_dir)
    scorer = update_scorer(model, targets, step, settings)
    remaining = sum(len(samples[i]) for k in range(dm.n_shards()) if k not in done for i in dm.shard_range(k))
    module = FeatureModule(model, scorer, ifd=alone is not None, topk=settings.tokens.topk,
                           remaining_tokens=remaining)
    writer = ShardWriter(shard_dir, shard_size, len(samples))
    make_trainer = make_trainer or functools.partial(pl.Trainer, accelerator="cpu", devices=1)
    # inference_mode=False: predict runs under no_grad, which the scorer lifts for its truncated backward
    shown = progress.trainer_progress(settings.progress_bar, "scoring")
    trainer = make_trainer(logger=False, enable_checkpointing=False, enable_model_summary=False, inference_mode=False,
                           use_distributed_sampler=False, callbacks=[writer, *shown["callbacks"]],
                           enable_progress_bar=shown["enable_progress_bar"])
    t0 = time.perf_counter()
    if len(done) < dm.n_shards():
        with warnings.catch_warnings():
            # batches are lists of indices we build ourselves; Lightning cannot (and need not) infer them
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            trainer.predict(module, datamodule=dm, return_predictions=False)
    elapsed = time.perf_counter() - t0
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    if writer.pending:
        raise ResoFilterError(f"incomplete shards {sorted(writer.pending)} after scoring (a bug)")
    features = merge_shards(shard_dir, samples, shard_size)
    sketches = None
    if scorer.projector is not None:
        sketches = stack_sketches(features, scorer.projector.dim, shard_dir)
    n_scored = len(samples) - sum(len(dm.shard_range(k)) for k in done)
    record = {
        "key": identity.key,
        "description": identity.description,
        "n_samples": len(samples),
        "n_shards": dm.n_shards(),
        "resumed_shards": len(done),
        "timing": {"score_s": elapsed, "samples_scored": n_scored, "samples_per_s": n_scored / max(elapsed, 1e-9)},
        "world_size": trainer.world_size,
        "tokens": settings.tokens.describe(),
    }
    if sketches is not None:
        record["sketch"] = sketch_layout(settings.sketch, scorer.projector)
    return ScoredShards(features, sketches, record, shard_dir)


def write_features(out_dir: str | Path, scored: ScoredShards, features: pd.DataFrame,
                   extra: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The stage's output: sketches, ``features.parquet`` and, last, ``manifest.json`` (the pass's record,
    ``extra`` and the environment); the shards are removed after."""
    out_dir = Path(out_dir)
    final = out_dir / FEATURES_FILE
    r = scored.record
    manifest = {**r, "columns": list(features.columns), **extra, **environment_info()}
    if scored.sketches is not None:
        write_npy_atomic(out_dir / SKETCH_FILE, scored.sketches)
        manifest["sketch"] = {**r["sketch"], "sha256": file_hash(out_dir / SKETCH_FILE, length=64)}
    write_parquet_atomic(final, features)
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)  # the last write: the stage is complete
    shutil.rmtree(scored.shard_dir)
    log.info("features: %d samples × %d columns in %.1f s → %s", len(features), features.shape[1],
             r["timing"]["score_s"], final)
    return features, manifest
