"""``resofilter run``: score → select → finetune → evaluate in one run directory.

Features are cached under ``<cache_dir>/features/<key>``, the key the features' identity
(:class:`~resofilter.features.extract.FeaturesIdentity`: the model's content fingerprint, the
score spec's identity fields, the exact tokenized samples, the scored matrices), so every sweep member that
shares them reuses one scoring pass; ``results.json`` records whether it did
(``stages.score.cached``).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from resofilter import distributed
from resofilter._io import model_fingerprint, read_json, stable_hash, write_json_atomic
from resofilter.data.records import Record
from resofilter.data.templates import Template
from resofilter.environment import environment
from resofilter.errors import ResoFilterError
from resofilter.reporting.results import RunResult, canonical_setting
from resofilter.reporting.wandb_log import is_wandb, log_run_summary
from resofilter.stages.evaluate import EvalSpec, run_evaluations
from resofilter.stages.finetune import FinetuneSpec, checkpoint_id, load_checkpoint, run_finetune
from resofilter.stages.score import ScoreSpec, prepare_scoring, score_records
from resofilter.stages.select import SelectSpec, run_selection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """What ``resofilter run`` is asked: the four stages' specs and what ``results.json`` records about the
    setting, built from the config once (:func:`~resofilter.stages.specs.run_spec`)."""

    score: ScoreSpec
    select: SelectSpec
    finetune: FinetuneSpec
    evals: tuple[EvalSpec, ...]  # the main eval set first
    variant: str
    seed: int
    build: int | None  # the embedded base model's build (None: a model from a path)
    setting: dict[str, Any]  # the flattened resolved config minus replicates and locations: a table row's key
    choices: dict[str, Any]  # scorer, keep ratio, budget, direction, layers, statistic, step: results.json's columns
    until: str | None  # run.until: stop after this stage
    keep_checkpoint: bool
    evaluate_base: bool  # also evaluate the model before fine-tuning (cached per model and eval sets)
    accelerator: str
    scores_reference: bool  # scorer=target without a scored reference: the run scores it
    expected_band: tuple[float, float] | None  # README command 1 only: the accuracy band it claims
    logger: dict[str, Any]
    config: dict[str, Any]  # the resolved config (resolved_config.json)
    hydra_choices: dict[str, Any] | None  # the config group options, under Hydra


@dataclass(frozen=True)
class RunInputs:
    """What the run reads, resolved by the command layer when the run first needs it: building the
    embedded base model takes minutes, and a finished run needs none of it."""

    model_dir: Callable[[], str]  # the scoring model (built on first use)
    train_model_dir: Callable[[], str]  # the model fine-tuned: train_model, else the scoring model
    load: Callable[..., tuple[list[Record], dict[str, Any]]]  # (path=None) → the data's records, or path's read alike
    template: Template
    train_template: Template
    reference_path: Callable[[], Path]  # the target scorer's reference records


def run_pipeline(spec: RunSpec, inputs: RunInputs, out: Path) -> dict[str, Any]:
    """The four stages into ``out``; a rerun of a killed run picks up where it stopped.

    Complete when ``results.json`` (the last write) exists: a rerun of the same setting returns
    it, another setting in the directory is an error. Otherwise cached features are reused,
    selection is redone (seconds), a finished fine-tuning is reused or a killed one resumed
    from its last training state, and evaluation skips the problems already generated.
    Under DDP every rank walks every stage: scoring is sharded over ranks, selection runs on
    rank 0 while the others wait, fine-tuning is DDP, evaluation is sharded, rank 0 reports.
    """
    done = _finished_run(out, spec.setting, spec.seed, spec.build)
    if done is not None:
        log.info("run already complete in %s: %s", out, out / "results.json")
        return done if distributed.is_rank_zero() else {}
    t_start = time.perf_counter()
    stages: dict[str, Any] = {}
    model_dir = inputs.model_dir()  # scores the pool (the embedded one is built on first use)
    records, data_info = inputs.load()

    feat_dir, stages["score"] = score_pool(spec.score, records, inputs.template, model_dir, data_info)
    if _stops_after(spec, "score", stages):
        return stages

    select_spec = with_reference(spec, inputs, model_dir, stages)
    sel = select_pool(select_spec, feat_dir, records, out / "select", stages)
    if _stops_after(spec, "select", stages):
        return stages

    # what is fine-tuned and evaluated: the scoring model, or train_model (selection hands over records,
    # so the trained model tokenizes them with its own tokenizer and template)
    train_dir = inputs.train_model_dir()
    if spec.evaluate_base:
        evaluate_base(spec, inputs.train_template, train_dir, stages)
    ft = finetune_subset(spec, inputs, train_dir, model_dir, out, stages)
    if _stops_after(spec, "finetune", stages):
        return stages

    evals = evaluate_checkpoint(spec, ft, inputs.train_template, out, stages)
    if not distributed.is_rank_zero():
        return {}
    results = run_results(spec, stages, evals, model_dir, train_dir, data_info, time.perf_counter() - t_start)
    results = write_results(spec, out, results, ft)
    main = spec.evals[0].name
    verdict, inside = against_expected(spec.expected_band, evals[main]["accuracy"])
    build = "" if spec.build is None else f" build {spec.build}"
    log.log(logging.INFO if inside is not False else logging.WARNING,
            "%s keep %.2f seed %d%s: %s accuracy %.4f (%d/%d kept) in %.0f s%s", spec.variant,
            spec.select.keep_ratio, spec.seed, build, main, evals[main]["accuracy"], sel["n_out"],
            sel["n_in"], results.total_time_s, verdict)
    return results.as_dict()


def select_pool(spec: SelectSpec, feat_dir: Path, records: list[Any], out_dir: Path,
                stages: dict[str, Any]) -> dict[str, Any]:
    """Selection on rank 0 (the others wait for the subset); its summary into ``stages["select"]``."""
    sel: dict[str, Any] = {}
    if distributed.is_rank_zero():
        t0 = time.perf_counter()
        sel = run_selection(spec, feat_dir, records, out_dir)
        stages["select"] = {
            "n_in": sel["n_in"], "n_out": sel["n_out"], "dedup_removed": sel["dedup_removed"],
            "time_s": time.perf_counter() - t0, "confounds": sel.get("confounds"),
            **({"noise_auroc": sel["diagnostics"]["auroc"],
                "noise_rate_kept": sel["diagnostics"]["noise_rate_kept"]} if "diagnostics" in sel else {})}
    distributed.barrier()  # the subset exists
    return sel


def finetune_subset(spec: RunSpec, inputs: RunInputs, train_dir: str, scored_by: str, out: Path,
                    stages: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune ``train_dir`` on the selected subset; its summary into ``stages["finetune"]``."""
    t0 = time.perf_counter()
    subset, _ = inputs.load(out / "select" / "subset.jsonl")
    ft = run_finetune(spec.finetune, train_dir, subset, inputs.train_template, out / "finetune", scored_by=scored_by)
    stages["finetune"] = {"steps": ft["steps"], "n_records": ft["n_records"], "time_s": time.perf_counter() - t0,
                          "resumed_from_step": ft.get("resumed_from_step"),
                          "train_loss": ft.get("final_metrics", {}).get("train/loss"),
                          "tokens_per_s": ft.get("tokens_per_s"), "world_size": distributed.world_size()}
    return ft


