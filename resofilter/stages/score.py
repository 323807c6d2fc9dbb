"""The score stage from a composed config: load, tokenize, extract, precision-check."""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from resofilter import distributed
from resofilter._io import model_fingerprint, output_lock, remove_orphans, stable_hash
from resofilter.data.records import Record, record_hashes
from resofilter.data.templates import Template
from resofilter.data.tokenize import IGNORE_INDEX, TokenizedSample, TokenizeSpec, TokenizeStats, tokenize_records
from resofilter.errors import ResoFilterError
from resofilter.features.closed_form import StepConfig
from resofilter.features.extract import (
    META_COLUMNS,
    FeaturesIdentity,
    ScoreSettings,
    completed_features,
    score_shards,
    write_features,
)
from resofilter.features.fast import FastScorer, split_devices
from resofilter.features.statistics import BASIC
from resofilter.features.targets import Target, decoder_layers, find_targets
from resofilter.features.tokens import NO_SPAN, answer_spans
from resofilter.identity import identity_of, runtime_field
from resofilter.models.loading import load_causal_lm, load_tokenizer, model_skeleton
from resofilter.selection.scorers import layer_columns
from resofilter.stages.config_check import check_depth

log = logging.getLogger(__name__)


def response_alone(samples: list[TokenizedSample], tokenizer: Any) -> list[TokenizedSample]:
    """The same responses without their prompts (BOS + response), for IFD's ppl(response)."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for s in samples:
        resp = [t for t in s.labels if t != IGNORE_INDEX]
        out.append(TokenizedSample(s.sample_id, prefix + resp, [IGNORE_INDEX] * len(prefix) + resp, s.truncated))
    return out


@dataclass(frozen=True)
class PrecisionCheckSpec:
    """The float64 re-scoring of random samples and the bounds that fail the stage."""

    n_samples: int  # 0: no check
    min_spearman: float
    max_error_over_std: float
    seed: int  # picks the samples
    statistic: str  # the selected statistic (quantiles/counts are checked through mean_abs)
    layer_modules: tuple[str, ...]
    layer_indices: Any



@dataclass(frozen=True)
class ScoreSpec:
    """What the score stage is asked, built from the config in one place (:func:`~resofilter.stages.specs.score_spec`).

    Its identity fields (all but the ``runtime_field`` ones) and the model's content fingerprint are the
    features' identity (:func:`describe`): a field added here is in the cache key unless declared runtime.
    """

    settings: ScoreSettings
    dtype: torch.dtype  # the model is loaded and scored in it (the precision policy)
    step: StepConfig
    candidate_modules: tuple[str, ...]
    candidate_indices: Any
    ifd: bool
    attn_implementation: str | None
    tokenize: TokenizeSpec
    # checks and bookkeeping, not inputs of the features
    declared_depth: int | None = runtime_field()  # model.num_hidden_layers, if the config states it
    check: PrecisionCheckSpec = runtime_field()  # fails the stage or passes it; never changes a value
    trainer: dict[str, Any] = runtime_field()  # a pytorch_lightning.Trainer config: devices and ranks, not values
    cache_dir: str | None = runtime_field()  # where the model's fingerprint is remembered
    device_map: Any = runtime_field()  # the model's layers over several devices (placement, not values)
    config: dict[str, Any] = runtime_field()  # the resolved config, recorded in the manifest


@dataclass(frozen=True)
class ScoringInput:
    """The tokenized samples of a score stage and the identity of the features they give."""

    tokenizer: Any
    samples: list[TokenizedSample]
    stats: TokenizeStats
    identity: FeaturesIdentity
    spans: dict[str, tuple[int, int]] | None = None  # answer spans (data.answer_pattern), response-token positions


def prepare_scoring(spec: ScoreSpec, records: list[Record], template: Template, model_dir: str) -> ScoringInput:
    """Tokenize and compute the features' identity from the model's structure and content fingerprint
    (no weights loaded).

    What determines the features: the model's weights, the spec's identity fields, the exact samples
    (ids, tokens, labels: data, template and tokenization) and the scored matrices by name.
    """
    tok = load_tokenizer(model_dir)
    t = spec.tokenize
    samples, stats = tokenize_records(records, template, tok, t.max_length, t.prompt_overflow, t.append_eos)
    targets = find_targets(model_skeleton(model_dir), list(spec.candidate_modules), spec.candidate_indices)
    names = [t.name for t in targets]
    pattern = spec.settings.tokens.answer_pattern
    spans = answer_spans(records, samples, template, tok, pattern) if pattern else None
    if spans is not None:
        found = sum(span != NO_SPAN for span in spans.values())
        log.info("answer span %r found in %d of %d responses", pattern, found, len(samples))
    return ScoringInput(tok, samples, stats, FeaturesIdentity.of(describe(spec, model_dir), samples, names), spans)


def trainer_factory(trainer: dict[str, Any]) -> Callable[..., pl.Trainer]:
    """``trainer=`` config → a Trainer with the scoring loop's own arguments added."""
    return functools.partial(instantiate, trainer)


