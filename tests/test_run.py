"""`resofilter run` end to end on a tiny embedded setup, a 2-member multirun sharing features, `table`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from resofilter._io import model_fingerprint
from resofilter.cli import CONF_DIR
from resofilter.commands import run
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.reporting.table import write_table
from tests.conftest import compose_cfg, shrink, tiny_command, tiny_tier, write_result
from tests.helpers.common import TINY_RUN, _fake_result, overrides


def test_run_end_to_end(tmp_path):
    cfg = shrink(compose_cfg(["variant=reso50", "score.ifd=true"], "run"), tmp_path, **TINY_RUN)
    res = run(cfg)
    out = tmp_path / "out"
    assert res["variant"] == "resofilter" and res["keep_ratio"] == 0.5 and not res["stages"]["score"]["cached"]
    preds = [json.loads(x) for x in (tmp_path / "out" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert res["stages"]["select"]["n_out"] == 30 and len(preds) == 6
    assert res["eval"]["math_synth"] == sum(p["correct"] for p in preds) / 6
    for f in ("results.json", "select/subset.jsonl", "select/diagnostics.json", "eval/metrics.json",
              "eval/predictions.jsonl", "finetune/checkpoint/config.json"):
        assert (out / f).exists(), f
    # a second member with a second eval set (GSM8K fixture) besides `eval`
    again = run(shrink(compose_cfg(["variant=random50", "+eval@evals.gsm8k=gsm8k"], "run"), tmp_path / "b",
                       **TINY_RUN, **{"paths.cache_dir": str(tmp_path / "cache"), "score.ifd": True,
                                      "evals.gsm8k.max_samples": 4, "evals.gsm8k.max_new_tokens": 6}))
    assert again["stages"]["score"]["cached"] and again["stages"]["score"]["features_dir"] == \
        res["stages"]["score"]["features_dir"]
    assert set(again["eval"]) == {"math_synth", "gsm8k"}
    # the models' content, hashed afresh (no memo), as results.json records it: one model scores and trains here
    fresh = model_fingerprint(res["model"], None)
    assert res["weights"] == again["weights"] == {"model": fresh, "train_model": fresh}
    gsm = json.loads((tmp_path / "b" / "out" / "eval" / "gsm8k" / "metrics.json").read_text())
    assert gsm["eval"] == "gsm8k" and gsm["n"] == 4 and again["eval"]["gsm8k"] == gsm["accuracy"]
    assert again["stages"]["evaluate"]["more"]["gsm8k"]["n"] == 4


@pytest.mark.slow
def test_target_scorer_run_with_wandb(tmp_path):
    # LESS-style target: the run scores the benchmark's reference split with the same model, then ranks by it
    # … logged to W&B (offline): the fine-tuning's run gets the selection diagnostics and final accuracies
    target = run(shrink(compose_cfg(["variant=target50", "scorer.reference.n=8", "logger=wandb"], "run"),
                        tmp_path / "c",
                        **TINY_RUN, **{"paths.cache_dir": str(tmp_path / "cache")}))
    ref = target["stages"]["reference"]
    assert ref["n"] == 8 and not ref["cached"] and ref["features_dir"] != target["stages"]["score"]["features_dir"]
    ref_ids = [json.loads(x)["id"] for x in Path(ref["path"]).read_text().splitlines()]
    pool_queries = {json.loads(x)["query"] for x in (tmp_path / "c" / "out" / "select" / "subset.jsonl").read_text()
                    .splitlines()}
    assert ref_ids == [f"reference-{i:05d}" for i in range(8)]
    assert not pool_queries & {json.loads(x)["query"] for x in Path(ref["path"]).read_text().splitlines()}
    diag = json.loads((tmp_path / "c" / "out" / "select" / "diagnostics.json").read_text())
    assert {"target", "consensus", "answer_loss", "tok_max", "tok_topk"} <= set(diag["scorers"])
    sel = pd.read_parquet(tmp_path / "c" / "out" / "select" / "selection.parquet")
    assert sel["score"].between(-1, 1).all() and sel["score"].std() > 0  # mean cosines, not constant
    [record] = (tmp_path / "c" / "out" / "finetune" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = record.read_bytes()  # the run's protobuf records: keys and strings appear verbatim
    for key in (b"target-seed0", b"eval/math_synth/accuracy", b"select/auroc", b"select/dropped/garbled",
                b"select/rho/loss", b"variant", b"keep_ratio"):
        assert key in logged, key


def test_multirun_shares_features_and_table(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # progress shown as a log file shows it (issue 16): bars on, one line per update, output not a terminal
    cmd = [sys.executable, "-m", "resofilter.cli", *tiny_command([
        "run", "-m", "variant=reso50,random50", f"hydra.sweep.dir={sweep}", *overrides(tmp_path),
        "score.progress_bar=true", "trainer.enable_progress_bar=true", "model.embedded.base_training.progress_bar=true",
        "progress.log_every_s=0"])]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    for stage in ("base-model training", "scoring", "fine-tuning", "generation"):
        assert re.search(rf"{stage}[^\n]*: \d+/\d+ \w+ \(\d+%\), [\d.]+ \w+/s, elapsed \w+, ETA \w+", log), stage
    for noise in ("💡 Tip", "GPU available", "LeafSpec", "\r"):
        assert noise not in log, noise
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    cached = [r["stages"]["score"]["cached"] for r in results]
    assert cached == [False, True], "the second member must reuse the first member's features"
    assert results[1]["stages"]["score"]["time_s"] < results[0]["stages"]["score"]["time_s"]
    assert "cache hit, not rescored" in (p.stdout + p.stderr)
    (sweep / "2" / ".hydra").mkdir(parents=True)  # a killed member: no results.json
    t = write_table(sweep)
    assert t["n_runs"] == 2 and t["incomplete"] == ["2"]
    md = (sweep / "table.md").read_text()
    assert "resofilter" in md and "random" in md and "Incomplete runs" in md
    assert (sweep / "table.csv").exists() and (sweep / "table.png").stat().st_size > 0
    p = subprocess.run([sys.executable, "-m", "resofilter.cli", "table", str(sweep)], capture_output=True, text=True)
    assert p.returncode == 0 and "| variant | keep_ratio |" in p.stdout and f"written: {sweep / 'table.md'}" in p.stdout
    # the analysis notebook runs on these outputs
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(Path(CONF_DIR).parent / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["RESOFILTER_RUN_DIR"] = str(sweep)
    try:
        client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        del os.environ["RESOFILTER_RUN_DIR"]
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "AUROC of this score" in outputs and "resofilter" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the histogram and the accuracy plot show inline
    assert (sweep / "accuracy_vs_keep_ratio.png").exists() and not list(tmp_path.glob("*.png"))  # none in the cwd


@pytest.mark.slow
def test_builds_swept_like_seeds_are_a_factor_of_the_table(tmp_path):
    """`run -m build=0,1`: two embedded base models, each scored and fine-tuned on; `table` merges each
    variant's two builds into one row, names the build count and resamples builds (issue 22)."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "resofilter.cli", *tiny_command(["run", "-m", "build=0,1", "variant=full,reso50",
                                                                  f"hydra.sweep.dir={sweep}", *overrides(tmp_path),
                                                                  "eval.max_samples=12"])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(f.read_text()) for f in sorted(sweep.glob("*/results.json"))]
    assert sorted((r["build"], r["variant"]) for r in results) == [(0, "full"), (0, "resofilter"), (1, "full"),
                                                                    (1, "resofilter")]
    models = {r["build"]: r["model"] for r in results}
    assert models[0] != models[1] and all(json.loads((Path(m) / "build.json").read_text())["build"] == b
                                          for b, m in models.items())
    assert len({r["stages"]["score"]["features_dir"] for r in results}) == 2  # each build scores its own pool
    assert len({json.dumps(r["setting"], sort_keys=True) for r in results}) == 2  # a build is no setting of its own
    assert re.search(r"resofilter keep 0\.50 seed 0 build 1: math_synth accuracy", p.stdout + p.stderr)
    t = write_table(sweep)
    rows = {r["variant"]: r for r in t["rows"]}
    assert rows["resofilter"]["builds"] == 2 and rows["resofilter"]["seeds"] == 1 and rows["full"]["units"] == 2
    assert "| builds |" in t["markdown"] and "builds and problems as crossed random factors" in t["markdown"]
    accs = [r["eval"]["math_synth"] for r in results if r["variant"] == "resofilter"]
    assert rows["resofilter"]["acc/math_synth mean"] == pytest.approx(sum(accs) / 2)


