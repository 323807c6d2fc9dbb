"""Every shipped config composes and validates (big models included, without weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from resofilter.cli import CONF_DIR
from resofilter.errors import ConfigError
from resofilter.features.targets import resolve_indices
from resofilter.stages.config_check import validate
from resofilter.stages.context import eval_sets
from tests.conftest import compose_cfg

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


GROUPS = ["model", "data", "template", "layers", "candidates", "statistic", "step", "scorer", "selection",
          "finetune", "eval", "trainer", "logger", "variant"]
NEEDS_PATH = {"data": {"metamathqa": ["data.path=/x.jsonl"], "jsonl": ["data.path=/x.jsonl"]},
              "scorer": {"ifd": ["score.ifd=true"]}}  # what scorer=ifd declares it reads (variant=ifd50 sets it)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    extra = NEEDS_PATH.get(group, {}).get(option, [])
    overrides = [f"{group}={option}", *extra]
    cfg = compose_cfg(overrides)
    OmegaConf.resolve(cfg)
    validate(cfg)


def test_gemma2_2b_paper_config_states_what_matters():
    cfg = compose_cfg(["model=gemma2_2b"])
    validate(cfg)
    assert cfg.model.name_or_path == "google/gemma-2-2b"
    assert cfg.model.attn_implementation == "eager"
    assert cfg.model.dtype == "bfloat16"
    assert resolve_indices(cfg.layers.indices, cfg.model.num_hidden_layers, "k") == [23, 24, 25]


def test_paper_experiment_evaluates_gsm8k_and_math():
    cfg = compose_cfg(["experiment=paper_gemma2_2b_metamathqa", "data.path=/d.json"])
    validate(cfg)
    sets = eval_sets(cfg)
    assert list(sets) == ["gsm8k", "math", "gsm8k_cot"] and sets["math"][1] == "evals.math"
    assert sets["math"][0].extractor._target_.endswith("MathExtractor")
    # GSM8K under both protocols: zero-shot in the training template, and 8-shot chain of thought
    assert sets["gsm8k"][0].protocol == "zero_shot" and sets["math"][0].protocol == "zero_shot"
    cot = sets["gsm8k_cot"][0]
    assert (cot.protocol, cot.few_shot, cot.path) == ("few_shot_cot", 8, sets["gsm8k"][0].path)


def test_two_eval_sets_with_one_name_are_refused():
    cfg = compose_cfg(["+eval@evals.again=math_synth"])
    with pytest.raises(ConfigError, match=r"evals\.again\.name"):
        validate(cfg)


def test_data_configs_map_the_paper_fields():
    mm = compose_cfg(["data=metamathqa", "data.path=/d.json"]).data
    assert (mm.query_field, mm.response_field) == ("query", "response")
    g = compose_cfg(["data=gsm8k"]).data
    assert (g.query_field, g.response_field) == ("question", "answer")
    with pytest.raises(Exception, match="Missing mandatory value"):
        OmegaConf.to_container(compose_cfg(["data=metamathqa"]).data, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("key,value,match", [
    ("selection.keep_ratio", 0.0, "selection.keep_ratio"),
    ("selection.keep_ratio", 1.5, "selection.keep_ratio"),
    ("selection.direction", "sideways", "selection.direction"),
    ("layers.indices", [7], "layers.indices"),
    ("step.name", "lion", "step.name"),
    ("statistic.name", "median", "statistic.name"),
    ("score.mode", "approx", "score.mode"),
    ("model.dtype", "float8", "model.dtype"),
    ("scorer.name", "oracle", "scorer.name"),
    ("score.batch_size", 0, "score.batch_size"),
    ("score.logits_chunk_elements", -1, "score.logits_chunk_elements"),
    ("score.mmap_threshold", 0, "score.mmap_threshold"),
    ("score.recompute_layers", "yes", "score.recompute_layers"),
    ("score.device_map", "everywhere", "score.device_map"),
    ("score.device_map", [0, 1], "score.device_map"),
    ("build", -1, "build"),
    ("build", "b1", "build"),
    ("model.embedded.init_seed", 3, "model.embedded.init_seed"),  # a recipe's own seed: the build sets it now
    ("model.embedded.base_training.seed", 3, "model.embedded.base_training.seed"),
])
def test_invalid_values_name_their_key(key, value, match):
    cfg = compose_cfg()
    with open_dict(cfg):
        OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        validate(cfg)


def test_a_build_needs_an_embedded_model(tiny_model_dir):
    from_path = ["model.embedded=null", f"model.name_or_path={tiny_model_dir}", "model.num_hidden_layers=4"]
    validate(compose_cfg([*from_path, "build=0"]))
    with pytest.raises(ConfigError, match=r"build.*model\.name_or_path"):
        validate(compose_cfg([*from_path, "build=2"]))
    validate(compose_cfg([*from_path, "build=2", "model@train_model=tiny_llama_8l"]))  # the trained one is embedded


def test_keep_ratio_one_is_valid():
    validate(compose_cfg(["selection.keep_ratio=1.0"]))


def test_resolve_indices():
    assert resolve_indices([-3, -2, -1], 26, "k") == [23, 24, 25]
    assert resolve_indices("all", 3, "k") == [0, 1, 2]
    assert resolve_indices([0, -4], 4, "k") == [0]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_indices([4], 4, "k")


@pytest.mark.parametrize("override,key", [
    ("+finetune.optimizer.weight_decya=0.1", "finetune.optimizer"),
    ("finetune.optimizer._target_=torch.optim.NoSuchOptimizer", "finetune.optimizer._target_"),
    ("+finetune.lora.rank=8", "finetune.lora"),
])
def test_finetune_kwargs_are_bound_before_anything_runs(override, key):
    """Issue 12: a typo in the optimizer or LoRA section fails validation, not after scoring."""
    extra = ["finetune=lora"] if "lora" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg([*extra, override]))
    validate(compose_cfg(extra))


def test_unknown_score_mode_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"score\.mode.*fast.*literal"):
        validate(compose_cfg(["score.mode=exact"]))


def test_count_above_bounds_follow_the_step_lr():
    from resofilter.stages.config_check import count_above_bounds, statistic_names

    cfg = compose_cfg([])
    assert count_above_bounds(cfg) == [1e-6, 5e-6, 9e-6]  # 0.1, 0.5, 0.9 × lr 1e-5
    assert "count_above_5e-06" in statistic_names(cfg)
    assert count_above_bounds(compose_cfg(["step.lr=2e-5"])) == [2e-6, 1e-5, 1.8e-5]
