"""Issue 11: a CPU dress rehearsal of the paper experiment, and DDP scoring's corner cases.

`experiment=paper_gemma2_2b_metamathqa` is run as a user runs it (`resofilter run -m`, then
`resofilter table`) with the model swapped for a tiny random Gemma-2 (weights stored in
bf16, `model.dtype=bfloat16` kept, eager attention, the `gemma_turns` template), 2-process
DDP on CPU (gloo), the MetaMathQA-shaped fixture and the GSM8K / MATH-500 fixture eval
sets. Only what a CPU needs changes besides: the trainer's accelerator, and 32 new tokens
per answer instead of 512/1024 (a random model never stops on its own).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from resofilter.features.extract import write_shard
from tests.conftest import FIXTURES, GSM8K_TRAIN, tiny, tiny_command

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ["full", "reso75", "reso50", "reso25", "random50"]


def _cli(args: list[str], timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "resofilter.cli", *tiny_command(args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def _tiny_gemma2(d: Path, tokenizer, layers: int, seed: int) -> Path:
    tok = copy.deepcopy(tokenizer)  # with Gemma's turn tokens, which template=gemma_turns writes
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    model = tiny("gemma2", tok, seed=seed, hidden_size=32, intermediate_size=64, num_hidden_layers=layers)
    model.to(torch.bfloat16).save_pretrained(d)  # stored like a released bf16 checkpoint
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory, tokenizer) -> Path:
    """The scoring model (gemma-2-2b's stand-in)."""
    return _tiny_gemma2(tmp_path_factory.mktemp("tiny_gemma2"), tokenizer, 4, 0)


@pytest.fixture(scope="module")
def tiny_gemma2_it_dir(tmp_path_factory, tokenizer) -> Path:
    """The fine-tuned model (gemma-2-2b-it's stand-in): another Gemma-2, of another depth."""
    return _tiny_gemma2(tmp_path_factory.mktemp("tiny_gemma2_it"), tokenizer, 3, 1)


@pytest.mark.slow
def test_paper_experiment_dress_rehearsal(tmp_path, tiny_gemma2_dir, tiny_gemma2_it_dir):
    sweep = tmp_path / "sweep"
    t0 = time.perf_counter()
    p = _cli(["run", "-m", "experiment=paper_gemma2_2b_metamathqa", f"model.name_or_path={tiny_gemma2_dir}",
              "model.num_hidden_layers=4", f"train_model.name_or_path={tiny_gemma2_it_dir}",
              "train_model.num_hidden_layers=3", f"data.path={FIXTURES / 'metamathqa' / 'train.jsonl'}",
              "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.enable_progress_bar=false",
              "score.progress_bar=false", "eval.max_new_tokens=32", "evals.math.max_new_tokens=32",
              "evals.gsm8k_cot.max_new_tokens=16", "evals.gsm8k_cot.few_shot=1",  # tiny gemma: 512 positions,
              "evals.math.prompt_overflow=count_wrong",  # which one MATH-500 fixture problem fills (688 tokens)
              f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"])
    wall = time.perf_counter() - t0
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    print(f"dress rehearsal: 5 runs, 2-process DDP, {wall:.0f} s wall")  # noqa: T201

    results = [json.loads(f.read_text()) for f in sorted(sweep.glob("*/results.json"))]
    assert sorted(r["choices"]["variant"] for r in results) == sorted(VARIANTS)
    feat_dir = Path(results[0]["stages"]["score"]["features_dir"])
    assert all(Path(r["stages"]["score"]["features_dir"]) == feat_dir for r in results)
    fman = json.loads((feat_dir / "manifest.json").read_text())
    # the precision policy held: fp32 scoring of a bf16 model, checked against float64
    assert fman["description"]["score"]["dtype"] == "float32" and fman["world_size"] == 2
    pc = fman["precision_check"]
    assert pc["passed"] and pc["n_samples"] == 64 and pc["spearman_vs_float64"] >= 0.999, pc
    assert fman["structure"]["num_hidden_layers"] == 4 and fman["structure"]["model_type"] == "gemma2"
    assert fman["records"]["n"] == 64 and fman["config"]["template"]["name"] == "gemma_turns"
    # the authors' dedup: the 16 repeated queries of the 80 records were never scored
    assert fman["data"]["n_records"] == 80 and fman["data"]["dedup_removed"] == 16

    base = load_file(str(tiny_gemma2_it_dir / "model.safetensors"))  # what is fine-tuned: the "-it" model
    for r, run_dir in ((json.loads(f.read_text()), f.parent) for f in sorted(sweep.glob("*/results.json"))):
        for f in ("select/subset.jsonl", "select/manifest.json", "select/selection.parquet",
                  "finetune/finetune.json", "finetune/checkpoint/config.json", "eval/predictions.jsonl",
                  "eval/metrics.json", "eval/math/metrics.json", "eval/math/predictions.jsonl",
                  "eval/gsm8k_cot/metrics.json"):
            assert (run_dir / f).exists(), f"{run_dir.name}: {f}"
        assert r["stages"]["finetune"]["world_size"] == 2 and set(r["eval"]) == {"gsm8k", "math", "gsm8k_cot"}
        assert r["model"] == str(tiny_gemma2_dir) and r["train_model"] == str(tiny_gemma2_it_dir)
        ft = json.loads((run_dir / "finetune" / "finetune.json").read_text())
        # the global batch of 16 under 2 processes: 2 per device × accumulation 4 × 2
        assert ft["batch"] == {"per_device": 2, "accumulate_grad_batches": 4, "world_size": 2, "global": 16}
        assert ft["scored_by"] == str(tiny_gemma2_dir) and ft["template"]["response_prefix"] == "<start_of_turn>model\n"
        assert json.loads((run_dir / "finetune" / "checkpoint" / "config.json").read_text())["num_hidden_layers"] == 3
        assert r["eval_protocols"] == {"gsm8k": "zero_shot", "math": "zero_shot", "gsm8k_cot": "few_shot_cot (1-shot)"}
        for name in ("", "math/", "gsm8k_cot/"):
            m = json.loads((run_dir / f"eval/{name}metrics.json").read_text())
            assert m["world_size"] == 2 and m["n"] == 32  # sharded over both ranks, merged once
            assert m["n_prompt_overflow"] == (1 if name == "math/" else 0), (name, m["n_prompt_overflow"])
        new = load_file(str(run_dir / "finetune" / "checkpoint" / "model.safetensors"))
        keys = [k for k in base if "up_proj" in k]
        assert new[keys[0]].dtype == torch.float32  # fp32 master weights, saved as trained
        moved = torch.cat([(new[k].double() - base[k].double()).ne(0).flatten() for k in keys]).double().mean()
        assert moved >= 0.99, f"{r['variant']}: fine-tuning moved {moved:.1%} of up_proj weights"
        preds = [json.loads(x) for x in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
        gold = [json.loads(x) for x in (REPO / "tests/fixtures/gsm8k/test.jsonl").read_text().splitlines()]
        assert len(preds) == len(gold) and len({p["sample_id"] for p in preds}) == 32

    t = _cli(["table", str(sweep)])
    assert t.returncode == 0, t.stderr[-3000:]
    table = pd.read_csv(sweep / "table.csv")
    assert len(table) == len(VARIANTS) and set(table["variant"]) == {"full", "resofilter", "random"}
    assert {"acc/gsm8k mean", "acc/math mean", "acc/gsm8k_cot mean"} <= set(table.columns)
    assert set(table["scored_by"]) == {str(tiny_gemma2_dir)} and set(table["trained"]) == {str(tiny_gemma2_it_dir)}


@pytest.mark.slow
def test_ddp_scoring_with_an_idle_rank_and_resume_after_one_rank_finished(tmp_path, tiny_model_dir):
    """60 samples in one 256-sample shard on 2 ranks: rank 1 idles; then a resume where only one shard is left."""
    common = [f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "data=gsm8k", f"data.path={GSM8K_TRAIN}",
              "template=plain", "tokenize.max_length=192", "score.batch_size=8", "score.progress_bar=false",
              "score.statistics=[mean_abs]"]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    one = tmp_path / "one"
    p = _cli(["score", *common, f"output_dir={one}", "score.shard_size=256", *ddp])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    ref = tmp_path / "ref"
    assert _cli(["score", *common, f"output_dir={ref}", "score.shard_size=16"]).returncode == 0
    pd.testing.assert_frame_equal(pd.read_parquet(one / "features.parquet"), pd.read_parquet(ref / "features.parquet"),
                                  check_exact=False, rtol=1e-6)
    # a DDP run killed after shards 0-2 of 4 were written: the resume leaves rank 1 nothing to do
    part = tmp_path / "part"
    assert _cli(["score", *common, f"output_dir={part}", "score.shard_size=16", *ddp]).returncode == 0
    manifest = json.loads((part / "manifest.json").read_text())
    full = pd.read_parquet(part / "features.parquet").drop(columns="record_hash")
    full["sketch"] = list(np.load(part / "sketches.npy"))  # shards carry the sketches as a list column
    (part / "features.parquet").unlink()
    (part / "manifest.json").unlink()
    (part / "sketches.npy").unlink()
    (part / "shards").mkdir()
    (part / "shards" / "key.json").write_text(json.dumps({"key": manifest["key"], "description":
                                                          manifest["description"], "shard_size": 16}))
    for k in range(3):
        write_shard(part / "shards", k, full.iloc[16 * k:16 * (k + 1)].assign(index=range(16 * k, 16 * (k + 1))))
    p = _cli(["score", *common, f"output_dir={part}", "score.shard_size=16", *ddp])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    resumed = json.loads((part / "manifest.json").read_text())
    assert resumed["resumed_shards"] == 3 and resumed["world_size"] == 2
    pd.testing.assert_frame_equal(pd.read_parquet(part / "features.parquet"), pd.read_parquet(ref / "features.parquet"),
                                  check_exact=False, rtol=1e-6)
