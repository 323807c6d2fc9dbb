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


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(n): v for n, v in (x.split("==") for x in lines if x and not x.startswith("#"))}


def test_constraints_pin_every_requirement_within_its_range():
    """constraints.txt is a lock of the '.[dev]' install: every requirement pinned, inside pyproject's range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {spec}"


def test_the_readme_and_ci_install_with_the_constraints():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.split("```bash", 1)[1].split("```", 1)[0].splitlines()
                if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and all("-c constraints.txt" in c for c in commands)
    assert commands[1] in ci  # CI runs README command 2 as it stands


def test_the_packages_that_change_numbers_are_the_pinned_ones():
    """The venv the tests run in is the locked one (else the README's numbers do not name it)."""
    from packaging.utils import canonicalize_name

    from resofilter.environment import PACKAGES, environment

    pins, installed = _pins(), environment()["packages"]
    drift = {n: (v, pins.get(canonicalize_name(n))) for n, v in installed.items()
             if v is not None and pins.get(canonicalize_name(n)) != v.split("+")[0]}
    assert not drift, f"installed ≠ constraints.txt (installed, pinned): {drift}; install with -c constraints.txt"
    assert set(installed) == set(PACKAGES)