def evaluate_base(spec: RunSpec, train_template: Template, train_dir: str, stages: dict[str, Any]) -> dict[str, Any]:
    """The model fine-tuning starts from, on the same eval sets with the same protocol: what fine-tuning adds.

    Cached under ``<cache>/base_eval/<key>``, the key the model's content, the eval sets and the template, so
    every run of a sweep shares one evaluation (a second process waits for the first); the main set's
    accuracy into ``stages["base_eval"]``.
    """
    t0 = time.perf_counter()
    if spec.score.cache_dir is None:
        raise ResoFilterError("paths.cache_dir is not set: run.evaluate_base caches the base model's evaluation there")
    model_id = model_fingerprint(train_dir, spec.score.cache_dir)
    key = stable_hash({"model": model_id, "template": spec.finetune.template,
                       "evals": [{k: v for k, v in asdict(ev).items() if k != "key"} for ev in spec.evals]})
    out = Path(spec.score.cache_dir) / "base_eval" / key
    cached = (out / "metrics.json").exists()
    model, tok = load_checkpoint(train_dir, spec.finetune.model_dtype, spec.finetune.attn_implementation)
    model.to(distributed.local_device(spec.accelerator))
    evals = run_evaluations(spec.evals, model, tok, train_template, out, model_id, shared=True)
    del model
    if not distributed.is_rank_zero():
        return evals
    main = spec.evals[0].name
    stages["base_eval"] = {**{k: evals[main][k] for k in ("accuracy", "n", "n_correct", "ci95_low", "ci95_high")},
                           "dir": str(out), "cached": cached, "time_s": time.perf_counter() - t0,
                           **({"more": {k: v["accuracy"] for k, v in evals.items() if k != main}}
                              if len(evals) > 1 else {})}
    log.info("base model (before fine-tuning): %s accuracy %.4f (%d/%d)%s", main, evals[main]["accuracy"],
             evals[main]["n_correct"], evals[main]["n"], " (cached)" if cached else "")
    return evals


