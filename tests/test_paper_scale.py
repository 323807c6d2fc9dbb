"""Issue 11: paper-scale correctness. Each test names the finding it guards (F1 … F9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from resofilter.commands import finetune, score, select
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.features import extract as extract_mod
from resofilter.reporting.table import write_table
from resofilter.stages.config_check import scoring_dtype, validate
from tests.conftest import compose_cfg, tiny, tiny_command, write_jsonl, write_result
from tests.helpers.common import score_args


def save_model(model: torch.nn.Module, tokenizer, d: Path) -> Path:
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# F1: bf16 scoring scrambles the ranking -------------------------------------------------------------


def test_f1_scoring_is_fp32_whatever_the_model_dtype():
    cfg = compose_cfg(["model=gemma2_2b"], "score")
    assert cfg.model.dtype == "bfloat16" and scoring_dtype(cfg) == torch.float32
    with pytest.raises(ConfigError, match="allow_low_precision"):
        validate(compose_cfg(["model=gemma2_2b", "score.dtype=bfloat16"], "score"))
    with pytest.raises(ConfigError, match="score.literal_dtype"):
        validate(compose_cfg(["score.mode=literal", "score.literal_dtype=bfloat16"], "score"))
    validate(compose_cfg(["model=gemma2_2b", "score.dtype=bfloat16", "score.allow_low_precision=true"], "score"))


def test_f1_bf16_opt_in_is_checked_and_fails_the_run_without_features(tmp_path, tiny_model_dir):
    out = tmp_path / "bf16"
    cfg = compose_cfg(score_args(tiny_model_dir, out, "score.dtype=bfloat16", "score.allow_low_precision=true",
                                 "score.precision_check.low_precision_n_samples=24"), "score")
    with pytest.raises(ResoFilterError, match="precision check failed"):
        score(cfg)
    assert not (out / "features.parquet").exists() and not (out / "manifest.json").exists()
    # fp32 with the check asked for passes it and records it
    manifest = score(compose_cfg(score_args(tiny_model_dir, tmp_path / "fp32",
                                            "score.precision_check.n_samples=24"), "score"))
    pc = manifest["precision_check"]
    assert pc["passed"] and pc["n_samples"] == 24 and pc["spearman_vs_float64"] >= 0.99 and pc["dtype"] == "float32"


# F2: bf16 fine-tuning barely trains -----------------------------------------------------------------


def _moved(model_dir: Path, ckpt: Path) -> tuple[float, float]:
    from safetensors.torch import load_file

    base, new = load_file(str(model_dir / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    keys = [k for k in base if "up_proj" in k]
    d = torch.cat([(new[k].double() - base[k].double()).abs().flatten() for k in keys])
    return float((d > 0).double().mean()), float(d.mean())


def test_f2_bf16_mixed_finetune_keeps_fp32_master_weights(tmp_path, tiny_model_dir):
    common = ["data.max_samples=16", "tokenize.max_length=128", "finetune.max_steps=10", "finetune.batch_size=4",
              "finetune.optimizer.lr=1e-5", "finetune.warmup_ratio=0", "finetune.scheduler.name=constant",
              "trainer.enable_progress_bar=false"]
    runs = {}
    for name, extra in {"fp32": ["finetune.precision=32-true"],
                        "bf16": ["model.dtype=bfloat16", "finetune.precision=bf16-mixed"]}.items():
        out = tmp_path / name
        res = finetune(compose_cfg(score_args(tiny_model_dir, out, *common, *extra), "finetune"))
        assert res["steps"] == 10
        runs[name] = _moved(tiny_model_dir, out / "checkpoint")
    assert runs["bf16"][0] >= 0.99, f"only {runs['bf16'][0]:.1%} of up_proj weights moved"
    assert runs["bf16"][1] >= 0.8 * runs["fp32"][1]  # the same size of steps, not 15 % of it
    with pytest.raises(ConfigError, match="finetune.precision"):
        validate(compose_cfg(["finetune.precision=bf16-true"], "finetune"))


# F3: the scored layers come from the model, not from model.num_hidden_layers --------------------------


@pytest.fixture(scope="module")
def qwen6_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return save_model(AutoModelForCausalLM.from_config(cfg), tokenizer, tmp_path_factory.mktemp("qwen6"))


def test_f3_last3_means_the_models_last3(tmp_path, qwen6_dir):
    feat = tmp_path / "feat"
    manifest = score(compose_cfg(score_args(qwen6_dir, feat), "score"))
    st = manifest["structure"]
    assert st["num_hidden_layers"] == 6 and st["model_type"] == "qwen2"
    assert [t["name"] for t in st["targets"]][-3:] == [f"model.layers.{i}.mlp.up_proj" for i in (3, 4, 5)]
    sel = select(compose_cfg(score_args(qwen6_dir, tmp_path / "sel", f"features_dir={feat}"), "select"))
    assert sel["num_hidden_layers"] == 6
    assert sel["columns"] == [f"model.layers.{i}.mlp.up_proj/mean_abs" for i in (3, 4, 5)]
    # a config that restates the depth wrongly is an error naming both values, before and after scoring
    with pytest.raises(ConfigError, match=r"says 4.*says 6"):
        validate(compose_cfg(score_args(qwen6_dir, tmp_path / "x", "model.num_hidden_layers=4"), "score"))
    # a model named without a local config.json: the features' manifest is what says 6
    with pytest.raises(ConfigError, match=r"says 4.*6-layer model"):
        select(compose_cfg(score_args(qwen6_dir, tmp_path / "y", f"features_dir={feat}", "model.num_hidden_layers=4",
                                      "model.name_or_path=someorg/some-model"), "select"))


def test_f3_too_shallow_model_names_its_depth(tmp_path, tokenizer):
    d = save_model(tiny("llama", tokenizer, num_hidden_layers=2), tokenizer, tmp_path / "two")
    with pytest.raises(ConfigError, match="out of range for a 2-layer model"):
        validate(compose_cfg(score_args(d, tmp_path / "o"), "score"))


# F4: select checks the features belong to the data ----------------------------------------------------


def _pool(n: int, tag: str = "") -> list[dict]:
    return [{"id": f"s{i}", "query": f"What is {i} plus {i}?{tag}", "response": f"{i} plus {i} is {2 * i}."}
            for i in range(n)]


def test_f4_select_refuses_features_of_other_records(tmp_path, tiny_model_dir):
    jsonl = ["data=jsonl", "data.id_field=id", "data.dedup=null"]
    a = write_jsonl(tmp_path / "a.jsonl", _pool(20))
    feat = tmp_path / "feat"
    score(compose_cfg(score_args(tiny_model_dir, feat, *jsonl, f"data.path={a}"), "score"))

    def sel(path: Path, *extra: str) -> dict:
        return select(compose_cfg(score_args(tiny_model_dir, tmp_path / f"sel-{path.stem}", *jsonl,
                                             f"data.path={path}", f"features_dir={feat}", *extra), "select"))

    assert sel(a)["n_out"] == 10
    b = write_jsonl(tmp_path / "b.jsonl", _pool(20, " (rephrased)"))  # same ids, other text
    with pytest.raises(ResoFilterError, match="20 of the 20 records scored .* differ in content"):
        sel(b)
    c = write_jsonl(tmp_path / "c.jsonl", _pool(50))  # 20 scored, 30 never scored
    with pytest.raises(ResoFilterError, match="the data has 50 records.* cover 20 .*30 were never scored"):
        sel(c)
    assert not (tmp_path / "sel-c" / "subset.jsonl").exists()
    assert sel(c, "selection.allow_unscored=true")["n_out"] == 10


# F5: DDP pieces that run in-process --------------------------------------------------------------------


def test_f5_idle_rank_gets_a_placeholder_batch_and_round_robin_over_unfinished_shards():
    samples = [type("S", (), {"__len__": lambda self: 5})() for _ in range(60)]
    dm = extract_mod.FeatureDataModule(samples, 0, shard_size=16, batch_size=8, max_tokens=None, done={0, 2})
    assert dm.todo() == [1, 3]
    assert sorted(i for b in dm.batches(0, 2) for i in b) == list(range(16, 32))
    assert sorted(i for b in dm.batches(1, 2) for i in b) == list(range(48, 60))
    assert dm.batches(2, 3) == [[]]  # a third rank has nothing: one empty batch, not an empty DataLoader
    assert dm._collate([])["index"].numel() == 0


def test_f5_resume_with_another_shard_size_gives_identical_features(tmp_path, tiny_model_dir, monkeypatch):
    ref = tmp_path / "ref"
    score(compose_cfg(score_args(tiny_model_dir, ref), "score"))
    out = tmp_path / "killed"
    real = extract_mod.write_parquet_atomic
    written = []

    class Killed(Exception):
        pass

    def dies_after_two(path, frame):
        if "shard-" in Path(path).name and len(written) == 2:
            raise Killed
        written.append(path)
        real(path, frame)

    monkeypatch.setattr(extract_mod, "write_parquet_atomic", dies_after_two)
    with pytest.raises(Killed):
        score(compose_cfg(score_args(tiny_model_dir, out), "score"))
    monkeypatch.setattr(extract_mod, "write_parquet_atomic", real)
    assert len(list((out / "shards").glob("shard-*.parquet"))) == 2
    manifest = score(compose_cfg(score_args(tiny_model_dir, out, "score.shard_size=32"), "score"))
    assert manifest["resumed_shards"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(out / "features.parquet"), pd.read_parquet(ref / "features.parquet"))


# F6: table never merges distinct settings --------------------------------------------------------------


def _result(d: Path, seed: int, acc: float, modules: list[str], layers_choice: str) -> None:
    setting = {"variant_name": "resofilter", "selection.keep_ratio": 0.5, "layers.modules": modules,
               "layers.indices": [-3, -2, -1], "statistic.name": "mean_abs"}
    write_result(d, seed=seed, accs={"math_synth": acc}, setting=setting,
                 layers={"modules": modules, "indices": [-3, -2, -1]},
                 choices={"layers": layers_choice, "variant": "reso50"})


def test_f6_table_keeps_settings_apart_and_labels_them(tmp_path):
    _result(tmp_path / "0", 0, 0.25, ["mlp.up_proj"], "last3_up_proj")
    _result(tmp_path / "1", 0, 0.25, ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], "last3_mlp")
    _result(tmp_path / "2", 1, 0.35, ["mlp.up_proj"], "last3_up_proj")
    t = write_table(tmp_path)
    rows = {r["setting"]: r for r in t["rows"]}
    assert set(rows) == {"layers=last3_up_proj", "layers=last3_mlp"}
    assert rows["layers=last3_up_proj"]["seeds"] == 2 and rows["layers=last3_mlp"]["seeds"] == 1
    assert rows["layers=last3_up_proj"]["acc/math_synth mean"] == pytest.approx(0.30)
    assert "| resofilter | 0.5 | layers=last3_mlp | 25.0 ± 0.0 (sd) | – | – | 1 |" in t["markdown"]


# F7: memory bounded at gemma-2 scale -------------------------------------------------------------------


def _peak(stats: str, chunk: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",  # RSS then follows live tensors, not glibc's cache
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}  # this checkout's package
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "helpers" / "peak_memory_quantiles.py"),
                        stats, str(chunk), "0.5", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_f7_quantiles_of_a_gemma2_up_proj_stay_within_the_chunk_budget():
    chunk = 1 << 21  # 2 M elements: an fp32 block is 8 MB, a float64 one 16 MB
    q = _peak("mean_abs,quantiles", chunk)
    assert q["keys"] == ["mean_abs", "q0.5"]
    # holding |ΔW| of one 9216×2304 sample whole would take 85 MB in fp32 and 170 MB more in float64
    budget_mb = 8 * chunk * 8 / 2**20  # 8 float64 blocks = 128 MB
    assert q["growth_mb"] < budget_mb, q


def test_f7_ifd_runs_through_the_sliced_head(tmp_path, tiny_model_dir, monkeypatch):
    from resofilter.stages import score as stage

    sizes = []
    real_load = stage.load_causal_lm

    def load_and_watch_the_head(*a, **k):
        model = real_load(*a, **k)
        model.get_output_embeddings().register_forward_hook(lambda m, i, o: sizes.append(o.numel()))
        return model

    monkeypatch.setattr(stage, "load_causal_lm", load_and_watch_the_head)
    chunk = 4096  # elements of logits at a time; a whole batch here is ~8 × 150 × 400 = 480 k
    out = tmp_path / "o"
    score(compose_cfg(score_args(tiny_model_dir, out, "score.ifd=true", "data.max_samples=12",
                                 f"score.logits_chunk_elements={chunk}"), "score"))
    df = pd.read_parquet(out / "features.parquet")
    assert sizes and max(sizes) <= chunk, f"logits of {max(sizes)} elements built at once"
    # the sliced IFD pass equals the model's whole-logits loss
    ref = tmp_path / "ref"
    score(compose_cfg(score_args(tiny_model_dir, ref, "score.ifd=true", "data.max_samples=12",
                                 "score.logits_chunk_elements=0"), "score"))
    np.testing.assert_allclose(df["loss_alone"], pd.read_parquet(ref / "features.parquet")["loss_alone"], rtol=1e-5)


# F8: fine-tuning trains in train mode ------------------------------------------------------------------


def test_f8_finetune_fits_in_train_mode_and_scoring_runs_in_eval_mode(tmp_path, tiny_model_dir, monkeypatch):
    from resofilter.training import sft

    modes = []
    real_step = sft.SFTModule.training_step

    def step(self, batch, batch_idx):
        modes.append([m.training for m in self.model.modules()])
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(sft.SFTModule, "training_step", step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune(compose_cfg(score_args(tiny_model_dir, tmp_path / "ft", "data.max_samples=8", "finetune.max_steps=2",
                                        "finetune.batch_size=4", "trainer.enable_progress_bar=false"), "finetune"))
    assert modes and all(all(m) for m in modes), "every module must be in train mode while fitting"
    assert not [w for w in caught if "eval mode" in str(w.message)]

    from resofilter.features import fast

    seen = []
    real_call = fast.FastScorer.score_batch

    def call(self, batch):
        seen.append(any(m.training for m in self.model.modules()))
        return real_call(self, batch)

    monkeypatch.setattr(fast.FastScorer, "score_batch", call)
    score(compose_cfg(score_args(tiny_model_dir, tmp_path / "sc", "data.max_samples=8"), "score"))
    assert seen and not any(seen), "scoring runs in eval mode (no dropout)"


# F9: non-finite models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "literal"])
def test_f9_nan_weight_is_a_named_error_before_anything_is_written(tmp_path, tokenizer, mode):
    model = tiny("llama", tokenizer)
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    d = save_model(model, tokenizer, tmp_path / "nan")
    out = tmp_path / "o"
    with pytest.raises(ResoFilterError, match=r"model.layers.2.mlp.up_proj.weight has 1 non-finite"):
        score(compose_cfg(score_args(d, out, f"score.mode={mode}"), "score"))
    from resofilter._io import LOCK_FILE

    assert not out.exists() or [p.name for p in out.rglob("*")] == [LOCK_FILE]  # the lock file, no output


def test_f9_cli_exit_code_and_select_on_nan_features(tmp_path, tokenizer, tiny_model_dir):
    model = tiny("llama", tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("inf"))
    d = save_model(model, tokenizer, tmp_path / "inf")
    args = tiny_command(["score", *score_args(d, tmp_path / "o")])
    p = subprocess.run([sys.executable, "-m", "resofilter.cli", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "non-finite" in p.stderr
    feat = tmp_path / "feat"
    score(compose_cfg(score_args(tiny_model_dir, feat, "data.max_samples=12"), "score"))
    df = pd.read_parquet(feat / "features.parquet")
    df.loc[3, "model.layers.3.mlp.up_proj/mean_abs"] = np.nan
    df.to_parquet(feat / "features.parquet")
    with pytest.raises(ResoFilterError, match="1 non-finite scores"):
        select(compose_cfg(score_args(tiny_model_dir, tmp_path / "sel", "data.max_samples=12",
                                      f"features_dir={feat}"), "select"))
    assert not (tmp_path / "sel" / "subset.jsonl").exists()


# the precision check's arithmetic and the template shared by training and evaluation (issue 12) -------


def test_precision_check_reports_and_enforces_by_hand(tokenizer, gsm8k_records):
    from resofilter.data.templates import FormatTemplate
    from resofilter.data.tokenize import Collator, tokenize_records
    from resofilter.features.closed_form import StepConfig
    from resofilter.features.fast import FastScorer
    from resofilter.features.targets import find_targets
    from resofilter.stages import specs
    from resofilter.stages.score import enforce_precision, precision_check

    cfg = compose_cfg([])
    model = tiny("llama", tokenizer).to(torch.float64).eval()
    samples, _ = tokenize_records(gsm8k_records[:10], FormatTemplate("p", "Q: {query}\nA: "), tokenizer, 192)
    targets = find_targets(model, ["mlp.up_proj"], "all")
    step = StepConfig.from_cfg(cfg.step)
    scorer = FastScorer(model, targets, step, ["mean_abs"])
    cols = {t.name: [] for t in targets}
    for s in samples:  # the float64 reference itself, one sample at a time as the check does it
        stats, _, _ = scorer(Collator(tokenizer.pad_token_id)([s]))
        for t in targets:
            cols[t.name].append(stats[t.name]["mean_abs"].item())
    features = pd.DataFrame({f"{k}/mean_abs": v for k, v in cols.items()})
    check = replace(specs.precision_check_spec(cfg, torch.float32), n_samples=10)
    report = precision_check(model, samples, targets, step, features, check, tokenizer.pad_token_id)
    assert report["spearman_vs_float64"] == pytest.approx(1.0) and report["max_abs_error"] < 1e-15
    last3 = [f"model.layers.{i}.mlp.up_proj/mean_abs" for i in (1, 2, 3)]
    std = float(np.std(features[last3].to_numpy().mean(axis=1)))
    features.loc[4, last3] += 3 * std  # one sample off by 3 std of the spread
    report = precision_check(model, samples, targets, step, features, check, tokenizer.pad_token_id)
    assert report["max_error_over_std"] == pytest.approx(3.0, rel=1e-6)
    with pytest.raises(ResoFilterError, match="precision check failed"):
        enforce_precision(report, check)


@pytest.mark.parametrize("template", ["plain", "metamath", "gemma_turns"])
def test_finetune_and_evaluate_render_the_same_prompt(template, tokenizer, turns_tokenizer, gsm8k_records):
    from hydra.utils import instantiate

    from resofilter.data.templates import generation_prompt
    from resofilter.data.tokenize import IGNORE_INDEX, tokenize_records

    tokenizer = turns_tokenizer if template == "gemma_turns" else tokenizer
    tpl = instantiate(compose_cfg([f"template={template}"]).template)
    (sample,), _ = tokenize_records(gsm8k_records[:1], tpl, tokenizer, 512)
    n_prompt = sum(lab == IGNORE_INDEX for lab in sample.labels)
    r = gsm8k_records[0]
    eval_ids = tokenizer(generation_prompt(tpl, r.query, r.input, tokenizer),
                         add_special_tokens=tpl.add_special_tokens)["input_ids"]
    # what fine-tuning conditions on is what evaluation feeds: the prompt, then the labelled model-turn
    # marker (gemma_turns) that generation continues after
    assert sample.input_ids[:len(eval_ids)] == eval_ids and len(eval_ids) >= n_prompt
