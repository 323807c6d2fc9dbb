"""``resofilter <command> [hydra overrides]``.

Every command except ``table`` is a Hydra app over ``conf/config.yaml``: ``--cfg job``,
``-m`` multirun, ``hydra.run.dir=…`` and the rest behave as Hydra users expect.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from resofilter.configs import config_dir
from resofilter.errors import ResoFilterError

log = logging.getLogger("resofilter")
CONF_DIR = str(config_dir())  # the installed package's config tree (resofilter/configs.py)


def compose_config(command: str, overrides: list[str] | None = None) -> DictConfig:
    """``conf/<command>.yaml`` with ``overrides``, composed as the CLI composes it (no run dir, nothing run)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(command, overrides=list(overrides or []))
# `${if_set:${output_dir},<default>}`: the value unless it is null (oc.select only covers a missing key)
OmegaConf.register_new_resolver("if_set", lambda value, default: default if value is None else value, replace=True)


def _run_group() -> str | None:
    """``${run_group:}``: the sweep of a multirun (``run/2026-11-28_22-44-09``), ``None`` for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = Path(HydraConfig.get().sweep.dir)
    return f"{sweep.parent.name}/{sweep.name}"


OmegaConf.register_new_resolver("run_group", _run_group, replace=True)


# name → help line; the functions live in resofilter.commands (imported only to run one,
# so `--help` and shell completion stay fast).
COMMANDS = {
    "prepare": "fetch+convert the pretrained model (or build the embedded one) and the data, tokenize, report counts",
    "score": "per-sample one-step weight-change features → features.parquet",
    "select": "features → kept subset (subset.jsonl), selection.parquet, noise diagnostics + plots",
    "finetune": "SFT (full or LoRA) on a records file → HF checkpoint",
    "evaluate": "greedy generation + answer checking → predictions.jsonl, metrics.json",
    "run": "score → select → finetune → evaluate in one run dir → results.json (features cached)",
    "table": "collect results.json of a (multi)run dir into table.md, table.csv, table.png",
}


def _function(name: str) -> Callable[[object], object]:
    from resofilter import commands

    return getattr(commands, name)


USAGE = """usage: resofilter <command> [hydra overrides] [--cfg job] [-m]

commands:
{lines}

Examples:
  resofilter run                               # the whole pipeline on the default (SmolLM2-135M, synthetic math)
  resofilter run experiment=tiny               # the same on the embedded 1.2 M-parameter model (minutes)
  resofilter score model=gemma2_2b data=metamathqa data.path=/data/MetaMathQA-395K.json
  resofilter select layers=all_up_proj statistic=l2 selection.keep_ratio=0.25 features_dir=…
  resofilter run -m experiment=half_data_tiny
  resofilter table multirun/run/2026-01-01_00-00-00
  resofilter <command> --cfg job               # print the composed config
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = COMMANDS
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = "\n".join(f"  {name:<10} {doc}" for name, doc in commands.items())
        sys.stdout.write(USAGE.format(lines=lines))
        return
    name, rest = argv[0], argv[1:]
    if name not in commands:
        sys.stderr.write(f"resofilter: unknown command {name!r}; known: {', '.join(commands)}\n")
        raise SystemExit(2)
    if name == "table":  # reads a directory, not a config
        _guard(_function(name), rest)
        return

    full_argv = [sys.argv[0], name, *rest]
    if "--cfg" not in rest and "-c" not in rest and (problem := _unwritable(rest)):
        sys.stderr.write(f"resofilter: error: {problem}\n")
        raise SystemExit(2)

    # conf/<command>.yaml composes config.yaml and sets `command`.
    @hydra.main(config_path=CONF_DIR, config_name=name, version_base="1.3")
    def _app(cfg: DictConfig) -> object:
        # Hydra has parsed its arguments; restore the real command line, which Lightning's
        # DDP launcher re-runs for ranks > 0.
        sys.argv = _rank_argv(full_argv)
        return _guard(_configured(_function(name)), cfg)

    sys.argv = [f"resofilter {name}", *rest]
    _app()


def _unwritable(args: list[str]) -> str | None:
    """Where this command would write, if it cannot: checked before Hydra creates any directory."""
    import os

    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    multirun = "-m" in args or "--multirun" in args
    key = "hydra.sweep.dir" if multirun else "output_dir" if "output_dir" in given else "hydra.run.dir"
    target = Path(given[key]) if key in given else Path.cwd()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        where = f"{key}={target}" if key in given else f"the current directory {target} (set output_dir=…)"
        return f"cannot write to {where}: {probe} is not writable"
    return None


def _rank_argv(argv: list[str]) -> list[str]:
    """The command line the other DDP ranks run (Lightning re-runs ``sys.argv`` for them).

    In a multirun every rank runs the whole sweep in lockstep, job by job, so it must write
    into the same sweep directory: its ``${now:…}`` would name another one.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return argv
    return [a for a in argv if not a.startswith("hydra.sweep.dir=")] + [f"hydra.sweep.dir={hc.sweep.dir}"]


# Lightning's start-up chatter that says nothing about this run: an advertisement and the
# accelerator banner (the run's device is in its config); matched by message, nothing else hidden.
_LIGHTNING_NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")
# Known-harmless warnings raised inside libraries on every run, matched by their text.
_HARMLESS_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(_LIGHTNING_NOISE)


def quiet_third_party() -> None:
    """Keep Lightning's tips/banner and known-harmless deprecation warnings out of the user's log."""
    import warnings

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningNoise) for f in logger.filters):
            logger.addFilter(_DropLightningNoise())
    for message in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _configured(fn: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
    """The command, after the process-wide settings of its config (how progress is shown)."""
    def run(cfg: DictConfig) -> object:
        from resofilter import progress

        p = cfg.get("progress") or {}
        progress.configure(p.get("bars", "auto"), p.get("log_every_s", 30.0))
        quiet_third_party()
        return fn(cfg)

    return run


def _guard(fn: Callable[[object], object], arg: object) -> object:
    """Run a command; a ResoFilterError is reported once (the log: stderr and the run's log file) and exits 2."""
    try:
        return fn(arg)
    except ResoFilterError as e:
        if logging.getLogger().handlers:  # under Hydra: its console handler writes to stderr
            log.error("%s", e)
        else:  # `table` configures no logging
            sys.stderr.write(f"resofilter: error: {e}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
