"""Gradient sketches against brute-force per-sample gradients, the literal scorer, and their bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from resofilter.data.tokenize import IGNORE_INDEX
from resofilter.features.closed_form import StepConfig, one_step_update
from resofilter.features.fast import FastScorer
from resofilter.features.literal import LiteralScorer
from resofilter.features.sketch import Projector, SketchSpec, cosine_rows, projection, rms_error_bound
from resofilter.features.targets import find_targets
from tests.conftest import tiny
from tests.helpers.common import _batch

STEP = StepConfig("adamw", lr=1e-5, weight_decay=0.01, eps=1e-8)


def _brute_grads(model, targets, samples):
    """Each sample's weight gradients, one sample at a time through plain autograd (no hooks)."""
    out = []
    weights = [t.module.weight for t in targets]
    for s in samples:
        for w in weights:
            w.requires_grad_(True)
        labels = torch.tensor(s.labels[1:])
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
        resp = labels != IGNORE_INDEX
        logp = torch.log_softmax(logits, -1)[resp].gather(1, labels[resp].unsqueeze(1))
        out.append(dict(zip([t.name for t in targets], torch.autograd.grad(-logp.mean(), weights), strict=True)))
        for w in weights:
            w.requires_grad_(False)
    return out


def test_projection_is_a_pure_function_of_seed_name_and_size():
    a = projection("layers.3.mlp.up_proj/out", 8, 40, seed=0, dtype=torch.float64)
    torch.testing.assert_close(a, projection("layers.3.mlp.up_proj/out", 8, 40, seed=0, dtype=torch.float64))
    assert not torch.allclose(a, projection("layers.3.mlp.up_proj/out", 8, 40, seed=1, dtype=torch.float64))
    assert not torch.allclose(a, projection("layers.2.mlp.up_proj/out", 8, 40, seed=0, dtype=torch.float64))
    # entries N(0, 1/k): E[PᵀP] = I, checked on a large draw
    big = projection("x", 4000, 6, seed=0, dtype=torch.float64)
    torch.testing.assert_close(big.T @ big, torch.eye(6, dtype=torch.float64), atol=0.08, rtol=0)


@pytest.mark.parametrize("of", ["gradient", "update"])
def test_fast_sketch_equals_projection_of_brute_force_gradient_and_literal_scorer(of, tokenizer, gsm8k_records):
    model = tiny("llama", tokenizer, seed=3).to(torch.float64)
    targets = find_targets(model, ["mlp.up_proj"], "all")
    spec = SketchSpec(enabled=True, k_out=5, k_in=7, seed=11, of=of, indices=[-2, -1])
    batch, samples = _batch(tokenizer, gsm8k_records, n=6)
    fast = FastScorer(model, targets, STEP, ["mean_abs"], chunk_elements=200, sketch=spec).score_batch(batch)
    sketched = [t for t in targets if t.layer >= 2]
    assert fast.sketch.shape == (6, len(sketched) * 5 * 7)
    proj = Projector(spec, {t.name: tuple(t.module.weight.shape) for t in sketched}, torch.float64)
    for b, grads in enumerate(_brute_grads(model, sketched, samples)):
        parts = []
        for t in sketched:
            m = grads[t.name] if of == "gradient" else one_step_update(grads[t.name], t.module.weight.detach(), STEP)
            parts.append((proj.p_out[t.name] @ m @ proj.p_in[t.name].T).flatten())  # P_out · M · P_inᵀ literally
        torch.testing.assert_close(fast.sketch[b], torch.cat(parts), rtol=1e-8, atol=1e-13)
    literal = LiteralScorer(model, targets, STEP, ["mean_abs"], dtype=torch.float64, sketch=spec).score_batch(batch)
    torch.testing.assert_close(fast.sketch, literal.sketch, rtol=1e-6, atol=1e-12)


def test_sketch_inner_products_within_the_documented_bound(tokenizer, gsm8k_records):
    """Relative error of ⟨S_a,S_b⟩ vs ⟨G_a,G_b⟩ over all pairs × projection seeds: RMS under
    rms_error_bound(k, k) at every k, and shrinking as k grows."""
    model = tiny("llama", tokenizer, seed=4, hidden_size=48, intermediate_size=96).to(torch.float64)
    target = find_targets(model, ["mlp.up_proj"], [-1])[0]
    _, samples = _batch(tokenizer, gsm8k_records, n=10)
    grads = [g[target.name] for g in _brute_grads(model, [target], samples)]
    shape = tuple(target.module.weight.shape)
    rms = {}
    for k in (4, 16, 32):
        errors = []
        for seed in range(12):
            proj = Projector(SketchSpec(enabled=True, k_out=k, k_in=k, seed=seed), {target.name: shape},
                             torch.float64)
            sk = [proj.of_matrix(target.name, g.unsqueeze(0))[0] for g in grads]
            for a, b in itertools.combinations(range(len(grads)), 2):
                true = float((grads[a] * grads[b]).sum())
                est = float(sk[a] @ sk[b])
                errors.append((est - true) / float(grads[a].norm() * grads[b].norm()))
        rms[k] = float(np.sqrt(np.mean(np.square(errors))))
        assert rms[k] <= rms_error_bound(k, k), (k, rms[k], rms_error_bound(k, k))
    assert rms[4] > rms[16] > rms[32]  # the error falls with the sketch size


def test_cosine_rows_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [0.0, -3.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [[1, 0], [2 ** -0.5, -(2 ** -0.5)], [0, 0]], atol=1e-15)


def test_merged_shards_without_sketches_are_an_error_naming_the_shards(tmp_path):
    import pandas as pd

    from resofilter.errors import ResoFilterError
    from resofilter.features.extract import stack_sketches

    good = pd.DataFrame({"sample_id": ["a", "b"], "sketch": [np.arange(4.0), np.ones(4)]})
    out = stack_sketches(good.copy(), 4, tmp_path)
    assert out.dtype == np.float32 and out.tolist() == [[0, 1, 2, 3], [1, 1, 1, 1]]
    mixed = pd.DataFrame({"sample_id": ["a", "b"], "sketch": [None, np.ones(4)]})
    with pytest.raises(ResoFilterError, match=r"1 of 2 merged rows .*row 0.*delete"):
        stack_sketches(mixed, 4, tmp_path)
    with pytest.raises(ResoFilterError, match="2 of 2"):
        stack_sketches(pd.DataFrame({"sample_id": ["a", "b"]}), 4, tmp_path)
    with pytest.raises(ResoFilterError, match="4-value"):
        stack_sketches(pd.DataFrame({"sample_id": ["a"], "sketch": [np.ones(3)]}), 4, tmp_path)