def test_the_last_line_of_readme_command_1_checks_its_band():
    from resofilter.readme import COMMAND_1_ACCURACY
    from resofilter.stages.run import against_expected
    from resofilter.stages.specs import expected_band

    cfg = compose_cfg([], "run")
    lo, hi = COMMAND_1_ACCURACY
    assert "expected" not in cfg  # a claim of the README, not a key of the pipeline's config
    band = expected_band([])
    assert band == (lo, hi)
    text, inside = against_expected(band, (lo + hi) / 2)
    assert inside is True and f"inside the band README command 1 expects ({lo:g}–{hi:g})" in text
    text, inside = against_expected(band, hi + 0.01)
    assert inside is False and "OUTSIDE" in text
    # any override (a sweep, another seed, another output dir) or a run outside Hydra: nothing is claimed
    assert expected_band(["seed=1"]) is None and expected_band(None) is None
    assert against_expected(None, 0.3) == ("", None)
    readme = (Path(CONF_DIR).parent / "README.md").read_text()
    band = f"{lo:g}–{hi:g}"
    assert f"accuracy {band} (1000/2000 kept) in … s — inside the band README command 1 expects ({band})" in readme




def test_table_numbers_by_hand(tmp_path):
    """Two seeds → mean ± sample std; a rerun of one seed in another sweep is not a third sample."""
    _fake_result(tmp_path / "a" / "0", "resofilter", 0, {"gsm8k": 0.2, "math": 0.1})
    _fake_result(tmp_path / "a" / "1", "resofilter", 1, {"gsm8k": 0.4, "math": 0.3})
    _fake_result(tmp_path / "b" / "0", "resofilter", 0, {"gsm8k": 0.2, "math": 0.1})  # the same run again
    _fake_result(tmp_path / "b" / "1", "random", 0, {"gsm8k": 0.1, "math": 0.0}, auroc=None)
    t = write_table(tmp_path)
    assert t["n_runs"] == 4
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[0].startswith(
        "| budget | variant | keep_ratio | gsm8k % [95 % CI] | Δ full | Δ random | math % [95 % CI] |")
    rows = {line.split(" | ")[1]: line for line in md[2:] if line.startswith("|")}
    # no predictions kept: mean ± sd over seeds; std of (20, 40) with ddof 1 = 14.14…; of (10, 30) the same
    # time/run: the four stages' times (1 s each in write_result), not total_time_s (10 s, a base-model build)
    assert "| 30.0 ± 14.1 (sd) | – | – | 20.0 ± 14.1 (sd) | – | – | 2 | 50 | 30.0 | 0.600 | – | 4 |" in \
        rows["resofilter"]
    assert "| 10.0 ± 0.0 (sd) | – | – | 0.0 ± 0.0 (sd) | – | – | 1 | 50 | 30.0 | – | – | 4 |" in rows["random"]


