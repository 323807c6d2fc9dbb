"""The score stage end to end: Lightning predict, output layout, resume, config guard, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from resofilter.commands import score
from resofilter.errors import ConfigError, ResoFilterError
from tests.conftest import GSM8K_TRAIN, compose_cfg, shrink
from tests.helpers.common import _cli

FAST = ["score.statistics=[mean_abs,l2,max_abs,std,don,cos_to_weight,quantiles,count_above]",
        "tokenize.max_length=320", "score.shard_size=16", "score.batch_size=8", "score.progress_bar=false"]


def score_overrides(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.embedded=null", "model.num_hidden_layers=4",
            "data=gsm8k", f"data.path={GSM8K_TRAIN}", "template=plain", f"output_dir={out}", *FAST, *extra]


def test_score_writes_features_and_manifest(tmp_path, tiny_model_dir):
    cfg = compose_cfg(score_overrides(tiny_model_dir, tmp_path / "o", "score.ifd=true",
                                      "score.precision_check.n_samples=6"), "score")
    manifest = score(cfg)
    df = pd.read_parquet(tmp_path / "o" / "features.parquet")
    assert list(df.columns[:5]) == ["sample_id", "loss", "ppl", "n_tokens", "truncated"]
    assert len(df) == manifest["tokenized"]["n_out"] >= 60 and df["sample_id"].is_unique
    for layer in range(4):
        for stat in ("mean_abs", "l2", "max_abs", "std", "don", "cos_to_weight", "q0.5", "count_above_5e-06"):
            assert f"model.layers.{layer}.mlp.up_proj/{stat}" in df.columns
    assert (df["ppl"] - df["loss"].map(lambda x: __import__("math").exp(x))).abs().max() < 1e-9
    assert df["truncated"].any() and "ifd" in df.columns
    np.testing.assert_allclose(df["ifd"], np.exp(df["loss"] - df["loss_alone"]), rtol=1e-12)  # ppl(r|q) / ppl(r)
    on_disk = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert on_disk["n_samples"] == len(df) and on_disk["versions"]["torch"]
    assert on_disk["precision_check"]["n_samples"] == 6
    assert manifest["config"]["step"]["name"] == "adamw"
    assert not (tmp_path / "o" / "shards").exists()
    # issue 15: token-level columns (GSM8K's answer follows `#### `) and the gradient sketches beside them
    assert (df["tok_max"] >= df["tok_topk_mean"]).all() and (df["tok_topk_mean"] >= 0).all()
    assert df.loc[~df["truncated"], "answer_loss"].notna().all()  # every whole GSM8K answer ends in `#### N`
    assert manifest["tokens"]["answer_pattern"] == "#### (.*)"
    sk = np.load(tmp_path / "o" / "sketches.npy")
    assert sk.shape == (len(df), 3 * 16 * 16) and sk.dtype == np.float32 and np.isfinite(sk).all()
    assert manifest["sketch"]["targets"] == [f"model.layers.{i}.mlp.up_proj" for i in (1, 2, 3)]
    # `select features_dir=…` alone (issue 16): the data config comes from the features' manifest
    p = subprocess.run([sys.executable, "-m", "resofilter.cli", "select", f"features_dir={tmp_path / 'o'}",
                        f"output_dir={tmp_path / 's'}", "scorer=answer_loss"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "data config as recorded in" in p.stderr
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["n_ranked"] == len(df)


def test_changed_config_in_same_dir_is_an_error(tmp_path, tiny_model_dir, monkeypatch):
    first = score(compose_cfg(score_overrides(tiny_model_dir, tmp_path / "o"), "score"))

    def no_weights(*a, **k):
        raise AssertionError("finished features must be reused without loading the model's weights")

    with monkeypatch.context() as m:
        m.setattr("resofilter.stages.score.load_causal_lm", no_weights)
        again = score(compose_cfg(score_overrides(tiny_model_dir, tmp_path / "o"), "score"))
    assert again["key"] == first["key"]  # same config: reused
    with pytest.raises(ResoFilterError, match="different config"):
        score(compose_cfg(score_overrides(tiny_model_dir, tmp_path / "o", "step=sgd"), "score"))




@pytest.mark.slow  # a real SIGKILL of a subprocess (~40 s); in-process resume: test_paper_scale.py F5
def test_killed_run_resumes_to_identical_features(tmp_path, tiny_model_dir):
    common = ["score.mode=literal", "score.shard_size=4", "score.batch_size=4"]
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    p = _cli(["score", *score_overrides(tiny_model_dir, ref_out, *common)])
    assert p.wait(timeout=600) == 0, p.stdout.read()
    p = _cli(["score", *score_overrides(tiny_model_dir, out, *common)])
    deadline = time.time() + 300
    finished = out / "shards"
    while time.time() < deadline and len(list(finished.glob("shard-*.parquet.sha256.json"))) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # a shard counts as finished once its checksum is written after it; the kill may land between
    # the two, and that shard is then recomputed (finished_shards), not resumed
    done = len(list(finished.glob("shard-*.parquet.sha256.json")))
    unsummed = len(list(finished.glob("shard-*.parquet"))) - done
    assert 3 <= done < 16 and not (out / "features.parquet").exists(), "kill must land mid-run"
    p = _cli(["score", *score_overrides(tiny_model_dir, out, *common)])
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log
    assert "resuming" in log
    assert ("no checksum (killed while writing it)" in log) == (unsummed > 0), log
    ref = pd.read_parquet(ref_out / "features.parquet")
    got = pd.read_parquet(out / "features.parquet")
    pd.testing.assert_frame_equal(got, ref)
    assert json.loads((out / "manifest.json").read_text())["resumed_shards"] == done


@pytest.mark.parametrize("extra,match", [
    (["score.candidates.modules=[mlp.nonexistent]"], "matches no Linear module"),
    (["score.candidates.indices=[9]"], "out of range"),
])
def test_bad_targets_are_config_errors(tmp_path, tiny_model_dir, extra, match):
    with pytest.raises(ConfigError, match=match):
        score(compose_cfg(score_overrides(tiny_model_dir, tmp_path / "o", *extra), "score"))


def test_cli_bad_inputs_exit_nonzero_without_outputs(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # two through the CLI (a data error, a Hydra composition error); the model and index errors
    # are the same ResoFilterError/ConfigError path, checked in-process below and in test_bad_targets
    cases = [
        (["score", *score_overrides(tiny_model_dir, tmp_path / "a", f"data.path={empty}")], "no records"),
        (["score", *score_overrides(tiny_model_dir, tmp_path / "d", "template=nonexistent")], "nonexistent"),
    ]
    for args, match in cases:
        p = _cli(args)
        out = p.communicate(timeout=300)[0]
        assert p.returncode != 0 and match in out, out
    with pytest.raises(ResoFilterError, match="model.name_or_path.*does not exist"):
        score(compose_cfg(score_overrides(tmp_path / "missing", tmp_path / "b"), "score"))
    for d in "abd":
        assert not (tmp_path / d / "features.parquet").exists()


def test_output_dir_required_outside_hydra(tmp_path):
    from resofilter.stages import context

    cfg = compose_cfg([])
    with pytest.raises(ConfigError, match="output_dir"):
        context.output_dir(cfg)
    shrink(cfg, tmp_path)
    assert context.output_dir(cfg) == tmp_path / "out"


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path, tiny_model_dir):
    """trainer=ddp with 2 gloo processes: each rank scores its shards, rank 0 merges; same features."""
    one, two = tmp_path / "one", tmp_path / "two"
    p = _cli(["score", *score_overrides(tiny_model_dir, one, "score.shard_size=8")])
    assert p.wait(timeout=600) == 0, p.stdout.read()
    p = _cli(["score", *score_overrides(tiny_model_dir, two, "score.shard_size=8", "trainer=ddp",
                                        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")],
             cwd=tmp_path)
    log = p.communicate(timeout=900)[0]
    assert p.returncode == 0, log[-4000:]
    got, ref = pd.read_parquet(two / "features.parquet"), pd.read_parquet(one / "features.parquet")
    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    pd.testing.assert_frame_equal(got, ref, check_exact=False, rtol=1e-6)


def test_a_model_overwritten_at_the_same_path_is_rescored(tmp_path, tiny_model_dir):
    """The features' identity holds the weights' content: new values of the same shapes saved over the
    same directory change the cache key; the same bytes saved again (new mtime) do not."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from resofilter.stages import context, specs
    from resofilter.stages.score import prepare_scoring

    model_dir = tmp_path / "checkpoint"
    shutil.copytree(tiny_model_dir, model_dir)
    cfg = compose_cfg(score_overrides(model_dir, tmp_path / "o", "data.max_samples=8",
                                      f"paths.cache_dir={tmp_path / 'cache'}"), "score")
    records, _ = context.load_data(cfg)
    template = context.template(cfg)

    def key() -> str:
        return prepare_scoring(specs.score_spec(cfg), records, template, str(model_dir)).identity.key

    before = key()
    assert list((tmp_path / "cache" / "fingerprints").glob("*.json"))  # computed once, remembered by size + mtime
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(model_dir)  # the same values again: a new mtime, the same bytes
    assert key() == before
    with torch.no_grad():
        model.model.layers[-1].mlp.up_proj.weight.mul_(1.001)  # the same shapes, other values
    model.save_pretrained(model_dir)
    assert key() != before
