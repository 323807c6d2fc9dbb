"""Closed-form step, statistics and per-sample gradients against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resofilter.data.tokenize import IGNORE_INDEX, Collator
from resofilter.errors import ResoFilterError
from resofilter.features.closed_form import StepConfig, one_step_update
from resofilter.features.fast import FastScorer
from resofilter.features.literal import LiteralScorer
from resofilter.features.statistics import UpdateStatistics
from resofilter.features.targets import find_targets
from tests.conftest import tiny
from tests.helpers.common import STEPS, _batch

ALL_STATS = ["mean_abs", "l2", "max_abs", "std", "don", "cos_to_weight", "quantiles", "count_above"]


@pytest.mark.parametrize("name", list(STEPS))
def test_closed_form_equals_the_literal_torch_step(name):
    torch.manual_seed(0)
    w0 = torch.randn(7, 5, dtype=torch.float64)
    g = torch.randn(7, 5, dtype=torch.float64) * torch.logspace(-12, 0, 35, dtype=torch.float64).view(7, 5)
    p = torch.nn.Parameter(w0.clone())
    opt = STEPS[name].make_optimizer([p])
    p.grad = g.clone()
    opt.step()
    expected = p.detach() - w0
    got = one_step_update(g, w0, STEPS[name])
    # the literal diff W_after − W_before carries the rounding of W itself (a few ulps of |W| ≈ 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=4 * torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("hold", [1 << 21, 0], ids=["quantiles-held", "quantiles-multipass"])
def test_statistics_in_row_blocks_equal_numpy_brute_force(hold):
    rng = np.random.default_rng(0)
    B, R, C = 3, 11, 6
    dw = rng.normal(size=(B, R, C)) * 1e-5
    w = rng.normal(size=(R, C)) * 0.02
    acc = UpdateStatistics(B, (R, C), ALL_STATS, quantiles=[0.0, 0.5, 0.9, 1.0], count_above=[5e-6, 1e-5],
                           hold_elements=hold)
    assert acc.hold == bool(hold)
    for r0 in range(0, R, 4):  # uneven blocks: 4, 4, 3 rows
        acc.update(torch.from_numpy(dw[:, r0:r0 + 4]), torch.from_numpy(w[r0:r0 + 4]))
    blocks = lambda: (torch.from_numpy(dw[:, r0:r0 + 4]) for r0 in range(0, R, 4))  # noqa: E731
    got = {k: v.numpy() for k, v in acc.result(blocks=blocks).items()}
    for b in range(B):
        d = dw[b]
        exp = {
            "mean_abs": np.abs(d).mean(), "l2": np.sqrt((d ** 2).sum()), "max_abs": np.abs(d).max(),
            "std": d.std(), "don": np.linalg.norm(w + d) - np.linalg.norm(w),
            "cos_to_weight": (w * d).sum() / np.linalg.norm(w) / np.linalg.norm(d),
            "q0": np.abs(d).min(), "q0.5": np.quantile(np.abs(d), 0.5), "q0.9": np.quantile(np.abs(d), 0.9),
            "q1": np.abs(d).max(),
            "count_above_5e-06": (np.abs(d) > 5e-6).sum(), "count_above_1e-05": (np.abs(d) > 1e-5).sum(),
        }
        for k, v in exp.items():
            np.testing.assert_allclose(got[k][b], v, rtol=1e-9, err_msg=k)
    assert set(got) == set(exp)




def test_batched_per_sample_gradient_equals_one_sample_autograd(tokenizer, gsm8k_records):
    model = tiny("llama", tokenizer).to(torch.float64)
    batch, samples = _batch(tokenizer, gsm8k_records)
    targets = find_targets(model, ["mlp.up_proj", "self_attn.*_proj"], [-2, -1])
    fast = FastScorer(model, targets, STEPS["sgd"], ["l2"], chunk_elements=100)
    grads = fast.per_sample_grads(batch)
    for b, s in enumerate(samples):
        ids = torch.tensor([s.input_ids])
        labels = torch.tensor(s.labels[1:])
        weights = [t.module.weight for t in targets]
        for w in weights:
            w.requires_grad_(True)
        logits = model(input_ids=ids).logits[0, :-1]
        resp = labels != IGNORE_INDEX  # the loss counts response tokens only, by hand
        logp = torch.log_softmax(logits, -1)[resp].gather(1, labels[resp].unsqueeze(1))
        ref = torch.autograd.grad(-logp.mean(), weights)
        for w in weights:
            w.requires_grad_(False)
        for t, r in zip(targets, ref, strict=True):
            torch.testing.assert_close(grads[t.name][b], r, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("step", list(STEPS))
def test_fast_equals_exact_oracle_in_float64(arch, step, tokenizer, gsm8k_records):
    model = tiny(arch, tokenizer, seed=1).to(torch.float64)
    st = StepConfig(step, lr=1e-5, weight_decay=0.01 if step != "sgd" else 0.0, eps=1e-8)
    targets = find_targets(model, ["mlp.up_proj"], [-3, -2, -1])
    stats = ["mean_abs", "l2", "max_abs", "std", "don", "cos_to_weight"]
    fast = FastScorer(model, targets, st, stats, chunk_elements=1000)
    exact = LiteralScorer(model, targets, st, stats, dtype=torch.float64)
    batch, samples = _batch(tokenizer, gsm8k_records, n=8)
    if arch == "gemma2":  # transformers' gemma-2 mask overflows in float64 with padding: score one by one
        collate = Collator(tokenizer.pad_token_id)
        parts = [fast(collate([s])) for s in samples]
        f = {t.name: {k: torch.cat([p[0][t.name][k] for p in parts]) for k in stats} for t in targets}
    else:
        f, _, _ = fast(batch)
    e, _, _ = exact(batch)
    for t in targets:
        for k in stats:
            torch.testing.assert_close(f[t.name][k], e[t.name][k], rtol=1e-7, atol=0, msg=f"{t.name}/{k}")
    score_f = torch.stack([f[t.name]["mean_abs"] for t in targets]).mean(0)
    score_e = torch.stack([e[t.name]["mean_abs"] for t in targets]).mean(0)
    assert torch.equal(score_f.argsort(), score_e.argsort())
    assert score_f.std() > 0  # there is a ranking to agree on


def test_scores_do_not_depend_on_batch_composition_or_padding_side(tokenizer, gsm8k_records):
    model = tiny("llama", tokenizer, seed=2).to(torch.float64)
    targets = find_targets(model, ["mlp.up_proj"], "all")
    fast = FastScorer(model, targets, STEPS["adamw"], ["mean_abs", "l2"])
    batch, samples = _batch(tokenizer, gsm8k_records, n=8)
    full, losses, _ = fast(batch)
    left, _, _ = fast(Collator(tokenizer.pad_token_id, "left")(samples))
    pairs = [fast(Collator(tokenizer.pad_token_id)(samples[i:i + 2]))[0] for i in range(0, 8, 2)]
    for t in targets:
        for k in ("mean_abs", "l2"):
            torch.testing.assert_close(left[t.name][k], full[t.name][k], rtol=1e-10, atol=0)
            torch.testing.assert_close(torch.cat([p[t.name][k] for p in pairs]), full[t.name][k], rtol=1e-10, atol=0)


def test_prompt_tokens_carry_no_gradient(tokenizer, gsm8k_records):
    """Changing the prompt's *labels* changes nothing; unmasking them changes the score."""
    model = tiny("llama", tokenizer).to(torch.float64)
    targets = find_targets(model, ["mlp.up_proj"], [-1])
    fast = FastScorer(model, targets, STEPS["sgd"], ["l2"])
    batch, _ = _batch(tokenizer, gsm8k_records, n=3)
    base = fast(batch)[0][targets[0].name]["l2"]
    unmasked = dict(batch, labels=torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE_INDEX))
    changed = fast(unmasked)[0][targets[0].name]["l2"]
    assert not torch.allclose(base, changed)
    assert fast(dict(batch))[0][targets[0].name]["l2"].equal(base)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("positions", [1, 3])
