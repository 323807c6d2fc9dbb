"""The features' identity is derived from the score spec: changing any identity field changes the key,
changing a field declared runtime does not (issue 24)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from resofilter.identity import identity_fields, identity_of, runtime_field
from resofilter.stages import specs
from resofilter.stages.score import ScoreSpec
from tests.conftest import compose_cfg

# The fields left out of the features' key, each a decision: how the pass is cut up or shown, the checks
# run on its result, where things are remembered, the resolved config kept for the record.
RUNTIME = {
    "settings.chunk_elements", "settings.quantile_hold_elements", "settings.logits_chunk_elements",
    "settings.recompute_layers",
    "settings.mmap_threshold", "settings.batch_size",
    "settings.max_tokens_per_batch", "settings.shard_size", "settings.progress_bar",
    "declared_depth", "check", "trainer", "cache_dir", "device_map", "config",
}


def leaves(spec: Any, prefix: str = "") -> list[tuple[str, bool]]:
    """Every field path of a (nested) spec and whether it is an identity field."""
    ident = {f.name for f in identity_fields(spec)}
    out = []
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if dataclasses.is_dataclass(v) and f.name in ident:
            out += leaves(v, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f.name in ident))
    return out


def other(v: Any) -> Any:
    """A value of the same kind that differs from ``v``."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    if isinstance(v, float):
        return v * 2 + 1
    if isinstance(v, str):
        return v + "_other"
    if isinstance(v, torch.dtype):
        return torch.float16 if v != torch.float16 else torch.float64
    if isinstance(v, tuple | list):
        return type(v)([*v, other(v[0]) if v else 1])
    if isinstance(v, dict):
        return {**v, "_other": 1}
    if v is None:
        return 1
    if dataclasses.is_dataclass(v):  # a runtime field holding a spec: change its first field
        first = dataclasses.fields(v)[0].name
        return dataclasses.replace(v, **{first: other(getattr(v, first))})
    raise TypeError(f"no other value for {type(v).__name__}")


def changed(spec: Any, path: str) -> Any:
    head, _, rest = path.partition(".")
    v = getattr(spec, head)
    return dataclasses.replace(spec, **{head: changed(v, rest) if rest else other(v)})


@pytest.fixture(scope="module")
def spec() -> ScoreSpec:
    return specs.score_spec(compose_cfg(["score.sketch.enabled=true", "data.answer_pattern='#### (.*)'"], "score"))


def test_every_identity_field_changes_the_key_and_no_runtime_field_does(spec):
    base = identity_of(spec)
    paths = leaves(spec)
    assert {p for p, ident in paths if not ident} == RUNTIME  # a new runtime field is a reviewed decision
    assert len([p for p, ident in paths if ident]) >= 20  # dtype, step.*, settings.*, tokenize.*, sketch.* …
    for path, ident in paths:
        after = identity_of(changed(spec, path))
        assert (after != base) == ident, f"{path}: identity field {ident}, key changed {after != base}"


def test_a_new_field_is_in_the_identity_unless_declared_runtime():
    @dataclasses.dataclass(frozen=True)
    class Spec:
        lr: float
        new_setting: int = 0  # added later, nobody touched a key list
        batch: int = runtime_field(8)

    assert identity_of(Spec(1e-5)) == {"lr": 1e-5, "new_setting": 0}
    assert identity_of(Spec(1e-5, new_setting=1)) != identity_of(Spec(1e-5))
    assert identity_of(Spec(1e-5, batch=64)) == identity_of(Spec(1e-5))


def test_settings_that_mean_nothing_in_a_mode_are_normalized_out_of_the_spec():
    """The literal loop's dtype in fast mode and a disabled sketch's sizes do not split the cache."""
    a = specs.score_spec(compose_cfg(["score.sketch.enabled=false"], "score"))
    b = specs.score_spec(compose_cfg(["score.sketch.enabled=false", "score.literal_dtype=float32",
                                        "score.sketch.k_out=4"], "score"))
    assert identity_of(a) == identity_of(b)
    c = specs.score_spec(compose_cfg(["score.mode=literal", "score.literal_dtype=float32"], "score"))
    assert identity_of(c)["settings"]["literal_dtype"] == "float32"


def test_identity_of_refuses_values_without_a_plain_form():
    with pytest.raises(TypeError, match="no plain identity"):
        identity_of({"model": object()})


# One registry per plug-in kind: the config's choices are the registry's keys, adding one is one function.

def test_every_registered_scorer_has_its_config_file_and_every_file_a_scorer():
    from pathlib import Path

    import yaml

    from resofilter.selection.scorers import SCORERS

    conf = Path(__file__).parents[1] / "conf" / "scorer"
    named = {yaml.safe_load(p.read_text())["name"] for p in conf.glob("*.yaml")}
    assert named == set(SCORERS)


