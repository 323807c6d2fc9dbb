"""Helpers shared by several test modules (one place, not imported from each other's test files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from resofilter.data.templates import FormatTemplate
from resofilter.data.tokenize import Collator, tokenize_records
from resofilter.features.closed_form import StepConfig
from resofilter.stages import context
from tests.conftest import GSM8K_TRAIN, compose_cfg, tiny_command, write_features_dir, write_jsonl, write_result

STEPS = {
    "adamw": StepConfig("adamw", lr=1e-3, weight_decay=0.01, eps=1e-8),
    "adam": StepConfig("adam", lr=1e-3, weight_decay=0.01, eps=1e-8),
    "sgd": StepConfig("sgd", lr=1e-3, weight_decay=0.01, eps=None),
}


TEMPLATE = FormatTemplate("p", "Q: {query}\nA: ")


def _batch(tokenizer, records, n=6, side="right", max_length=256):
    samples, _ = tokenize_records(records[:n], TEMPLATE, tokenizer, max_length)
    return Collator(tokenizer.pad_token_id, side)(samples), samples


FAST = ["tokenize.max_length=192", "score.shard_size=16", "score.batch_size=8", "score.progress_bar=false",
        "score.statistics=[mean_abs,l2]"]


def score_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.embedded=null", "data=gsm8k", f"data.path={GSM8K_TRAIN}",
            "template=plain", f"output_dir={out}", *FAST, *extra]


def _fake_result(d: Path, variant: str, seed: int, accs: dict, auroc: float | None = 0.6) -> None:
    write_result(d, variant=variant, seed=seed, accs=accs, total_time_s=10.0 + seed,
                 select={"noise_rate_kept": 0.3, "noise_auroc": auroc})


def ft_overrides(model_dir, out, *extra):
    return [f"model.name_or_path={model_dir}", "model.embedded=null", "model.num_hidden_layers=4",
            "data=gsm8k", f"data.path={GSM8K_TRAIN}", "data.max_samples=16", "template=plain",
            "tokenize.max_length=128", f"output_dir={out}", "finetune.max_steps=8", "finetune.batch_size=4",
            "finetune.optimizer.lr=3e-3", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            *extra]


TINY = {
    "data.synthetic.n_base_train": 200, "data.synthetic.n_base_test": 20, "data.synthetic.n_pool": 60,
    "data.synthetic.n_test": 20, "model.embedded.base_training.steps": 4,
    "model.embedded.base_training.batch_size": 8, "model.embedded.base_training.progress_bar": False,
    "model.embedded.eval.max_samples": 8, "model.embedded.eval.max_new_tokens": 4,
    "model.embedded.architecture.hidden_size": 32, "model.embedded.architecture.intermediate_size": 64,
}


TINY_RUN = {**TINY, "model.embedded.base_training.steps": 60, "finetune.max_steps": 3, "finetune.batch_size": 4,
            "eval.max_samples": 6, "eval.max_new_tokens": 6, "eval.min_new_tokens": 2,
            "trainer.enable_progress_bar": False, "score.progress_bar": False}


def overrides(tmp: Path) -> list[str]:
    return [f"{k}={v}" for k, v in TINY_RUN.items()] + [f"paths.cache_dir={tmp / 'cache'}"]


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "resofilter.cli", *tiny_command(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _stage_cfg(tmp_path, *extra, mean_abs=None):
    pool = [{"id": f"s{i}", "query": f"q{i % 5}", "response": f"r{i}", "meta": {"noisy": i % 3 == 0, "noise_kind":
             "garbled" if i % 3 == 0 else "clean"}, "extra": i} for i in range(9)]
    data = write_jsonl(tmp_path / "pool.jsonl", pool)
    feats = pd.DataFrame({"sample_id": [f"s{i}" for i in range(9)], "loss": [float(i % 3 == 0) + i / 100
                          for i in range(9)], "ppl": 1.0, "n_tokens": list(range(9)), "truncated": False,
                          **{f"model.layers.{k}.mlp.up_proj/mean_abs": np.arange(9.0) if mean_abs is None
                             else np.asarray(mean_abs) for k in range(4)}})
    cfg = compose_cfg([f"data.path={data}", f"features_dir={tmp_path / 'feat'}", f"output_dir={tmp_path / 'out'}",
                       "data.synthetic=null", *extra], "select")
    write_features_dir(tmp_path / "feat", feats, context.load_data(cfg)[0])
    return cfg, pool