def evaluate_checkpoint(spec: RunSpec, ft: dict[str, Any], train_template: Template, out: Path,
                        stages: dict[str, Any]) -> dict[str, Any]:
    """Every eval set on the fine-tuned checkpoint (sharded over ranks); the main one into ``stages``.
    The checkpoint is deleted afterwards unless ``run.keep_checkpoint``."""
    t0 = time.perf_counter()
    model, tok = load_checkpoint(ft["checkpoint"], spec.finetune.model_dtype, spec.finetune.attn_implementation)
    model.to(distributed.local_device(spec.accelerator))
    evals = run_evaluations(spec.evals, model, tok, train_template, out / "eval", checkpoint_id(ft["checkpoint"]))
    if not distributed.is_rank_zero():
        return evals
    main = spec.evals[0].name
    stages["evaluate"] = {**evals[main], "time_s": time.perf_counter() - t0}
    if len(evals) > 1:
        stages["evaluate"]["more"] = {k: v for k, v in evals.items() if k != main}
    if not spec.keep_checkpoint:
        shutil.rmtree(ft["checkpoint"])
    return evals


def run_results(spec: RunSpec, stages: dict[str, Any], evals: dict[str, Any], model_dir: str, train_dir: str,
                data_info: dict[str, Any], total_time_s: float) -> RunResult:
    """``results.json``: what the run was (setting, choices, build, seed, environment) and what it gave."""
    return RunResult(
        variant=spec.variant, **spec.choices, seed=spec.seed, build=spec.build, model=model_dir,
        train_model=train_dir, data=data_info, eval={k: v["accuracy"] for k, v in evals.items()},
        eval_protocols={k: f"{v['protocol']}" + (f" ({v['few_shot']}-shot)" if v.get("few_shot") else "")
                        for k, v in evals.items()},
        stages=stages, total_time_s=total_time_s,
        base_model=_base_accuracy(train_dir),  # the build accuracy of the model fine-tuned
        setting=spec.setting, choices=spec.hydra_choices,
        environment=environment(),  # package versions, torch's CPU code path and threads: `table` compares them
        weights={role: model_fingerprint(d, spec.score.cache_dir) for role, d in (("model", model_dir),
                                                                                  ("train_model", train_dir))},
    )


def write_results(spec: RunSpec, out: Path, results: RunResult, ft: dict[str, Any]) -> RunResult:
    """The resolved config, the W&B summary (if logging there), then ``results.json``: the last write."""
    write_json_atomic(out / "resolved_config.json", spec.config)
    if is_wandb(spec.logger):
        diag_file = out / "select" / "diagnostics.json"
        results = replace(results, wandb_dir=log_run_summary(spec.logger, out / "finetune", results.as_dict(),
                                                             read_json(diag_file) if diag_file.exists() else None,
                                                             run_id=ft.get("wandb_run_id")))
    results.write(out / "results.json")
    return results


def against_expected(band: tuple[float, float] | None, accuracy: float) -> tuple[str, bool | None]:
    """Whether README command 1's final accuracy lies in the band the README gives (``resofilter/readme.py``,
    set for that run only: :func:`~resofilter.stages.specs.expected_band`); the text the last log line ends
    with, and True/False (None: another run, nothing claimed)."""
    if band is None:
        return "", None
    lo, hi = band
    if lo <= accuracy <= hi:
        return f" — inside the band README command 1 expects ({lo:g}–{hi:g})", True
    return (f" — OUTSIDE the band README command 1 expects ({lo:g}–{hi:g}), measured over builds and machines: "
            "please report it with this run's results.json (it records the environment)"), False


