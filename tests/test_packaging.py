"""The package as pip builds it: every subpackage and every config file is in the wheel's file list."""

from __future__ import annotations

from pathlib import Path

import pytest
from setuptools import find_packages

from resofilter.configs import config_dir

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11


def test_pyproject_lists_every_package_and_ships_the_config_tree():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(setup["packages"]) == sorted([*find_packages(ROOT, include=["resofilter*"]), "resofilter.conf"])
    assert setup["package-dir"] == {"resofilter.conf": "conf"}
    globs = setup["package-data"]["resofilter.conf"]
    shipped = {p for g in globs for p in (ROOT / "conf").glob(g)}
    assert shipped == set((ROOT / "conf").rglob("*.yaml")), "a config file the wheel would leave out"
    assert all("/" not in g or g.startswith("**/") for g in globs)


def test_the_config_tree_is_found_through_the_package():
    # the editable install maps resofilter.conf onto the checkout's conf/ (a wheel onto site-packages)
    assert (config_dir() / "config.yaml").is_file()
    assert (config_dir() / "hydra" / "launcher" / "slurm_ddp.yaml").is_file()