def test_chunked_output_head_equals_whole_logits(arch, positions, tokenizer, gsm8k_records):
    """Loss and per-sample gradients from slices of positions = the model's own (B, T, V) logits."""
    dtype = torch.float64 if arch == "llama" else torch.float32  # gemma-2's mask overflows in float64
    model = tiny(arch, tokenizer, seed=4).to(dtype)
    targets = find_targets(model, ["mlp.up_proj"], [-2, -1])
    batch, _ = _batch(tokenizer, gsm8k_records, n=5)
    whole = FastScorer(model, targets, STEPS["sgd"], ["l2"], logits_chunk_elements=0)
    sliced = FastScorer(model, targets, STEPS["sgd"], ["l2"],
                        logits_chunk_elements=positions * 5 * model.config.vocab_size)
    assert sliced.head_loss.cap == getattr(model.config, "final_logit_softcapping", None)
    span = sliced.head_loss.chunk_elements // (5 * sliced.head_loss.vocab)
    assert span == positions < batch["input_ids"].shape[1] // 4  # really many slices
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    (_, loss_w, n_w), (_, loss_s, n_s) = whole(batch), sliced(batch)
    torch.testing.assert_close(loss_s, loss_w, rtol=rtol, atol=0)
    assert n_s.equal(n_w)
    gw, gs = whole.per_sample_grads(batch), sliced.per_sample_grads(batch)
    for name in gw:
        torch.testing.assert_close(gs[name], gw[name], rtol=rtol, atol=rtol * gw[name].abs().max().item())


