"""The evaluate stage: a checkpoint + an eval set → predictions.jsonl + metrics.json."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from resofilter import distributed
from resofilter._io import read_json, stable_hash, write_json_atomic, write_jsonl_atomic
from resofilter.data.records import Record, get_field, load_records
from resofilter.data.templates import Template, generation_stops, template_identity
from resofilter.errors import ConfigError, DataError, ResoFilterError
from resofilter.evaluation.extract import AnswerExtractor
from resofilter.evaluation.generate import accuracy_metrics, predict_records
from resofilter.evaluation.protocols import ProtocolSpec, build_prompts, draw_exemplars, stop_strings
from resofilter.progress import iterate

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


@dataclass(frozen=True)
class EvalSpec:
    """One eval set as the evaluate stage is asked it, built from its config in one place."""

    name: str
    path: str
    query_field: str
    answer_field: str
    extractor: dict[str, Any]  # the ``_target_`` of an AnswerExtractor
    id_field: str | None = None
    max_samples: int | None = None
    batch_size: int = 16
    save_every: int | None = 64
    max_new_tokens: int = 512
    min_new_tokens: int = 0
    stop_strings: tuple[str, ...] = ()
    protocol: ProtocolSpec = ProtocolSpec()
    prompt_overflow: str = "error"  # error | count_wrong
    key: str = "eval"  # the config node it came from (eval, evals.<name>), for messages


def load_eval_set(ev: EvalSpec) -> tuple[list[Record], list[str], Any]:
    """Eval records, their gold answers and the extractor of ``ev``."""
    extractor = answer_extractor(ev.extractor, "eval.extractor")
    records = load_records(ev.path, ev.query_field, ev.answer_field, id_field=ev.id_field, max_samples=ev.max_samples)
    golds = []
    for r in records:
        try:
            golds.append(extractor.gold(str(get_field(r.raw, ev.answer_field))))
        except ValueError as e:
            raise DataError(r.source, None, f"cannot read a gold answer: {e}") from None
    return records, golds, extractor


PARTIAL = ".predictions.rank{rank}.partial.jsonl"


def _read_partial(path: Path, key: str) -> list[dict[str, Any]]:
    """Predictions a (killed) earlier run appended; [] if the file is another run's or absent.

    Line 1 is ``{"key": …}`` (eval set, template, checkpoint); a torn last line is dropped.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        if not lines or json.loads(lines[0]).get("key") != key:
            log.warning("%s belongs to another evaluation: ignored", path)
            return []
    except json.JSONDecodeError:
        return []
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines):
                raise ResoFilterError(f"{path}:{i}: corrupt prediction line; delete the file to redo them") from None
    return rows