def test_adding_a_scorer_is_one_registered_builder(monkeypatch):
    """A new scorer registered in one place is built by name and accepted by the config check."""
    import numpy as np
    import pandas as pd

    from resofilter.errors import ConfigError
    from resofilter.selection import scorers
    from resofilter.stages.config_check import validate

    monkeypatch.setattr(scorers, "SCORERS", dict(scorers.SCORERS))
    import resofilter.stages.config_check as cc
    monkeypatch.setattr(cc, "SCORERS", scorers.SCORERS)

    @scorers.register_scorer("longest_query")
    def _(c, ctx):
        return scorers.ColumnScorer("longest_query", "n_tokens", c.get("bad_end", "high"))

    s = scorers.build_scorer({"name": "longest_query"}, {"modules": [], "indices": [-1]}, "mean_abs", 4)
    assert np.array_equal(s.scores(scorers.ScoredPool(pd.DataFrame({"n_tokens": [3, 1, 2]}), 4)), [3, 1, 2])
    validate(compose_cfg(["scorer.name=longest_query"]))  # no ConfigError
    with pytest.raises(ConfigError, match="scorer.name"):
        validate(compose_cfg(["scorer.name=nonexistent"]))
    with pytest.raises(ValueError, match="twice"):
        scorers.register_scorer("longest_query")(lambda c, ctx: s)


def test_adding_a_step_optimizer_is_one_registered_closed_form(monkeypatch):
    """A registered step (signSGD: ΔW = −lr·sign(G)) is scored by name and its literal optimizer is the
    oracle: the closed form equals one real torch step of it."""
    from resofilter.features import closed_form as cf

    monkeypatch.setattr(cf, "STEP_OPTIMIZERS", dict(cf.STEP_OPTIMIZERS))

    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self):
            for g in self.param_groups:
                for p in g["params"]:
                    p.add_(p.grad.sign(), alpha=-g["lr"])

    @cf.register_step_optimizer("signsgd", lambda p, s: SignSGD(p, s.lr), needs_eps=False)
    def _(grad, weight, step):
        return -step.lr * grad.sign()

    step = cf.StepConfig(name="signsgd", lr=0.1, eps=None)
    w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    g = torch.randn(3, 4, dtype=torch.float64)
    before = w.detach().clone()
    w.grad = g.clone()
    step.make_optimizer([w]).step()
    torch.testing.assert_close(w.detach() - before, cf.one_step_update(g, before, step), rtol=0, atol=1e-15)
    with pytest.raises(Exception, match="step.name"):
        cf.one_step_update(g, before, cf.StepConfig(name="nonexistent"))


def test_adding_an_extractor_is_one_registered_builder(monkeypatch, tokenizer):
    """A registered extractor is chosen by ``score.mode``: the config check accepts its name, the score
    stage's settings reach it, and the one-step scorer it builds is what scoring runs."""
    import resofilter.stages.config_check as cc
    from resofilter.errors import ConfigError
    from resofilter.features import extract
    from resofilter.features.fast import ChunkedHeadLoss, FastScorer
    from resofilter.features.targets import find_targets
    from resofilter.stages.config_check import validate
    from tests.conftest import tiny

    monkeypatch.setattr(extract, "EXTRACTORS", dict(extract.EXTRACTORS))
    monkeypatch.setattr(cc, "EXTRACTORS", extract.EXTRACTORS)
    seen = []

    @extract.register_extractor("whole_logits")
    def _(model, targets, step, settings):  # the fast scorer on the model's own (B, T, V) logits
        seen.append((settings.mode, len(targets)))
        return extract.fast_extractor(model, targets, step, dataclasses.replace(settings, logits_chunk_elements=0))

    validate(compose_cfg(["score.mode=whole_logits"]))  # no ConfigError
    with pytest.raises(ConfigError, match="score.mode"):
        validate(compose_cfg(["score.mode=nonexistent"]))
    spec = specs.score_spec(compose_cfg(["score.mode=whole_logits"], "score"))
    model = tiny("llama", tokenizer, seed=4)
    scorer = extract.update_scorer(model, find_targets(model, ["mlp.up_proj"], [-1]), spec.step, spec.settings)
    assert isinstance(scorer, FastScorer) and scorer.head_loss is None and seen == [("whole_logits", 1)]
    assert isinstance(extract.update_scorer(model, find_targets(model, ["mlp.up_proj"], [-1]), spec.step,
                                            dataclasses.replace(spec.settings, mode="fast")).head_loss,
                      ChunkedHeadLoss)  # the shipped one slices the logits
    with pytest.raises(ValueError, match="twice"):
        extract.register_extractor("fast")(extract.fast_extractor)


def test_the_finetune_key_is_every_identity_field_of_its_spec():
    """The fine-tuning's resume / reuse key: every FinetuneSpec field but the driving and logging ones."""

    ft = specs.finetune_spec(compose_cfg([]))
    base = identity_of(ft)
    paths = leaves(ft)
    assert {p for p, ident in paths if not ident} == {"trainer", "logger", "checkpoint_every_n_steps"}
    for path, ident in paths:
        assert (identity_of(changed(ft, path)) != base) == ident, path
