"""Shared fixtures: real configs composed with Hydra, tiny tokenizers/models built in-process."""

from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from resofilter.cli import compose_config
from resofilter.data.records import load_records
from resofilter.models.loading import build_tiny_model
from resofilter.models.tokenizer import train_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_TRAIN = FIXTURES / "gsm8k" / "train.jsonl"


def load_experiment_script(relative: str) -> types.ModuleType:
    """A script under experiments/ (not a package) imported as a module, e.g. ``benchmarks/score_speed.py``."""
    path = Path(__file__).resolve().parents[1] / "experiments" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The test suite runs on the embedded tier (conf/experiment/tiny.yaml); the pretrained default is tested
# where a test names it (tests/test_packaged.py) and its config is composed without loading weights.
TINY = "experiment=tiny"


def tiny_tier(overrides: list[str] | tuple[str, ...] | None) -> list[str]:
    """``overrides`` on the embedded tier, unless they choose an experiment themselves (which then says its tier)."""
    overrides = list(overrides or [])
    # last: Hydra's flags (-m, --cfg job) may lead; a command-line override wins wherever it stands
    return overrides if any(o.lstrip("+~").startswith("experiment=") for o in overrides) else [*overrides, TINY]


def tiny_command(args: list[str] | tuple[str, ...]) -> list[str]:
    """A command line (``["score", overrides…]``) on the embedded tier; ``table`` and help take no overrides."""
    args = list(args)
    if not args or args[0] in ("table", "--help", "-h", "help") or args[0].startswith("-"):
        return args
    return [args[0], *tiny_tier(args[1:])]


def compose_cfg(overrides: list[str] | None = None, command: str = "run") -> DictConfig:
    """``conf/<command>.yaml`` with ``overrides`` on the embedded tier (:func:`tiny_tier`)."""
    return compose_config(command, tiny_tier(overrides))


@pytest.fixture(scope="session")
def gsm8k_records():
    return load_records(GSM8K_TRAIN, "question", "answer")


@pytest.fixture(scope="session")
def tokenizer(gsm8k_records):
    texts = [f"{r.query}\n{r.response}" for r in gsm8k_records]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def turns_tokenizer(tokenizer):
    """The test tokenizer with Gemma's two turn tokens as special tokens (what template=gemma_turns writes)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tok


def tiny(arch: str, tokenizer, seed: int = 0, **sizes) -> torch.nn.Module:
    defaults = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=512)
    defaults.update(sizes)
    return build_tiny_model(arch, len(tokenizer), seed=seed, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **defaults)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama + tokenizer saved as an HF directory (the shape of a real model dir)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny("llama", tokenizer).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def shrink(cfg: DictConfig, tmp_path: Path, **extra) -> DictConfig:
    """Small, fast settings on a real composed config."""
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "out")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        for k, v in extra.items():
            node = cfg
            *parents, leaf = k.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = v
    return cfg


def write_features_dir(d: Path, features, records, n_layers: int = 4) -> Path:
    """A features dir as `score` writes it (features + a manifest naming structure and records), from a frame."""
    import pandas as pd

    from resofilter._io import write_json_atomic
    from resofilter.data.records import record_hashes
    from resofilter.stages.score import records_summary

    hashes = record_hashes(records)
    features = features.copy()
    if "record_hash" not in features.columns:
        features.insert(5, "record_hash", [hashes[s] for s in features["sample_id"]])
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(features).to_parquet(d / "features.parquet")
    scored = [r for r in records if r.sample_id in set(features["sample_id"])]
    samples = [type("S", (), {"sample_id": r.sample_id})() for r in scored]
    write_json_atomic(d / "manifest.json", {
        "model": "test", "description": {"model_weights": "test"}, "records": records_summary(records, samples, hashes),
        "structure": {"num_hidden_layers": n_layers, "layers_prefix": "model.layers", "targets": []}})
    return d


def write_result(d: Path, *, variant: str = "resofilter", keep_ratio: float = 0.5, seed: int = 0,
                 accs: dict | None = None, select: dict | None = None, setting: dict | None = None,
                 steps: int | None = None, **fields) -> Path:
    """A finished run's ``results.json`` as the run writes it (a typed RunResult), with test values;
    ``setting`` defaults to the fields a table row is told apart by."""
    from resofilter.reporting.results import RunResult

    base = {"scorer": "resofilter", "budget": "steps", "direction": "drop_high",
            "layers": {"modules": ["mlp.up_proj"], "indices": [-1]}, "statistic": "mean_abs", "step": "adamw",
            "build": None, "model": "model", "train_model": "model", "data": {}, "eval_protocols": {},
            "total_time_s": 10.0, "base_model": None, "choices": None, "environment": {}}
    base.update(fields)
    stages = {"score": {"cached": True, "time_s": 1.0}, "select": {"n_out": 50, "time_s": 1.0, **(select or {})},
              "finetune": {"time_s": 1.0, **({"steps": steps} if steps is not None else {})},
              "evaluate": {"time_s": 1.0}}
    if setting is None:
        setting = {"variant_name": variant, "scorer.name": base["scorer"], "selection.keep_ratio": keep_ratio,
                   "layers.modules": base["layers"]["modules"], "layers.indices": base["layers"]["indices"],
                   "statistic.name": base["statistic"], "step.name": base["step"]}
    d.mkdir(parents=True, exist_ok=True)
    RunResult(variant=variant, keep_ratio=keep_ratio, seed=seed, eval=accs or {"math_synth": 0.25}, stages=stages,
              setting=setting, **base).write(d / "results.json")
    return d
