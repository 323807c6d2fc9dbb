"""Where the config tree is: the package ``resofilter.conf`` once installed, the checkout's ``conf/`` otherwise.

``conf/`` at the repository's top level is the source; ``pyproject.toml`` ships it inside the
package as ``resofilter.conf`` (package data), so a wheel or a plain ``pip install .`` runs every
command from any directory, and an editable install maps the same package onto the checkout's
``conf/``. A source tree imported without installing (``PYTHONPATH=.``) falls back to that
directory. Users add their own config directories with ``--config-dir`` or ``hydra.searchpath``.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_PACKAGE = "resofilter.conf"


@cache
def config_dir() -> Path:
    """The directory holding ``config.yaml`` and the config groups."""
    try:
        spec = importlib.util.find_spec(CONFIG_PACKAGE)
    except ModuleNotFoundError:
        spec = None
    candidates = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates.append(str(Path(__file__).resolve().parent.parent / "conf"))  # a source checkout, not installed
    for c in candidates:
        if (Path(c) / "config.yaml").is_file():
            return Path(c)
    raise RuntimeError(f"resofilter's config tree was not found (package {CONFIG_PACKAGE} or {candidates[-1]}): "
                       "reinstall resofilter (`pip install .`)")


def load_group_option(group: str, option: str) -> DictConfig:
    """One shipped config file, e.g. ``("data", "math_synth")``, read as it stands (no composition)."""
    return OmegaConf.load(config_dir() / group / f"{option}.yaml")