def test_a_head_the_chunked_loss_does_not_know_is_refused(tokenizer, gsm8k_records):
    model = tiny("llama", tokenizer, seed=4)
    targets = find_targets(model, ["mlp.up_proj"], [-1])
    scorer = FastScorer(model, targets, STEPS["sgd"], ["l2"])
    scorer.head_loss.cap = 0.5  # as if the model soft-capped logits in a way the model itself does not
    batch, _ = _batch(tokenizer, gsm8k_records, n=2)
    with pytest.raises(ResoFilterError, match="logits_chunk_elements=0"):
        scorer(batch)


def test_bf16_model_statistics_come_from_fp32_gradients(tokenizer, gsm8k_records):
    model32 = tiny("llama", tokenizer, seed=3)
    model16 = tiny("llama", tokenizer, seed=3).to(torch.bfloat16)
    batch, _ = _batch(tokenizer, gsm8k_records, n=16)
    out = {}
    for name, m in (("fp32", model32), ("bf16", model16)):
        targets = find_targets(m, ["mlp.up_proj"], [-3, -2, -1])
        stats, _, _ = FastScorer(m, targets, STEPS["sgd"], ["l2", "mean_abs"])(batch)
        assert all(v.dtype == torch.float64 for s in stats.values() for v in s.values())
        out[name] = torch.stack([s["l2"] for s in stats.values()]).mean(0).numpy()
    from scipy.stats import spearmanr

    assert spearmanr(out["fp32"], out["bf16"]).statistic > 0.9
    assert np.abs(out["bf16"] / out["fp32"] - 1).max() < 0.1


@pytest.mark.parametrize("bins,gather", [(16, 1), (64, 7), (4096, 1 << 22)])
def test_block_quantiles_exact_with_ties_and_refinement(bins, gather):
    """Issue 11 finding 7: quantiles without holding ΔW whole, equal to numpy.quantile (ties, tiny bins)."""
    from resofilter.features.statistics import block_quantiles

    rng = np.random.default_rng(1)
    B, R, C = 3, 37, 11
    dw = rng.normal(size=(B, R, C)).astype(np.float32) * 1e-5
    dw[0, :20] = 1e-5  # a large block of ties (AdamW's saturated update)
    dw[1] = np.round(dw[1] * 1e6) / 1e6  # few distinct values
    dw[2, 0, 0] = 0.0
    qs = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    blocks = lambda: (torch.from_numpy(dw[:, r0:r0 + 5]) for r0 in range(0, R, 5))  # noqa: E731
    a = torch.from_numpy(np.abs(dw)).flatten(1).double()
    got = block_quantiles(blocks, qs, R * C, a.min(1).values, a.max(1).values, bins=bins, gather_elements=gather)
    for b in range(B):
        flat = np.abs(dw[b].astype(np.float64)).ravel()
        for q in qs:
            np.testing.assert_allclose(got[f"q{q:g}"][b].item(), np.quantile(flat, q), rtol=1e-12, atol=0,
                                       err_msg=f"sample {b} q{q}")