def _stops_after(spec: RunSpec, stage: str, stages: dict[str, Any]) -> bool:
    """``run.until=<stage>``: the run ends after that stage, writing no ``results.json`` (it is not a
    finished run). ``run.until=score`` fills the shared features cache once — on a cluster, one
    multi-GPU job before the sweep whose members then all find their features there."""
    if spec.until != stage:
        return False
    log.info("run.until=%s: stopping after %s%s", stage, stage,
             f" (features in {stages['score']['features_dir']})" if stage == "score" and stages.get("score") else "")
    return True


def score_pool(spec: ScoreSpec, records: list[Any], template: Any, model_dir: str,
               data_info: dict[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """Score ``records`` into the shared features cache (keyed by the features' identity, so every
    run of the same model, data and scoring settings reuses them); (dir, summary on rank 0)."""
    t0 = time.perf_counter()
    prepared = prepare_scoring(spec, records, template, model_dir)
    key = prepared.identity.key  # the features' identity names the shared cache dir
    feat_dir = features_cache_dir(spec, key)
    cached = (feat_dir / "features.parquet").exists()
    # Under DDP every rank walks every stage: scoring is sharded over ranks, selection runs on
    # rank 0 while the others wait, fine-tuning is DDP, evaluation is sharded, rank 0 reports.
    scored = score_records(spec, records, template, model_dir, feat_dir, data_info, prepared, wait_for_lock=True)
    if not distributed.is_rank_zero():
        return feat_dir, None
    summary = {"cached": cached, "features_dir": str(feat_dir), "key": key, "time_s": time.perf_counter() - t0,
               "scoring_time_s": scored[1]["timing"]["score_s"]}
    log.info("features %s (%s) in %.1f s", "cache hit, not rescored" if cached else "computed", feat_dir,
             summary["time_s"])
    return feat_dir, summary


def features_cache_dir(spec: ScoreSpec, key: str) -> Path:
    """The shared features cache directory of features with identity ``key``."""
    if spec.cache_dir is None:
        raise ResoFilterError("paths.cache_dir is not set: `resofilter run` caches its features there")
    return Path(spec.cache_dir) / "features" / key


def with_reference(spec: RunSpec, inputs: RunInputs, model_dir: str, stages: dict[str, Any]) -> SelectSpec:
    """The select spec, with its target scorer's reference features scored first when the config asks the run
    to (their summary into ``stages["reference"]``)."""
    if not spec.scores_reference:
        return spec.select
    # every rank scores the reference set (sharded under DDP), as the pool
    ref_dir, stages["reference"] = score_reference(spec.score, inputs, model_dir)
    scorer = spec.select.scorer
    return replace(spec.select, scorer={**scorer, "reference": {**scorer["reference"], "features_dir": str(ref_dir)}})


def score_reference(spec: ScoreSpec, inputs: RunInputs, model_dir: str) -> tuple[Path, dict[str, Any]]:
    """Score the reference records (``scorer.reference.path``, or the synthetic benchmark's reference
    split) with the pool's model and settings into the features cache; (dir, summary)."""
    t0 = time.perf_counter()
    path = inputs.reference_path()
    records, info = inputs.load(path)
    prepared = prepare_scoring(spec, records, inputs.template, model_dir)
    ref_dir = features_cache_dir(spec, prepared.identity.key)
    cached = (ref_dir / "features.parquet").exists()
    score_records(spec, records, inputs.template, model_dir, ref_dir, info, prepared, wait_for_lock=True)
    log.info("reference set %s: %d records, features %s (%s)", path, len(records), ref_dir,
             "cached" if cached else "scored")
    return ref_dir, {"path": str(path), "n": len(records), "features_dir": str(ref_dir), "cached": cached,
                     "time_s": time.perf_counter() - t0}


def _finished_run(out: Path, setting: dict[str, Any], seed: int, build: int | None) -> dict[str, Any] | None:
    results = out / "results.json"
    if not results.exists():
        return None
    done = RunResult.read(results)
    if canonical_setting(done.setting) != canonical_setting(json.loads(json.dumps(setting, default=str))):
        raise ResoFilterError(f"{out} holds a finished run of another setting ({results}); use another "
                              "output_dir, or delete it to redo the run")
    if (done.seed, done.build) != (seed, build):  # the same row, another replicate
        raise ResoFilterError(f"{out} holds the finished run of seed {done.seed}, build {done.build} "
                              f"({results}), not of seed {seed}, build {build}: use another output_dir")
    return done.as_dict()


def _base_accuracy(model_dir: str) -> dict[str, float] | None:
    build = Path(model_dir) / "build.json"
    return read_json(build)["accuracy"] if build.exists() else None
