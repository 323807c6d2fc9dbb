"""The evaluate stage: a checkpoint + an eval set → predictions.jsonl + metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from resofilter import distributed
from resofilter._io import read_jsonl, write_json_atomic, write_jsonl_atomic
from resofilter.data.records import Record, get_field, load_records
from resofilter.data.templates import Template
from resofilter.errors import ConfigError, DataError, ResoFilterError
from resofilter.evaluation.extract import AnswerExtractor
from resofilter.evaluation.generate import accuracy_metrics, predict_records
from resofilter.stages import context

log = logging.getLogger(__name__)


def answer_extractor(node: Any, key: str) -> AnswerExtractor:
    """The eval set's answer extractor from its ``_target_`` config; anything else is a ConfigError."""
    if isinstance(node, str):  # the short names of before
        raise ConfigError(key, f"{node!r}: name the extractor class, e.g. {key}._target_="
                          f"resofilter.evaluation.extract.GSM8KExtractor (conf/eval/*.yaml show each)")
    try:
        extractor = instantiate(node)
    except Exception as e:  # noqa: BLE001 - hydra wraps import and argument errors alike
        raise ConfigError(key, f"cannot build the answer extractor: {e}") from None
    if not isinstance(extractor, AnswerExtractor):
        raise ConfigError(key, f"{type(extractor).__name__} lacks extract/gold/equal (the AnswerExtractor protocol)")
    return extractor


def load_eval_set(ev: DictConfig, path: str | Path) -> tuple[list[Record], list[str], Any]:
    """Eval records, their gold answers and the extractor for ``eval=`` config ``ev``."""
    extractor = answer_extractor(ev.extractor, "eval.extractor")
    records = load_records(path, ev.query_field, ev.answer_field, id_field=ev.get("id_field"),
                           max_samples=ev.get("max_samples"))
    golds = []
    for r in records:
        try:
            golds.append(extractor.gold(str(get_field(r.raw, ev.answer_field))))
        except ValueError as e:
            raise DataError(r.source, None, f"cannot read a gold answer: {e}") from None
    return records, golds, extractor


def few_shot_prefix(ev: DictConfig, template: Template, tokenizer: Any) -> str:
    if not ev.get("few_shot"):
        return ""
    if not ev.get("few_shot_path"):
        raise ResoFilterError("eval.few_shot > 0 needs eval.few_shot_path (solved examples)")
    shots = load_records(ev.few_shot_path, ev.query_field, ev.answer_field, max_samples=ev.few_shot)
    return "".join(template.render_prompt(s.query, s.input, tokenizer) + s.response + "\n\n" for s in shots)


def run_evaluation(model: Any, tokenizer: Any, ev: DictConfig, path: str | Path, template: Template,
                   out_dir: str | Path) -> dict[str, Any] | None:
    """Predictions and metrics of one eval set; under DDP each rank generates every world-th problem.

    Rank 0 merges the ranks' predictions (original order), writes ``predictions.jsonl`` and
    ``metrics.json`` and returns the metrics; the other ranks return ``None``.
    """
    out_dir = Path(out_dir)
    records, golds, extractor = load_eval_set(ev, path)
    rank, world = distributed.rank(), distributed.world_size()
    mine = list(range(rank, len(records), world))
    preds = predict_records(
        model, tokenizer, [records[i] for i in mine], [golds[i] for i in mine], template, extractor,
        batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, stop_strings=list(ev.get("stop_strings") or []),
        few_shot_prefix=few_shot_prefix(ev, template, tokenizer), min_new_tokens=ev.get("min_new_tokens", 0))
    if world > 1:
        part = out_dir / f".predictions.rank{rank}.jsonl"
        write_jsonl_atomic(part, preds)
        distributed.barrier()
        if rank != 0:
            distributed.barrier()  # rank 0 has merged
            return None
        parts = [read_jsonl(out_dir / f".predictions.rank{r}.jsonl") for r in range(world)]
        preds = [parts[i % world][i // world] for i in range(len(records))]  # record i came from rank i % world
    if sum(not p["generation"].strip() for p in preds) == len(preds):
        raise ResoFilterError(f"the model generated nothing for all {len(preds)} prompts; no metrics written")
    metrics = {"eval": ev.name, "path": str(path), "world_size": world, **accuracy_metrics(preds)}
    write_jsonl_atomic(out_dir / "predictions.jsonl", preds)
    write_json_atomic(out_dir / "metrics.json", metrics)
    if world > 1:
        for r in range(world):
            (out_dir / f".predictions.rank{r}.jsonl").unlink()
        distributed.barrier()
    return metrics


def run_evaluations(cfg: DictConfig, model: Any, tokenizer: Any, template: Template,
                    out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Evaluate on ``eval`` (into ``<out>/``) and on every ``evals`` entry (into ``<out>/<name>/``)."""
    out_dir = Path(out_dir)
    results = {}
    for i, (name, (ev, key)) in enumerate(context.eval_sets(cfg).items()):
        metrics = run_evaluation(model, tokenizer, ev, context.eval_path(cfg, key), template,
                                 out_dir if i == 0 else out_dir / name)
        if metrics is not None:  # rank 0
            results[name] = metrics
            log.info("%s: accuracy %.4f (n=%d)", name, metrics["accuracy"], metrics["n"])
    return results