def test_a_new_statistic_is_one_registered_function():
    """Issue 12: a statistic of the kept sums is one decorated function (plus a conf/statistic file)."""
    from resofilter.features.statistics import BASIC, NEEDS, statistic
    from resofilter.stages.config_check import validate
    from tests.conftest import compose_cfg

    @statistic("mean_sq", needs=("sq_sum",))
    def mean_sq(m):
        """Σ ΔW² / n."""
        return m.sq_sum / m.n

    try:
        rng = np.random.default_rng(3)
        dw, w = rng.normal(size=(2, 5, 4)), rng.normal(size=(5, 4))
        acc = UpdateStatistics(2, (5, 4), ["mean_sq"])
        acc.update(torch.from_numpy(dw), torch.from_numpy(w))
        np.testing.assert_allclose(acc.result()["mean_sq"].numpy(), (dw ** 2).mean(axis=(1, 2)), rtol=1e-12)
        validate(compose_cfg(["score.statistics=[mean_abs,mean_sq]", "statistic.name=mean_sq"]))
        with pytest.raises(ValueError, match="registered twice"):
            statistic("mean_sq", needs=("sq_sum",))(mean_sq)
        with pytest.raises(ValueError, match="unknown sums"):
            statistic("mean_cube", needs=("cube_sum",))
    finally:
        del BASIC["mean_sq"], NEEDS["mean_sq"]


@pytest.mark.parametrize("stat", ALL_STATS)
def test_a_statistic_alone_is_bitwise_the_one_computed_beside_all_others(stat):
    """Issue 36: only the sums a statistic reads are accumulated; what it gives does not change by a bit."""
    from resofilter.features.statistics import NEEDS

    g = torch.Generator().manual_seed(5)
    dw, w = torch.randn(3, 10, 8, generator=g) * 1e-5, torch.randn(10, 8, generator=g) * 0.02

    def result(stats):
        acc = UpdateStatistics(3, (10, 8), stats, quantiles=[0.5, 0.9], count_above=[5e-6], hold_elements=0)
        for r0 in range(0, 10, 4):
            acc.update(dw[:, r0:r0 + 4], w[r0:r0 + 4])
        return acc, acc.result(blocks=lambda: (dw[:, r0:r0 + 4] for r0 in range(0, 10, 4)))

    alone, got = result([stat])
    _, everything = result(ALL_STATS)
    assert got and all(torch.equal(v, everything[k]) for k, v in got.items())
    assert alone.needs == NEEDS[stat]
    if stat == "mean_abs":  # the paper's statistic reads one sum: the others were never accumulated
        assert alone.needs == {"abs_sum"} and not alone.sq_sum.any() and not alone.dot_w.any()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recomputed_layers_give_the_same_gradients_to_the_last_bit(arch, dtype, tokenizer, gsm8k_records):
    """score.recompute_layers: the scored layers' activations recomputed in the backward change no bit of
    the per-sample gradients or the statistics (attention and MLP targets, several in the lowest layer)."""
    model = tiny(arch, tokenizer, seed=3).to(dtype)
    targets = find_targets(model, ["mlp.up_proj", "mlp.gate_proj", "self_attn.q_proj"], [-3, -1])
    batch, samples = _batch(tokenizer, gsm8k_records, n=1 if arch == "gemma2" and dtype == torch.float64 else 4)
    plain = FastScorer(model, targets, STEPS["adamw"], ["mean_abs", "l2"])
    again = FastScorer(model, targets, STEPS["adamw"], ["mean_abs", "l2"], recompute=True)
    g0, g1 = plain.per_sample_grads(batch), again.per_sample_grads(batch)
    s0, s1 = plain(batch)[0], again(batch)[0]
    for t in targets:
        assert torch.equal(g0[t.name], g1[t.name]), t.name
        assert g0[t.name].abs().sum() > 0  # a gradient to agree on
        for k in ("mean_abs", "l2"):
            assert torch.equal(s0[t.name][k], s1[t.name][k]), (t.name, k)
    decoder = model.get_decoder()
    assert all("forward" not in vars(layer) for layer in decoder.layers)  # the layers' own forward again


def test_the_mmap_threshold_is_applied_through_glibc():
    from resofilter.features import memory

    assert memory.set_mmap_threshold(None) is False  # null: the allocator is left alone
    if ctypes_glibc():
        assert memory.set_mmap_threshold(1 << 20) is True and (1 << 20) in memory._APPLIED


def ctypes_glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("name", list(STEPS))
def test_closed_form_in_place_is_bitwise_the_formula_and_leaves_a_kept_gradient_alone(name):
    """Issue 36: the fast path forms ΔW in the gradient's own storage; every element goes through the same
    roundings as the textbook expression, and a caller that keeps its gradient gets it back untouched."""
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(4, 6, 5, generator=g) * torch.logspace(-12, -4, 5)
    w = torch.randn(6, 5, generator=g) * 0.02
    st = STEPS[name]
    lr, wd, eps = st.lr, st.weight_decay, st.eps
    formula = {"sgd": lambda: -lr * (grad + wd * w),
               "adam": lambda: -lr * ((grad + wd * w) / ((grad + wd * w).abs() + eps)),
               "adamw": lambda: -lr * (grad / (grad.abs() + eps) + wd * w)}[name]()
    kept = grad.clone()
    assert torch.equal(one_step_update(grad, w, st), formula) and torch.equal(grad, kept)
    given = grad.clone()
    out = one_step_update(given, w, st, inplace=True)
    assert torch.equal(out, formula) and out.data_ptr() == given.data_ptr()