def test_a_config_key_added_later_with_a_null_default_keeps_the_setting(tmp_path):
    """Runs of a sweep resumed by a newer version (which added `model.revision: null`, say) are the same row,
    and the resumed run accepts the finished one; a key with a value is another setting."""
    from resofilter.stages.run import _finished_run

    base = {"variant_name": "resofilter", "selection.keep_ratio": 0.5, "model.name_or_path": None}
    write_result(tmp_path / "old", seed=0, setting=base)
    write_result(tmp_path / "new", seed=1, setting={**base, "model.revision": None})
    rows = write_table(tmp_path)["rows"]
    assert len(rows) == 1 and rows[0]["seeds"] == 2
    assert _finished_run(tmp_path / "old", {**base, "model.revision": None}, 0, None) is not None
    with pytest.raises(ResoFilterError, match="another setting"):
        _finished_run(tmp_path / "old", {**base, "model.revision": "abc123"}, 0, None)


def test_table_on_empty_dir_is_an_error(tmp_path):
    with pytest.raises(ResoFilterError, match="no run directories"):
        write_table(tmp_path)


@pytest.mark.parametrize("tier", ["default", "tiny"])
@pytest.mark.parametrize("variant", sorted(p.stem for p in (Path(CONF_DIR) / "variant").glob("*.yaml")))
def test_every_variant_declares_what_its_scorer_needs(variant, tier, tmp_path):
    """Issue 37: a shipped variant on either tier passes every start-up check, the scorer's declared needs
    included (what `score` will write), so no run stops after its scoring pass for a missing column."""
    from omegaconf import OmegaConf

    from resofilter.cli import compose_config
    from resofilter.selection.scorers import scorer_needs
    from resofilter.stages.config_check import validate

    overrides = [f"variant={variant}", f"paths.cache_dir={tmp_path}"]
    cfg = compose_config("run", overrides if tier == "default" else tiny_tier(overrides))
    validate(cfg)
    needs = scorer_needs(OmegaConf.to_container(cfg.scorer, resolve=True))
    assert ("ifd" not in needs or cfg.score.ifd) and ("sketches" not in needs or cfg.score.sketch.enabled)
    assert "answer_pattern" not in needs or cfg.data.answer_pattern