def check_context(model: Any, tokenizer: Any, prompts: list[str], ev: EvalSpec, add_special_tokens: bool) -> set[int]:
    """Prompts that fill the model's positions: an error before generating, or (``prompt_overflow:
    count_wrong``) the indices to score wrong without generating; warns when ``max_new_tokens`` may
    run past the positions.

    An over-long input does not fail in ``generate``: positions past the trained ones give
    garbage (or an index error with learned position embeddings), silently scored as wrong.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit or not prompts:
        return set()
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
    full = {i for i, n in enumerate(lengths) if n + max(ev.min_new_tokens, 1) > limit}
    if full:
        worst = max(full, key=lengths.__getitem__)
        what = (f"eval set {ev.name!r}: {len(full)} of {len(prompts)} prompts leave no room to generate within the "
                f"model's {limit} positions (longest {lengths[worst]} tokens, problem {worst})")
        if ev.prompt_overflow == "error":
            shots = f"lower {ev.key}.few_shot, " if ev.protocol.name == "few_shot_cot" else ""
            raise ConfigError(f"{ev.key}.prompt_overflow", f"{what}; {shots}set {ev.key}.prompt_overflow=count_wrong "
                              "to score them wrong without generating, or evaluate a model with a longer context")
        log.warning("%s: scored wrong without generating (%s.prompt_overflow=count_wrong)", what, ev.key)
    over = [i for i, n in enumerate(lengths) if i not in full and n + ev.max_new_tokens > limit]
    if over:
        log.warning("%s: %d of %d prompts + max_new_tokens=%d exceed the model's %d positions (longest prompt "
                    "%d tokens): a generation that long runs past the trained positions", ev.name, len(over),
                    len(prompts), ev.max_new_tokens, limit, max(lengths[i] for i in over))
    return full


def run_evaluation(model: Any, tokenizer: Any, ev: EvalSpec, template: Template,
                   out_dir: str | Path, model_id: str = "") -> dict[str, Any] | None:
    """Predictions and metrics of one eval set; under DDP each rank generates every world-th problem.

    Predictions are appended to a per-rank partial file every ``eval.save_every`` problems
    (flushed and synced), so a killed run loses at most that many: a rerun with the same eval
    set, template and checkpoint (``model_id``) skips what is done. Rank 0 then merges every
    rank's predictions (original order), writes ``predictions.jsonl`` and, last,
    ``metrics.json``, and returns the metrics; the other ranks return ``None``.
    """
    out_dir = Path(out_dir)
    rank, world = distributed.rank(), distributed.world_size()
    identity = {k: v for k, v in asdict(ev).items() if k != "key"}  # the config node's name is for messages only
    key = stable_hash([identity, template_identity(template, tokenizer), generation_stops(template), model_id])
    finished = _finished(out_dir, key)
    if finished is not None:  # before reading the eval set: nothing of it is needed
        log.info("%s: already evaluated in %s, reusing it", ev.name, out_dir)
        return finished if rank == 0 else None
    out_dir.mkdir(parents=True, exist_ok=True)
    records, golds, extractor = load_eval_set(ev)
    earlier = {f: _read_partial(f, key) for f in sorted(out_dir.glob(PARTIAL.format(rank="*")))}  # each read once
    done = {p["sample_id"]: p for rows in earlier.values() for p in rows}
    mine = [i for i in range(rank, len(records), world) if records[i].sample_id not in done]
    if done:
        log.info("%s: %d predictions already done, %d to go on rank %d", ev.name, len(done), len(mine), rank)
    own = out_dir / PARTIAL.format(rank=rank)
    kept = earlier.get(own, [])
    spec = ev.protocol
    exemplars = (draw_exemplars(spec, ev.query_field, ev.answer_field, extractor, {r.query for r in records})
                 if spec.name == "few_shot_cot" else [])
    prompts = build_prompts(spec, records, template, tokenizer, exemplars)
    overflow = check_context(model, tokenizer, prompts, ev, template.add_special_tokens)
    step = int(ev.save_every or len(records) or 1)
    with open(own, "w", encoding="utf-8") as f:  # rewritten: header, then what this rank already had
        f.write(json.dumps({"key": key}) + "\n")
        for p in kept:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
        # one progress over the eval set, by chunks (each saved as it finishes) when there are several
        n_chunks = -(-len(mine) // step)
        for start in iterate(range(0, len(mine), step), n_chunks, f"generation ({ev.name}, {step} problems a chunk)",
                             "chunks", enabled=n_chunks > 1):
            chunk = mine[start:start + step]
            for p in predict_records(
                    model, tokenizer, [records[i] for i in chunk], [golds[i] for i in chunk], template, extractor,
                    batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                    stop_strings=stop_strings(spec, ev.stop_strings, template), progress=n_chunks == 1,
                    min_new_tokens=ev.min_new_tokens, prompts=[prompts[i] for i in chunk],
                    overflow={j for j, i in enumerate(chunk) if i in overflow}):
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    distributed.barrier()
    if rank != 0:
        distributed.barrier()  # rank 0 has merged
        return None
    by_id = {p["sample_id"]: p for f in sorted(out_dir.glob(PARTIAL.format(rank="*"))) for p in _read_partial(f, key)}
    missing = [r.sample_id for r in records if r.sample_id not in by_id]
    if missing:
        raise ResoFilterError(f"{len(missing)} predictions missing after generation (e.g. {missing[:3]}); a bug")
    preds = [by_id[r.sample_id] for r in records]
    generated = [p for p in preds if not p.get("prompt_overflow")]
    if not generated:
        raise ResoFilterError(f"{ev.name}: every one of the {len(preds)} prompts overflows the model's positions; "
                              "no metrics written")
    if all(not p["generation"].strip() for p in generated):
        raise ResoFilterError(f"the model generated nothing for all {len(generated)} prompts; no metrics written")
    metrics = {"eval": ev.name, "protocol": spec.name, "few_shot": spec.k, "path": ev.path, "world_size": world,
               "resumed": len(done), "n_prompt_overflow": sum(bool(p.get("prompt_overflow")) for p in preds),
               **accuracy_metrics(preds), "key": key}
    write_jsonl_atomic(out_dir / "predictions.jsonl", preds)
    write_json_atomic(out_dir / "metrics.json", metrics)  # the last write: this eval set is complete
    for f in out_dir.glob(PARTIAL.format(rank="*")):
        f.unlink()
    distributed.barrier()
    return metrics


def _finished(out_dir: Path, key: str) -> dict[str, Any] | None:
    """The metrics of a complete evaluation of ``key`` in ``out_dir`` (``metrics.json`` is its last write)."""
    metrics = out_dir / "metrics.json"
    if not (metrics.exists() and (out_dir / "predictions.jsonl").exists()):
        return None
    done = read_json(metrics)
    return done if done.get("key") == key else None


def run_evaluations(specs: Sequence[EvalSpec], model: Any, tokenizer: Any, template: Template,
                    out_dir: str | Path, model_id: str = "", shared: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate on each eval set: the first (``eval``) into ``<out>/``, every other (``evals``) into
    ``<out>/<name>/``; metrics by set name (rank 0; other ranks get ``{}``). ``shared``: ``out_dir`` is in the
    cache, where another run may be writing it: wait for it (then find the work done) instead of refusing."""
    out_dir = Path(out_dir)
    results = {}
    with distributed.rank_zero_lock(out_dir, "evaluate", wait=shared):
        for i, ev in enumerate(specs):
            metrics = run_evaluation(model, tokenizer, ev, template, out_dir if i == 0 else out_dir / ev.name, model_id)
            if metrics is not None:  # rank 0
                results[ev.name] = metrics
                log.info("%s: accuracy %.4f (n=%d)", ev.name, metrics["accuracy"], metrics["n"])
    return results
