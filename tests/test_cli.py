"""The console script: help, --cfg job for every command, Hydra behaviour, unknown commands."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from resofilter.cli import COMMANDS


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resofilter.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    for name, doc in COMMANDS.items():  # each command on a line of its own, with its own description
        assert any(line.split() and line.split()[0] == name and line.strip().endswith(doc) for line in lines), name


@pytest.mark.parametrize("name", [c for c in COMMANDS if c != "table"])
def test_cfg_job_prints_the_composed_config(name):
    out = run(name, "--cfg", "job", "selection.keep_ratio=0.25", "model=gemma2_2b")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["command"] == name
    assert cfg["selection"]["keep_ratio"] == 0.25
    assert cfg["model"]["name_or_path"] == "google/gemma-2-2b"


def test_unknown_command_and_unknown_group_option_fail():
    out = run("frobnicate")
    assert out.returncode == 2 and "unknown command" in out.stderr
    out = run("score", "--cfg", "job", "model=gpt5")
    assert out.returncode != 0 and "gpt5" in out.stderr


def test_hydra_run_dir_is_honoured(tmp_path):
    out = run("prepare", "--cfg", "hydra", f"hydra.run.dir={tmp_path}/x")
    assert out.returncode == 0 and f"{tmp_path}/x" in out.stdout