def describe(spec: ScoreSpec, model_dir: str) -> dict[str, Any]:
    """What determines the features (the resume / cache key), in plain values: the model's content, not
    its path (a checkpoint overwritten at the same path is another model; the same weights elsewhere are
    the same one), and every identity field of the spec."""
    return {"model_weights": model_fingerprint(model_dir, spec.cache_dir), "score": identity_of(spec)}


def records_summary(records: list[Record], samples: list[TokenizedSample], hashes: dict[str, str]) -> dict[str, Any]:
    """The records a features file covers: their count and hash, and those tokenization skipped."""
    scored = {s.sample_id for s in samples}
    return {"n": len(records), "hash": stable_hash(sorted(hashes.items())), "n_scored": len(samples),
            "skipped_ids": [r.sample_id for r in records if r.sample_id not in scored]}


def structure_of(model: torch.nn.Module, targets: list[Target], dtype: torch.dtype) -> dict[str, Any]:
    """What the features know about the model they came from, recorded in the manifest."""
    prefix, layers = decoder_layers(model)
    return {"num_hidden_layers": len(layers), "layers_prefix": prefix,
            "targets": [{"name": t.name, "layer": t.layer, "shape": list(t.module.weight.shape)} for t in targets],
            "dtype": str(dtype).removeprefix("torch."), "model_type": getattr(model.config, "model_type", None)}


def score_records(spec: ScoreSpec, records: list[Record], template: Template, model_dir: str,
                  out_dir: Path, data_info: dict[str, Any] | None = None,
                  prepared: ScoringInput | None = None,
                  wait_for_lock: bool = False) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """Write ``features.parquet`` + ``manifest.json`` for ``records`` into ``out_dir``.

    Returns (features, manifest) on rank 0 and ``None`` on the other ranks. Finished
    features of the same identity are reused without loading weights. The manifest is the
    last write and holds everything (config, tokenization, structure, records, precision
    check): a directory without it is unfinished. Rank 0 holds ``out_dir``'s lock for the
    stage (another process: an error naming it, or with ``wait_for_lock`` a wait) and first
    removes the temporaries a killed run left.
    """
    prepared = prepared or prepare_scoring(spec, records, template, model_dir)
    if not distributed.is_rank_zero():  # rank 0 holds the directory for every rank
        return _score(spec, records, model_dir, out_dir, data_info, prepared)
    with output_lock(out_dir, "score", wait=wait_for_lock):
        if removed := remove_orphans(out_dir, (".*.tmp", "shards/.*.tmp")):
            log.info("removed %d temporaries of an interrupted run in %s", len(removed), out_dir)
        return _score(spec, records, model_dir, out_dir, data_info, prepared)


def _score(spec: ScoreSpec, records: list[Record], model_dir: str, out_dir: Path, data_info: dict[str, Any] | None,
           prepared: ScoringInput) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    dtype = spec.dtype
    tok, samples, tstats, identity = prepared.tokenizer, prepared.samples, prepared.stats, prepared.identity
    if samples and (done := completed_features(out_dir, identity)):
        return done
    placed = {"device_map": spec.device_map} if spec.device_map is not None else {}
    model = load_causal_lm(model_dir, dtype, spec.attn_implementation, **placed)
    if placed:
        log.info("model placed over %s (score.device_map=%s)", sorted(split_devices(model)), spec.device_map)
    check_finite(model, model_dir)  # before anything is written
    model.eval()
    n_layers = len(decoder_layers(model)[1])
    check_depth(spec.declared_depth, n_layers, f"{model_dir} has {n_layers} decoder layers")
    targets = find_targets(model, list(spec.candidate_modules), spec.candidate_indices)
    step = spec.step
    log.info("scoring %d samples (%s mode, %s) over %d matrices: %s … %s", len(samples), spec.settings.mode,
             model.dtype, len(targets), targets[0].name, targets[-1].name)
    alone = response_alone(samples, tok) if spec.ifd else None
    hashes = record_hashes(records)

    scored = score_shards(model, samples, targets, step, spec.settings, out_dir, tok.pad_token_id, identity,
                          trainer_factory(spec.trainer), alone, prepared.spans)
    if scored is None:  # not rank 0
        return None
    features = scored.features.copy()
    features.insert(len(META_COLUMNS), "record_hash", [hashes[s] for s in features["sample_id"]])
    extra: dict[str, Any] = {
        "model": model_dir,  # where the weights were read (their content is in the key)
        "structure": structure_of(model, targets, dtype),
        "records": records_summary(records, samples, hashes),
        "data": data_info, "tokenized": tstats.as_dict(),
        "config": spec.config,
    }
    warn_unlearned(features, model, model_dir)
    if spec.check.n_samples:  # raises before anything final is written: the shards stay for a rerun
        # a model split over devices is not copied: its float64 reference is read afresh, on the CPU
        reference = load_causal_lm(model_dir, torch.float64, spec.attn_implementation) if placed else None
        extra["precision_check"] = report = precision_check(
            model, samples, targets, step, features, spec.check, tok.pad_token_id, reference)
        enforce_precision(report, spec.check)
    return write_features(out_dir, scored, features, extra)