def test_a_scorer_need_the_config_does_not_meet_stops_the_run_at_start_up():
    from resofilter.stages.config_check import validate

    with pytest.raises(ConfigError, match="`score.ifd`"):
        validate(compose_cfg(["scorer=ifd"]))  # scorer=ifd without the variant that sets score.ifd
    with pytest.raises(ConfigError, match="`score.sketch.enabled`"):  # inside a combined scorer too
        validate(compose_cfg(["variant=answer_reso50", "score.sketch.enabled=false",
                              "scorer.indicators=[{scorer: {name: consensus}, weight: 1.0}]"]))
    with pytest.raises(ConfigError, match="`data.answer_pattern`"):
        validate(compose_cfg(["variant=answer_reso50", "data.answer_pattern=null"]))


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(name):
    from omegaconf import OmegaConf

    from resofilter.stages.config_check import validate

    extra = ["data.path=/data/MetaMathQA-395K.json"] if "metamathqa" in name else []
    cfg = compose_cfg([f"experiment={name}", *extra], "run")
    OmegaConf.resolve(cfg)
    validate(cfg)
    # every sweep value composes too
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hcfg = compose("run", overrides=[f"experiment={name}", *extra], return_hydra_config=True)
    for key, values in (hcfg.hydra.sweeper.params or {}).items():  # experiment=tiny is one run, not a sweep
        if key == "seed":  # integers: nothing to compose (half_data_2000 sweeps 20 of them)
            assert all(v.strip().isdigit() for v in str(values).split(",")), values
            continue
        for v in str(values).split(","):
            validate(compose_cfg([f"experiment={name}", *extra, f"{key}={v}"], "run"))


def test_a_layer_set_or_indicator_outside_the_scored_candidates_stops_the_run_at_start_up(tmp_path):
    """Issue 36: the default scores the paper's layers only; a scorer reading any other layer (the `layers`
    group, a combined scorer's indicator) is refused before the scoring pass, naming candidates=all."""
    from omegaconf import OmegaConf

    from resofilter.cli import compose_config
    from resofilter.stages.config_check import validate

    def cfg(*o):
        return compose_config("run", [f"paths.cache_dir={tmp_path}", *o])

    # the packaged model's depth is read from its converted directory once it exists (here: a stand-in)
    from resofilter.models.packaged import PackagedModel
    from resofilter.stages.packaged import PROVENANCE, packaged_model_dir

    converted = packaged_model_dir(PackagedModel.from_cfg(OmegaConf.to_container(cfg().model.package)), tmp_path)
    converted.mkdir(parents=True)
    (converted / "config.json").write_text('{"num_hidden_layers": 30}')
    (converted / PROVENANCE).write_text("{}")
    validate(cfg())  # last 3 layers of the default: among the candidates
    validate(cfg("layers=last_up_proj"))
    for layers in ("first3_up_proj", "all_up_proj"):
        with pytest.raises(ConfigError, match="`layers`.*candidates=all"):
            validate(cfg(f"layers={layers}"))
        validate(cfg(f"layers={layers}", "candidates=all"))
    with pytest.raises(ConfigError, match=r"`scorer.indicators\[0\]`.*layers \[0\]"):
        validate(cfg("scorer=combined", "scorer.indicators=[{statistic: don, indices: [0]}]"))
    with pytest.raises(ConfigError, match=r"`scorer.indicators\[1\]`.*statistic 'l2'"):
        validate(cfg("scorer=combined", "score.statistics=[mean_abs,don]",
                     "scorer.indicators=[{statistic: don, indices: [-1]}, {statistic: l2, indices: [-1]}]"))
    (converted / PROVENANCE).unlink()  # not converted yet: depth unknown, first3 vs the last 3 not decidable
    validate(cfg("layers=first3_up_proj"))
