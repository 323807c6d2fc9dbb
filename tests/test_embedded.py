"""The embedded default: benchmark + tokenizer + tiny Llama built, cached and loaded like a hub model."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resofilter.commands import prepare
from resofilter.stages import context
from tests.conftest import compose_cfg, shrink
from tests.helpers.common import TINY


def test_prepare_builds_caches_and_reports(tmp_path, caplog):
    cfg = shrink(compose_cfg([], "prepare"), tmp_path, **TINY)
    report = prepare(cfg)
    model_dir = report["model"]
    build = json.loads(open(f"{model_dir}/build.json").read())
    assert build["n_parameters"] > 0 and set(build["accuracy"]) == {"base_test", "test"}
    assert report["tokenized"]["n_out"] == 60 and report["benchmark"]["counts"]["pool"] == 60
    # an ordinary HF directory, loaded by the Auto classes
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 4
    ids = tok("Mia has 7 shells.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    assert tok.convert_ids_to_tokens(tok("17", add_special_tokens=False)["input_ids"]) == ["1", "7"]
    assert torch.isfinite(model(ids).logits).all()
    # cached: a second resolution reuses the directory without training
    caplog.clear()
    with caplog.at_level("INFO"):
        assert context.ensure_model(cfg) == model_dir
    assert "cached" in caplog.text and "base training" not in caplog.text
    # a display-only setting does not invalidate the cache; a training setting does
    cfg.model.embedded.base_training.progress_bar = True
    assert context.ensure_model(cfg) == model_dir
    cfg.model.embedded.base_training.steps = 5
    assert context.ensure_model(cfg) != model_dir


def test_build_seeds_both_the_init_and_the_base_training(tmp_path, caplog):
    cfg = shrink(compose_cfg([], "prepare"), tmp_path, **TINY)
    zero = context.ensure_model(cfg)
    cfg.build = 1
    with caplog.at_level("INFO"):  # the message is formatted: pytest fails the test on a misfit argument
        one = context.ensure_model(cfg)
    assert "embedded base model (build 1) built in" in caplog.text
    assert one != zero and context.ensure_model(cfg) == one  # its own cache entry, reused
    build = json.loads(open(f"{one}/build.json").read())
    e = build["embedded"]
    assert build["build"] == 1 and e["init_seed"] == 1 and e["base_training"]["seed"] == 1
    w0 = AutoModelForCausalLM.from_pretrained(zero).model.layers[-1].mlp.up_proj.weight
    w1 = AutoModelForCausalLM.from_pretrained(one).model.layers[-1].mlp.up_proj.weight
    assert not torch.equal(w0, w1)
