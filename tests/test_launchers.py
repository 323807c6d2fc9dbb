"""Hydra's submitit launcher for real: ``hydra/launcher=submitit_local`` is the Slurm launcher's code
path (submitit pickles each sweep member and runs it as its own process), with processes on this
machine instead of Slurm jobs. The cluster layout the README gives is run as it stands: the pool is
scored once (``run.until=score``), then the sweep's members all find their features in the cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import tiny_command
from tests.helpers.common import overrides


def _resofilter(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "resofilter", *tiny_command(args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p


@pytest.mark.slow
def test_submitit_sweep_scores_once_then_fine_tunes_and_tables(tmp_path):
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", "hydra.launcher.cpus_per_task=1"]
    t0 = time.perf_counter()
    scored = tmp_path / "score"
    _resofilter("run", "-m", "variant=full", "run.until=score", f"hydra.sweep.dir={scored}",
                *overrides(tmp_path), *launcher)
    # the member ran as a submitit job (its pickled call and logs), stopped after scoring: no results.json
    assert list((scored / ".submitit").glob("*/*_submitted.pkl")) and list((scored / ".submitit").glob("*/*.out"))
    assert not (scored / "0" / "results.json").exists()
    [features] = (tmp_path / "cache" / "features").glob("*/features.parquet")

    sweep = tmp_path / "sweep"
    _resofilter("run", "-m", "variant=reso50,random50", f"hydra.sweep.dir={sweep}", *overrides(tmp_path), *launcher)
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["variant"] for r in results] == ["resofilter", "random"]
    assert all(r["stages"]["score"]["cached"] for r in results), "the sweep must not rescore the pool"
    assert {r["stages"]["score"]["features_dir"] for r in results} == {str(features.parent)}
    assert len(list((sweep / ".submitit").glob("*/*_submitted.pkl"))) == 2  # one submitit job per member
    table = _resofilter("table", str(sweep))
    assert "| resofilter |" in table.stdout and "| random |" in table.stdout
    print(f"submitit-local: score job + 2-member sweep + table in {time.perf_counter() - t0:.0f} s")


def test_slurm_ddp_asks_one_task_per_gpu():
    """The Slurm DDP launcher reads its shape from the trainer: one task per GPU, Lightning's
    SLURMEnvironment then takes each task's rank (it must not start processes itself)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from resofilter.configs import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("run", overrides=["experiment=paper_gemma2_2b_metamathqa", "data.path=/x", "trainer=ddp",
                                        "trainer.devices=8", "trainer.num_nodes=2", "hydra/launcher=slurm_ddp"],
                      return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (launcher.params["gpus_per_node"], launcher.params["tasks_per_node"], launcher.params["nodes"]) == (8, 8, 2)
