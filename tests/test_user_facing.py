"""What a user sees (issue 16): warnings that explain, the embedded model on own data, sane epoch counts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from resofilter.errors import ResoFilterError
from resofilter.stages import context, specs
from resofilter.stages.score import warn_unlearned
from tests.conftest import GSM8K_TRAIN, compose_cfg, write_result
from tests.helpers.common import _fake_result


def test_warns_when_the_model_has_not_learned_the_text(caplog):
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=505))
    with caplog.at_level("WARNING"):
        assert warn_unlearned(pd.DataFrame({"loss": [14.0, 13.0]}), model, "tiny") == 13.5
    assert "above ln(vocabulary 505) = 6.22" in caplog.text and "tiny has not learned" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_unlearned(pd.DataFrame({"loss": [2.0, 6.2]}), model, "tiny")  # 4.1 < ln 505: nothing to say
    assert not caplog.text


def test_embedded_model_serves_own_data_with_a_warning(monkeypatch, tmp_path, caplog):
    """data=gsm8k with the embedded default: the base model of the default benchmark, not an error."""
    import resofilter.stages.embedded as embedded

    seen = {}
    monkeypatch.setattr(embedded, "ensure_benchmark", lambda synth, cache: seen.setdefault("synth", synth) and
                        tmp_path / "bench")
    monkeypatch.setattr(embedded, "ensure_base_model", lambda *a: tmp_path / "models" / "base-x")
    cfg = compose_cfg(["data=gsm8k", f"data.path={GSM8K_TRAIN}", f"paths.cache_dir={tmp_path}"], "score")
    with caplog.at_level("WARNING"):
        assert context.ensure_model(cfg) == str(tmp_path / "models" / "base-x")
    default = compose_cfg([], "score").data.synthetic
    assert dict(seen["synth"]) == dict(default)  # the very benchmark the default base model is built on
    assert "toy trained on synthetic" in caplog.text and "model.name_or_path" in caplog.text


@pytest.mark.parametrize("n,world,batch,accum,steps,epochs", [
    (1000, 1, 8, 1, 400, 5),    # 125 batches an epoch: 400 steps take 4 epochs (3.2), bound 4 + 1
    (1000, 2, 8, 1, 400, 8),    # 500 per rank → 63 batches: 7 epochs (6.3), bound 8
    (30, 1, 4, 3, 7, 4),        # 8 batches → 3 steps an epoch (the last partial accumulation steps too): 3 + 1
])
def test_steps_budget_epoch_bound_by_hand(n, world, batch, accum, steps, epochs):
    spec = specs.finetune_spec(compose_cfg(["finetune.budget=steps", f"finetune.max_steps={steps}",
                                              f"finetune.batch_size={batch}",
                                              f"finetune.accumulate_grad_batches={accum}"], "finetune"))
    assert spec.limits(n, world) == {"max_epochs": epochs, "max_steps": steps}
    spec = specs.finetune_spec(compose_cfg(["finetune.budget=epochs", "finetune.epochs=3"], "finetune"))
    assert spec.limits(n, world) == {"max_epochs": 3, "max_steps": -1}


def test_transformers_bars_follow_the_progress_setting():
    from transformers.utils import logging as hf_logging

    from resofilter import progress

    try:
        progress.configure(bars=False)
        assert not hf_logging.is_progress_bar_enabled()
        progress.configure(bars=True)
        assert hf_logging.is_progress_bar_enabled()
    finally:
        progress.configure()


def test_data_paths_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(GSM8K_TRAIN.parent)
    cfg = compose_cfg(["data=gsm8k", "data.path=train.jsonl"], "score")
    _, info = context.load_data(cfg)
    assert Path(info["path"]).is_absolute() and Path(info["path"]) == GSM8K_TRAIN.resolve()


def test_a_multirun_is_one_wandb_group(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from resofilter.cli import _run_group

    cfg = compose_cfg(["logger=wandb", "seed=3", "variant=reso50"], "run")
    hc = OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path / "run" / "2026-11-28")}}})
    old = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().cfg = hc
        assert _run_group() == "run/2026-11-28"
        logger = OmegaConf.to_container(cfg.logger, resolve=True)
        assert logger["group"] == "run/2026-11-28" and logger["name"] == "resofilter-seed3"
        assert logger["config"] == {"variant": "resofilter", "seed": 3, "keep_ratio": 0.5, "scorer": "resofilter",
                                    "budget": "steps"}
        with open_dict(hc):
            hc.hydra.mode = RunMode.RUN
        assert _run_group() is None  # a single run is no group
    finally:
        HydraConfig.instance().cfg = old


def test_table_logs_a_wandb_table_offline(tmp_path, monkeypatch):
    import json

    from resofilter.commands import table

    monkeypatch.setenv("WANDB_SILENT", "true")
    for i, (variant, seed, acc) in enumerate([("full", 0, 0.30), ("resofilter", 0, 0.28)]):
        _fake_result(tmp_path / "sweep" / str(i), variant, seed, {"math_synth": acc})
    out = table([str(tmp_path / "sweep"), "--wandb", "resofilter-test"])
    [saved] = (tmp_path / "sweep" / "wandb").glob("offline-run-*/files/media/table/*.table.json")
    t = json.loads(saved.read_text())
    assert len(t["data"]) == 2 and "variant" in t["columns"] and out["wandb_dir"]


def test_data_by_datasets_name_offline(tmp_path, monkeypatch):
    """data.hf_name through datasets.load_dataset, offline: a local dataset directory (never a download)."""
    import json

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    ds = tmp_path / "my_math"
    ds.mkdir()
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(5)]
    (ds / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ds / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = compose_cfg(["data=gsm8k", "data.path=null", f"data.hf_name={ds}"], "score")
    records, info = context.load_data(cfg)
    assert [r.query for r in records] == [r["question"] for r in rows]
    assert info["path"] == f"hf://{ds}[train]"
    test, _ = context.load_data(compose_cfg(["data=gsm8k", "data.path=null", f"data.hf_name={ds}",
                                             "data.split=test"], "score"))
    assert len(test) == 1
    from resofilter.errors import ConfigError, DataError

    with pytest.raises(DataError, match=r"load_dataset\(.*nope.*failed"):
        context.load_data(compose_cfg(["data=gsm8k", "data.path=null", f"data.hf_name={tmp_path / 'nope'}"],
                                      "score"))
    with pytest.raises(ConfigError, match="data.hf_name"):
        context.load_data(compose_cfg(["data=gsm8k", f"data.hf_name={ds}"], "score"))  # path and name: which?


def test_time_per_run_leaves_out_the_base_model_build(tmp_path):
    from dataclasses import replace

    from resofilter.reporting.results import RunResult

    r = RunResult.read(write_result(tmp_path, total_time_s=700.0) / "results.json")
    stages = {"score": {"time_s": 50.0, "cached": False}, "select": {"time_s": 2.0, "n_out": 5},
              "finetune": {"time_s": 60.0}, "evaluate": {"time_s": 8.0}}
    assert replace(r, stages=stages).run_time_s == 120.0  # not the 580 s the first run spent building the base model
    with_ref = replace(r, stages={**stages, "reference": {"time_s": 5.0}})
    assert with_ref.run_time_s == 125.0  # the reference the run scored is its own work too


def test_a_results_json_of_another_schema_or_missing_a_field_is_an_error(tmp_path):
    from resofilter.reporting.results import RESULTS_SCHEMA, RunResult

    f = write_result(tmp_path) / "results.json"
    d = json.loads(f.read_text())
    assert RunResult.from_dict(d).as_dict() == d  # it reads back what it wrote
    with pytest.raises(ResoFilterError, match=rf"{f}.*schema 0.*reads schema {RESULTS_SCHEMA}"):
        RunResult.from_dict({**d, "schema": 0}, f)
    with pytest.raises(ResoFilterError, match=r"missing \['setting'\]"):
        RunResult.from_dict({k: v for k, v in d.items() if k != "setting"}, f)
    with pytest.raises(ResoFilterError, match=r"unknown \['budgte'\]"):
        RunResult.from_dict({**d, "budgte": "steps"}, f)
    with pytest.raises(ResoFilterError, match=r"stages.select"):
        RunResult.from_dict({**d, "stages": {k: v for k, v in d["stages"].items() if k != "select"}}, f)
    # a field added later with a default (the models' fingerprints) leaves earlier results readable, as None
    assert RunResult.from_dict({k: v for k, v in d.items() if k != "weights"}, f).weights is None