@pytest.mark.parametrize("group", [5, 2, 1, 0], ids=["batch", "pairs", "one", "multipass"])
def test_every_statistic_of_the_fast_pass_against_numpy_on_the_same_updates(group, tokenizer, gsm8k_records):
    """Issue 36: the fused statistics pass (row sums in one read, |ΔW| held per group of samples, counts by
    numpy) against numpy on the very ΔW it scores (per-sample gradients → the literal formula): the order
    statistics (quantiles, max, counts) to the bit, the sums to float64 rounding of fp32 data — whether the
    quantiles are selected for the whole batch, in groups of 2 or 1, or by the multi-pass search."""
    model = tiny("llama", tokenizer, seed=2)
    targets = find_targets(model, ["mlp.up_proj"], [-1])
    batch, _ = _batch(tokenizer, gsm8k_records, n=5)
    step = STEPS["adamw"]
    qs, bounds = [0.0, 0.5, 0.9, 0.99, 1.0], [2e-4, 1e-3, 1.001e-3]
    t = targets[0]
    w = t.module.weight.detach()
    hold = group * w.numel() if group else w.numel() - 1  # |ΔW| of `group` samples; 0: not even one (multi-pass)
    fast = FastScorer(model, targets, step, ALL_STATS, quantiles=qs, count_above=bounds, chunk_elements=700,
                      quantile_hold_elements=hold)
    assert fast._group_size(5, w.numel()) == (group or 5)
    got = {k: v.numpy() for k, v in fast.score_batch(batch).stats[t.name].items()}
    grads = fast.per_sample_grads(batch)[t.name]
    dw = (-step.lr * (grads / (grads.abs() + step.eps) + step.weight_decay * w)).numpy()  # fp32, as scored
    w64 = w.double().numpy()
    for b in range(dw.shape[0]):
        d, a = dw[b].astype(np.float64), np.abs(dw[b])
        exact = {"max_abs": a.max(), **{f"q{q:g}": np.quantile(a.astype(np.float64), q) for q in qs},
                 **{f"count_above_{c:g}": (a > np.float32(c)).sum() for c in bounds}}
        for k, v in exact.items():
            assert got[k][b] == v, k
        sums = {"mean_abs": np.abs(d).mean(), "l2": np.sqrt((d ** 2).sum()), "std": d.std(),
                "don": np.linalg.norm(w64 + d) - np.linalg.norm(w64),
                "cos_to_weight": (w64 * d).sum() / np.linalg.norm(w64) / np.linalg.norm(d)}
        for k, v in sums.items():
            np.testing.assert_allclose(got[k][b], v, rtol=2e-6, err_msg=k)


def test_the_first_batch_logs_what_is_scored_and_an_estimate_of_the_rest(tokenizer, gsm8k_records, caplog):
    """Issue 36: after its first batch a scoring pass says what it computes and what the rest will take at that
    batch's rate (remaining tokens ÷ the batch's tokens per second)."""
    import logging

    from resofilter.features.extract import FeatureModule

    model = tiny("llama", tokenizer)
    targets = find_targets(model, ["mlp.up_proj"], [-2, -1])
    batch, _ = _batch(tokenizer, gsm8k_records, n=4)
    batch["index"] = list(range(4))
    tokens = int(batch["attention_mask"].sum())
    module = FeatureModule(model, FastScorer(model, targets, STEPS["adamw"], ["mean_abs", "l2"]),
                           remaining_tokens=5 * tokens)
    with caplog.at_level(logging.INFO, logger="resofilter.features.extract"):
        module._log_estimate(batch, 2.0)
    msg = caplog.records[-1].getMessage()
    assert "2 matrices (layers 2–3) × [mean_abs, l2]" in msg and "token losses" in msg and "sketches" not in msg
    assert f"{tokens} tokens in 2.0 s" in msg and "about 8 s" in msg and f"remaining {4 * tokens} tokens" in msg
