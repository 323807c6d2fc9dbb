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
from omegaconf import DictConfig

from resofilter.errors import ResoFilterError

log = logging.getLogger("resofilter")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _commands() -> dict[str, tuple[Callable[[DictConfig], object], str]]:
    from resofilter import commands

    return commands.COMMANDS


USAGE = """usage: resofilter <command> [hydra overrides] [--cfg job] [-m]

commands:
{lines}

Examples:
  resofilter run                               # the whole pipeline on the embedded default
  resofilter score model=gemma2_2b data=metamathqa data.path=/data/MetaMathQA-395K.json
  resofilter select layers=all_up_proj statistic=l2 selection.keep_ratio=0.25 features_dir=…
  resofilter run -m experiment=half_data_tiny
  resofilter table multirun/run/2026-01-01_00-00-00
  resofilter <command> --cfg job               # print the composed config
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        lines = "\n".join(f"  {name:<10} {doc}" for name, (_, doc) in commands.items())
        sys.stdout.write(USAGE.format(lines=lines))
        return
    name, rest = argv[0], argv[1:]
    if name not in commands:
        sys.stderr.write(f"resofilter: unknown command {name!r}; known: {', '.join(commands)}\n")
        raise SystemExit(2)
    fn = commands[name][0]
    if name == "table":  # reads a directory, not a config
        _guard(fn, rest)
        return

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def _app(cfg: DictConfig) -> object:
        return _guard(fn, cfg)

    sys.argv = [f"resofilter {name}", f"command={name}", *rest]
    _app()


def _guard(fn: Callable[[object], object], arg: object) -> object:
    try:
        return fn(arg)
    except ResoFilterError as e:
        log.error("%s", e)
        sys.stderr.write(f"resofilter: error: {e}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
