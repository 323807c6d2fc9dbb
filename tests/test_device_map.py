"""A model that does not fit one device: ``score.device_map`` splits its layers over several (issue 25).

No second device exists here, so the split runs through accelerate's device hooks on the CPU
(``main_device="cpu"``: placement hooks, no offload) — the same hooks that move hidden states
between GPUs — and the scores must not change by a bit.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from accelerate import dispatch_model

from resofilter.commands import score
from resofilter.errors import ConfigError
from resofilter.features.extract import FeatureModule
from resofilter.features.fast import FastScorer, split_devices
from resofilter.features.sketch import SketchSpec
from resofilter.features.targets import find_targets
from resofilter.stages import score as stage
from resofilter.stages.config_check import validate
from tests.conftest import compose_cfg, tiny
from tests.helpers.common import STEPS, _batch, score_args


def placed(model: torch.nn.Module) -> torch.nn.Module:
    """Every decoder layer, the embeddings, norm and head a separately hooked placement (all on the CPU)."""
    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_placed_model_scores_the_same_to_the_last_bit(arch, tokenizer, gsm8k_records):
    model = tiny(arch, tokenizer, seed=2)
    split = placed(copy.deepcopy(model))
    assert split_devices(split) == {"cpu"} and hasattr(split.model.layers[0], "_hf_hook")
    batch, _ = _batch(tokenizer, gsm8k_records, n=6)
    out = []
    for m in (model, split):
        targets = find_targets(m, ["mlp.up_proj", "self_attn.o_proj"], [-3, -2, -1])
        scorer = FastScorer(m, targets, STEPS["adamw"], ["mean_abs", "l2", "max_abs"], recompute=True,
                            logits_chunk_elements=3 * 6 * len(tokenizer), sketch=SketchSpec(enabled=True, k_out=4,
                                                                                              k_in=4))
        out.append(scorer.score_batch(batch))
    whole, parts = out
    for name, stats in whole.stats.items():
        for stat, v in stats.items():
            assert torch.equal(parts.stats[name][stat], v), (name, stat)
    assert torch.equal(parts.losses, whole.losses) and torch.equal(parts.sketch, whole.sketch)
    assert torch.equal(parts.token_losses, whole.token_losses)
    # the recomputation's wrapper came off and accelerate's stayed on
    assert "forward" in vars(split.model.layers[-1]) and "forward" not in vars(model.model.layers[-1])


def test_the_trainer_does_not_gather_a_placed_model(tokenizer):
    """Lightning moves its module to its one device; a placed model is kept out of the module's children."""
    plain = tiny("llama", tokenizer)
    assert any(c is plain for c in FeatureModule(plain, scorer=None).children())
    split = placed(tiny("llama", tokenizer))
    module = FeatureModule(split, scorer=None)
    assert module.model is split and not any(True for _ in module.children())
    module.to("meta")  # what the trainer's move would do to a child
    assert all(p.device.type == "cpu" for p in split.parameters())


def test_the_score_stage_places_the_model_and_checks_it_against_a_fresh_float64_one(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    calls = []
    real = stage.load_causal_lm

    def load(path, dtype, attn=None, **kw):
        calls.append((str(dtype).removeprefix("torch."), kw.get("device_map")))
        model = real(path, dtype, attn)
        return placed(model) if kw.get("device_map") is not None else model  # what accelerate does on GPUs

    monkeypatch.setattr(stage, "load_causal_lm", load)
    args = ["data.max_samples=16", "score.precision_check.n_samples=6"]
    score(compose_cfg(score_args(tiny_model_dir, tmp_path / "whole", *args), "score"))
    score(compose_cfg(score_args(tiny_model_dir, tmp_path / "split", *args, "score.device_map=auto"), "score"))
    # the split run loads with the device map, and its float64 reference afresh (not a copy of the placed model)
    assert calls == [("float32", None), ("float32", "auto"), ("float64", None)]
    whole, split = (pd.read_parquet(tmp_path / d / "features.parquet") for d in ("whole", "split"))
    pd.testing.assert_frame_equal(split, whole, check_exact=True)


def test_device_map_configs():
    validate(compose_cfg(["model=gemma2_2b", "score.device_map=auto"], "score"))
    validate(compose_cfg(["score.device_map={model.embed_tokens:0,model.layers:1,lm_head:1}"], "score"))
    with pytest.raises(ConfigError, match=r"score\.device_map.*literal"):
        validate(compose_cfg(["score.device_map=auto", "score.mode=literal"], "score"))
    with pytest.raises(ConfigError, match=r"score\.device_map.*trainer\.devices=2"):
        validate(compose_cfg(["score.device_map=balanced", "trainer=gpu", "trainer.devices=2"], "score"))