def warn_unlearned(features: pd.DataFrame, model: torch.nn.Module, model_dir: str) -> float:
    """Warn when the model's mean loss on the data exceeds ln(vocabulary): worse than a uniform guess,
    it has not learned this kind of text and its scores say little about the samples."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    mean_loss = float(features["loss"].mean())
    if vocab > 1 and mean_loss > math.log(vocab):
        log.warning("mean loss %.2f nats/token on these data is above ln(vocabulary %d) = %.2f, a uniform guess: "
                    "%s has not learned this kind of text, so its per-sample scores mostly measure that. Score "
                    "with a model trained on similar data (model.name_or_path)", mean_loss, vocab, math.log(vocab),
                    model_dir)
    return mean_loss


def check_finite(model: torch.nn.Module, where: str) -> None:
    """A NaN/Inf weight is a named error: every score and fine-tune from it would be garbage."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ResoFilterError(f"{where}: parameter {name} has {bad} non-finite value(s) (NaN/Inf); "
                                  "the model is broken, nothing was scored")


def enforce_precision(report: dict[str, Any], bounds: PrecisionCheckSpec) -> None:
    """Fail the stage when the float64 check says the stored ranking is not the signal."""
    rho, ratio = report["spearman_vs_float64"], report["max_error_over_std"]
    ok = rho == rho and rho >= bounds.min_spearman and ratio <= bounds.max_error_over_std  # rho == rho: not NaN
    if not ok:
        raise ResoFilterError(
            f"precision check failed: Spearman vs float64 {rho:.4f} (bound ≥ {bounds.min_spearman}), worst error "
            f"{ratio:.3g} × the across-sample std (bound ≤ {bounds.max_error_over_std}) on {report['n_samples']} "
            "samples; no features written. Score in float32/float64 (score.dtype), or loosen "
            "score.precision_check.min_spearman / max_error_over_std")
    report["passed"] = True


def precision_check(model: torch.nn.Module, samples: list[TokenizedSample], targets: list[Target],
                    step: StepConfig, features: pd.DataFrame, check: PrecisionCheckSpec,
                    pad_token_id: int, reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """Re-score a random subset in float64 and compare the layer-set score with the stored one.
    ``reference``: the model in float64 (default: a float64 copy of ``model``).

    Reports Spearman rank agreement and the worst error as a fraction of the across-sample
    std: a ranking is signal where that fraction is ≪ 1, rounding where it is not.
    """
    from scipy.stats import spearmanr

    from resofilter.data.tokenize import Collator

    rng = random.Random(check.seed)
    idx = sorted(rng.sample(range(len(samples)), min(check.n_samples, len(samples))))
    m64 = _float64_copy(model) if reference is None else reference.eval()
    modules64 = dict(m64.named_modules())
    t64 = [Target(t.name, t.layer, modules64[t.name]) for t in targets]  # the same matrices, in float64
    stat = check.statistic if check.statistic in BASIC else "mean_abs"  # quantiles/counts: check mean_abs
    cols = layer_columns(features, list(check.layer_modules), check.layer_indices, stat, len(decoder_layers(model)[1]))
    chosen = [c.rsplit("/", 1)[0] for c in cols]
    scorer = FastScorer(m64, [t for t in t64 if t.name in chosen], step, [stat])
    collate = Collator(pad_token_id)
    ref = []
    for i in idx:  # one at a time: float64 models can overflow on padding (gemma-2)
        stats, _, _ = scorer(collate([samples[i]]))
        ref.append(np.mean([stats[t][stat].item() for t in chosen]))
    ref = np.array(ref)
    got = features.iloc[idx][cols].to_numpy().mean(axis=1)
    spread = float(np.std(ref))
    err = float(np.max(np.abs(got - ref)))
    rho = float(spearmanr(got, ref).statistic) if len(idx) > 2 else float("nan")
    report = {"n_samples": len(idx), "statistic": stat, "targets": chosen, "spearman_vs_float64": rho,
              "max_abs_error": err, "across_sample_std": spread,
              "max_error_over_std": err / spread if spread > 0 else float("inf"),
              "dtype": str(targets[0].module.weight.dtype).removeprefix("torch.")}
    log.info("precision check (%d samples, float64 reference): Spearman %.5f, max error = %.3g × std",
             len(idx), rho, report["max_error_over_std"])
    return report


def _float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    m = copy.deepcopy(model).to(torch.float64)
    m.eval()
    return m
