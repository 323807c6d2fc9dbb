"""Intervals: the bootstraps' vectorized resampling against a literal loop, hand-made examples; the
generalized confidence interval the table uses against its closed-form special cases and the variance
components, its coverage on simulated designs with known truth; the table's paired differences on
constructed runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from resofilter.reporting.coverage import Components, Design, coverage
from resofilter.reporting.intervals import (
    detectable,
    nested_bootstrap,
    paired_matrix,
    resampled_means,
    row_matrix,
    t_interval,
    two_way_bootstrap,
    variance_components,
)
from resofilter.reporting.table import write_table
from tests.conftest import load_experiment_script, write_result


def literal_bootstrap(values: np.ndarray, n_resamples: int, seed: int, chunk: int) -> np.ndarray:
    """The documented draws, resampled by indexing: seeds, then problems, a resample at a time."""
    rng = np.random.default_rng(seed)
    s, p = values.shape
    out = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        si, pi = rng.integers(0, s, (b, s)), rng.integers(0, p, (b, p))
        for k in range(b):
            out.append(values[np.ix_(si[k], pi[k])].mean())
    return np.array(out)


def test_vectorized_resampling_is_the_literal_loop():
    rng = np.random.default_rng(3)
    values = (rng.random((4, 37)) < 0.3).astype(float) - (rng.random((4, 37)) < 0.2)
    boot = literal_bootstrap(values, 2500, seed=7, chunk=1000)
    iv = two_way_bootstrap(values, 2500, seed=7, chunk=1000)
    assert iv.mean == pytest.approx(values.mean())
    assert (iv.lo, iv.hi) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert iv.se == pytest.approx(boot.std(ddof=1), abs=1e-12)
    si, pi = rng.integers(0, 4, (5, 4)), rng.integers(0, 37, (5, 37))
    np.testing.assert_allclose(resampled_means(values, si, pi),
                               [values[np.ix_(si[k], pi[k])].mean() for k in range(5)], rtol=1e-12)


def literal_nested(values: np.ndarray, groups: np.ndarray, n_resamples: int, seed: int, chunk: int) -> np.ndarray:
    """The documented nested draws replayed one resample at a time: pick builds, then each drawn build's
    units by floor(r × n_g), then problems; the resample's mean over the stacked rows."""
    rng = np.random.default_rng(seed)
    n_g, n_p = groups.max() + 1, values.shape[1]
    members = [np.flatnonzero(groups == g) for g in range(n_g)]
    k_max = max(len(m) for m in members)
    out = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        drawn, r, pi = rng.integers(0, n_g, (b, n_g)), rng.random((b, n_g, k_max)), None
        pi = rng.integers(0, n_p, (b, n_p))
        for k in range(b):
            rows = []
            for j, g in enumerate(drawn[k]):
                m = members[g]
                rows += [m[int(r[k, j, slot] * len(m))] for slot in range(len(m))]
            out.append(values[np.ix_(rows, pi[k])].mean())
    return np.array(out)


def test_nested_resampling_is_the_literal_loop():
    rng = np.random.default_rng(5)
    values = (rng.random((7, 23)) < 0.4).astype(float)
    groups = np.array([0, 0, 0, 1, 1, 2, 2])  # builds of 3, 2 and 2 seeds: unbalanced on purpose
    boot = literal_nested(values, groups, 1500, seed=11, chunk=600)
    iv = nested_bootstrap(values, groups, 1500, seed=11, chunk=600)
    assert (iv.lo, iv.hi) == pytest.approx(tuple(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert iv.se == pytest.approx(boot.std(ddof=1), abs=1e-12)
    assert (iv.n_builds, iv.n_seeds, iv.n_problems) == (3, 7, 23) and iv.mean == pytest.approx(values.mean())
    with pytest.raises(ValueError, match="build index"):
        nested_bootstrap(values, np.array([0, 0, 0, 2, 2, 2, 2]))  # build 1 missing


def test_builds_widen_the_interval_by_hand():
    # 2 builds × 2 seeds, every problem alike within a run: build means 0.2 and 0.6, no seed or problem spread.
    # Builds resampled: the mean is 0.2, 0.4 or 0.6 with probabilities 1/4, 1/2, 1/4 → sd √(0.04 / 2) = 0.1414,
    # 95 % interval [0.2, 0.6]. The same 4 runs read as 4 seeds of one base model: sd √(0.04 / 4) = 0.1.
    values = np.repeat([[0.2], [0.2], [0.6], [0.6]], 50, axis=1)
    nested = nested_bootstrap(values, np.array([0, 0, 1, 1]), 20_000)
    flat = two_way_bootstrap(values, 20_000)
    assert nested.se == pytest.approx(np.sqrt(0.02), rel=0.03) and flat.se == pytest.approx(0.1, rel=0.03)
    assert (nested.lo, nested.hi) == pytest.approx((0.2, 0.6))
    assert flat.lo > 0.2 and flat.hi < 0.6  # e.g. 3 of 4 draws from one build


def test_hand_made_intervals():
    const = np.full((3, 10), 0.25)  # every (seed, problem) the same: no spread at all
    iv = two_way_bootstrap(const, 500)
    assert (iv.mean, iv.lo, iv.hi, iv.se) == pytest.approx((0.25, 0.25, 0.25, 0.0))
    # one seed, 400 problems of which 100 correct: the problem bootstrap's SE ≈ √(p(1−p)/n) = 0.02165
    one = np.zeros((1, 400))
    one[0, :100] = 1
    iv = two_way_bootstrap(one, 20_000)
    assert iv.se == pytest.approx(np.sqrt(0.25 * 0.75 / 400), rel=0.03)
    assert iv.lo == pytest.approx(0.25 - 1.96 * 0.02165, abs=0.003)
    assert iv.detectable == pytest.approx((1.959964 + 0.841621) * iv.se, rel=1e-6)  # Φ⁻¹(0.975) + Φ⁻¹(0.80)
    assert iv.excludes_zero and not two_way_bootstrap(one - 0.25, 2000).excludes_zero


def test_pairing_by_seed_and_problem():
    a = {0: {"p1": 1.0, "p2": 0.0, "p3": 1.0}, 1: {"p1": 0.0, "p2": 1.0, "p3": 1.0}, 2: {"p1": 1.0}}
    b = {0: {"p1": 0.0, "p2": 0.0, "p3": 1.0, "p4": 1.0}, 1: {"p1": 1.0, "p2": 1.0, "p3": 0.0}}
    # seeds both have: 0, 1; problems every shared seed has in both: p1, p2, p3
    np.testing.assert_array_equal(paired_matrix(a, b), [[1, 0, 0], [-1, 0, 1]])
    assert paired_matrix(a, {5: {"p1": 1.0}}) is None
    np.testing.assert_array_equal(row_matrix({0: a[0], 1: a[1]}), [[1, 0, 1], [0, 1, 1]])


def _run(d: Path, variant: str, scorer: str, keep: float, seed: int, correct: list[int], build: int | None = None,
         steps: int = 400, extra: dict | None = None, choices: dict | None = None) -> None:
    setting = {"variant_name": variant, "scorer.name": scorer, "selection.keep_ratio": keep,
               "finetune.max_steps": steps, "eval.name": "gsm8k", **(extra or {})}
    write_result(d, variant=variant, scorer=scorer, keep_ratio=keep, seed=seed, build=build, setting=setting,
                 steps=steps, budget=setting.get("finetune.budget", "steps"), choices=choices,
                 accs={"gsm8k": sum(correct) / len(correct)}, total_time_s=1.0,
                 select={"n_out": 10, "noise_rate_kept": 0.3, "noise_auroc": 0.6,
                         "confounds": {"response_tokens": 0.25 if scorer == "resofilter" else -0.1}})
    (d / "eval").mkdir()
    (d / "eval" / "metrics.json").write_text(json.dumps({"eval": "gsm8k", "accuracy": sum(correct) / len(correct)}))
    (d / "eval" / "predictions.jsonl").write_text("".join(
        json.dumps({"sample_id": f"q{i}", "correct": bool(c)}) + "\n" for i, c in enumerate(correct)))


def test_table_differences_are_paired_by_seed_and_problem(tmp_path):
    n = 200
    rng = np.random.default_rng(0)
    for seed in range(3):
        full = (rng.random(n) < 0.5).astype(int)
        better = np.where(rng.random(n) < 0.3, 1, full)  # full's answers, 30 % more chances of a correct one
        same = full.copy()
        same[:2] = 1 - same[:2]  # two problems flipped
        _run(tmp_path / f"full{seed}", "full", "random", 1.0, seed, full.tolist())
        _run(tmp_path / f"rf{seed}", "resofilter", "resofilter", 0.5, seed, better.tolist())
        _run(tmp_path / f"rnd{seed}", "random50", "random", 0.5, seed, same.tolist())
    md = write_table(tmp_path)["markdown"]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    head = lines[0]
    rows = {r[head.index("variant")]: dict(zip(head[:4], r[:4], strict=True)) | {"Δ full": r[head.index("Δ full")],
            "Δ random": r[head.index("Δ random")]} for r in lines[2:]}
    assert head[:3] == ["budget", "variant", "keep_ratio"] and rows["full"]["budget"] == "steps"
    import pandas as pd

    t = pd.read_csv(tmp_path / "table.csv").set_index("variant")
    rf = [[json.loads(line)["correct"] for line in (tmp_path / f"rf{s}" / "eval" / "predictions.jsonl").open()]
          for s in range(3)]
    fl = [[json.loads(line)["correct"] for line in (tmp_path / f"full{s}" / "eval" / "predictions.jsonl").open()]
          for s in range(3)]
    assert t.loc["resofilter", "acc/gsm8k Δfull"] == pytest.approx(np.mean(rf) - np.mean(fl))
    assert t.loc["resofilter", "acc/gsm8k Δfull lo"] > 0  # clearly better
    assert rows["resofilter"]["Δ full"].endswith("\\*")
    assert rows["full"]["Δ full"] == "–" and rows["full"]["Δ random"] == "–"  # full is the reference of itself
    # random50 differs from full by ±2 problems of 200 per seed: an interval around ~0 that includes 0
    lo, hi = t.loc["random50", "acc/gsm8k Δfull lo"], t.loc["random50", "acc/gsm8k Δfull hi"]
    assert lo <= 0 <= hi and not rows["random50"]["Δ full"].endswith("\\*")
    assert t.loc["resofilter", "acc/gsm8k Δrandom"] == pytest.approx(
        t.loc["resofilter", "acc/gsm8k mean"] - t.loc["random50", "acc/gsm8k mean"])
    assert "3 seeds × 200 problems" in md and "detectable at 80 % power" in md
    assert t.loc["resofilter", "rho_length"] == 0.25 and "| +0.25 |" in md


def test_table_treats_builds_as_a_factor_when_runs_span_several(tmp_path):
    """Two builds × two seeds: on build 0 ResoFilter beats the full pool, on build 1 it loses. Read as two
    builds the table's interval of Δ full is :func:`t_interval` of the paired (run, problem) matrix with the
    builds as the top factor (1 degree of freedom between them) and far wider than the same runs read as
    four seeds of one build (3); the table says which design it used."""
    n = 120
    rng = np.random.default_rng(1)
    runs = {}
    for build, gain in ((0, 0.35), (1, -0.25)):
        for seed in range(2):
            full = (rng.random(n) < 0.5).astype(int)
            flip = rng.random(n) < abs(gain)
            rf = np.where(flip, 1 if gain > 0 else 0, full)
            runs[(build, seed)] = (full, rf)
    import pandas as pd

    for label, as_builds in (("builds", True), ("one", False)):
        root = tmp_path / label
        for (build, seed), (full, rf) in runs.items():
            b, s = (build, seed) if as_builds else (0, 2 * build + seed)
            _run(root / f"full-b{build}s{seed}", "full", "random", 1.0, s, full.tolist(), build=b)
            _run(root / f"rf-b{build}s{seed}", "resofilter", "resofilter", 0.5, s, rf.tolist(), build=b)
        write_table(root)
    two = pd.read_csv(tmp_path / "builds" / "table.csv").set_index("variant")
    one = pd.read_csv(tmp_path / "one" / "table.csv").set_index("variant")
    order = sorted(range(n), key=lambda i: f"q{i}")  # the table's problem order: by id
    diff = np.array([(runs[u][1] - runs[u][0])[order] for u in sorted(runs)], dtype=float)
    for table, groups in ((two, np.array([0, 0, 1, 1])), (one, None)):
        ref = t_interval(diff, groups)
        got = table.loc["resofilter", ["acc/gsm8k Δfull lo", "acc/gsm8k Δfull hi", "acc/gsm8k Δfull df"]]
        # cut to [−1, 1], where a difference of two accuracies lies
        assert tuple(got) == pytest.approx((max(ref.lo, -1), min(ref.hi, 1), ref.df), abs=1e-12)
    assert two.loc["resofilter", "builds"] == 2 and two.loc["resofilter", "seeds"] == 2
    assert one.loc["resofilter", "builds"] == 1 and one.loc["resofilter", "seeds"] == 4
    assert two.loc["resofilter", "acc/gsm8k Δfull"] == pytest.approx(one.loc["resofilter", "acc/gsm8k Δfull"])
    # the runs' differences sit at ≈ +0.17 (build 0) and ≈ −0.13 (build 1): two build means on 1 degree of
    # freedom give an interval several times wider than four run means on 3
    width = {k: t.loc["resofilter", "acc/gsm8k Δfull hi"] - t.loc["resofilter", "acc/gsm8k Δfull lo"]
             for k, t in (("two", two), ("one", one))}
    assert width["two"] > 3 * width["one"] and two.loc["resofilter", "acc/gsm8k Δfull df"] < 1.5
    md_two = (tmp_path / "builds" / "table.md").read_text()
    md_one = (tmp_path / "one" / "table.md").read_text()
    assert "| builds |" in md_two and "2 builds × 2 seeds × 120 problems" in md_two
    assert "builds and problems as crossed random factors" in md_two
    assert "| builds |" not in md_one and "of one embedded build" in md_one
    assert "seeds and problems as crossed random factors" in md_one


def test_budget_curve_pairs_each_half_with_the_full_pool_of_its_budget(tmp_path):
    """Three variants at 100/200/400 steps, 2 seeds: ResoFilter gains 12 problems of 100 on the full pool at
    100 steps, 0 at 200, loses 8 at 400. The budget curve draws every variant's accuracy at the steps it
    trained and each half's Δ full against the full pool of the same budget (hand-computed), the table
    page shows it, and a table of one budget draws none (an earlier one's picture is removed)."""
    from resofilter.reporting.table import has_budget_axis, plot_budget, summarize

    n, gains = 100, {100: 12, 200: 0, 400: -8}
    rng = np.random.default_rng(4)
    expected = {}
    for steps, gain in gains.items():
        for seed in range(2):
            full = (rng.random(n) < 0.5).astype(int)
            rf = full.copy()
            rf[np.flatnonzero(full == (0 if gain > 0 else 1))[:abs(gain)]] = 1 if gain > 0 else 0
            _run(tmp_path / f"full-{steps}-{seed}", "full", "random", 1.0, seed, full.tolist(), steps=steps)
            _run(tmp_path / f"rf-{steps}-{seed}", "resofilter", "resofilter", 0.5, seed, rf.tolist(), steps=steps)
            _run(tmp_path / f"rnd-{steps}-{seed}", "random50", "random", 0.5, seed, full.tolist(), steps=steps)
        expected[steps] = 100 * gain / n
    t = write_table(tmp_path)
    page = "Accuracy against the training budget"
    assert (tmp_path / "budget.png").stat().st_size > 10_000 and page in (tmp_path / "table.html").read_text()
    import pandas as pd

    from resofilter.reporting.table import collect

    summary = summarize(collect(tmp_path)[0])
    assert has_budget_axis(summary) and sorted(summary["curve"].unique()) == ["full 1", "random50 0.5",
                                                                               "resofilter 0.5"]
    drawn = plot_budget(summary, tmp_path / "again.png")
    got = {int(x): m for x, m, lo, hi in drawn[("acc/gsm8k", "Δfull", "resofilter 0.5")]}
    assert got == pytest.approx(expected)  # +12, 0, −8 points: each against the full pool of its own budget
    assert [p[0] for p in drawn[("acc/gsm8k", "acc", "full 1")]] == [100, 200, 400]
    for _, m, lo, hi in drawn[("acc/gsm8k", "Δfull", "random50 0.5")]:
        assert m == 0 and lo == hi == 0  # the same answers as full: a difference of 0 with no spread
    assert ("acc/gsm8k", "Δfull", "full 1") not in drawn  # the reference is not drawn against itself
    assert isinstance(t["rows"][0]["curve"], str) and not pd.isna(t["rows"][0]["train_steps"])
    for d in [*tmp_path.glob("*-200-*"), *tmp_path.glob("*-400-*")]:
        shutil.rmtree(d)
    write_table(tmp_path)
    assert not (tmp_path / "budget.png").exists() and page not in (tmp_path / "table.html").read_text()


def test_the_budget_axis_cuts_only_an_interval_many_times_wider_than_the_rest():
    """Half-widths 2, 3, 2 and 50 points (a row of two seeds: t with 1 df) about means 55–70: the y range holds
    every mean and the three ordinary intervals, the wide one (over 3 × the means' 15-point spread) is the one
    cut, with an arrow at each end it loses. One of 10 points is drawn whole; so are intervals of no width (the
    same answers as the reference) beside one of half a point; and differences near 0 of ±4 (one seed) beside
    ±25 and ±100 (two seeds) cut those two, though they are half the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resofilter.reporting.table import fit_axis

    fig, ax = plt.subplots()
    bars = [(16, 60, 58, 62, "r"), (32, 65, 62, 68, "r"), (64, 70, 68, 72, "b"), (128, 55, 5, 105, "k")]
    cut = fit_axis(ax, bars)
    lo, hi = ax.get_ylim()
    assert cut == [bars[3]]
    assert lo < 55 and hi > 72 and lo > 5 and hi < 105  # every mean and ordinary end shown, the wide one's not
    assert lo == pytest.approx(55 - 0.05 * 17) and hi == pytest.approx(72 + 0.05 * 17)
    arrows = [(line.get_marker(), line.get_ydata()[0]) for line in ax.lines]
    assert sorted(arrows) == sorted([("v", lo), ("^", hi)])
    # a wide interval that fits in 3 times the range the rest need (45..72 against 55..72) is drawn whole
    fig2, ax2 = plt.subplots()
    assert fit_axis(ax2, [*bars[:3], (128, 55, 45, 65, "k")]) == [] and not ax2.lines
    assert ax2.get_ylim() == pytest.approx((45 - 0.05 * 27, 72 + 0.05 * 27))
    fig3, ax3 = plt.subplots()
    assert fit_axis(ax3, [(16, 0, 0, 0, "r"), (32, 0, 0, 0, "r"), (64, 1, 0.5, 1.5, "b")]) == []
    assert not ax3.lines
    fig4, ax4 = plt.subplots()
    near0 = [(16, 0.5, -3.5, 4.5, "r"), (32, -2, -6, 2, "r"), (64, -3, -7, 1, "b"), (128, 1, -3, 5, "b")]
    wide = [(16, -1, -26, 24, "k"), (32, 0, -100, 100, "k"), (64, -4, -29, 21, "k")]
    assert fit_axis(ax4, near0 + wide) == wide and ax4.get_ylim() == pytest.approx((-7 - 0.6, 5 + 0.6))
    for f in (fig, fig2, fig3, fig4):
        plt.close(f)


def test_budget_curves_are_named_by_every_setting_key_but_the_budget(tmp_path):
    """Two ResoFilter curves differing in the optimizer's betas (a list: its label holds ", ") at two budgets:
    each row's curve is its variant, keep ratio and betas, never its steps, and each curve has both points."""
    from resofilter.reporting.table import collect, plot_budget, summarize

    for steps in (100, 200):
        for seed in range(2):
            for betas in ([0.9, 0.98], [0.9, 0.999]):
                _run(tmp_path / f"rf-{steps}-{seed}-{betas[1]}", "resofilter", "resofilter", 0.5, seed,
                     [1, 0, 1, seed], steps=steps, extra={"finetune.optimizer.betas": betas})
    summary = summarize(collect(tmp_path)[0])
    curves = {f"resofilter 0.5, finetune.optimizer.betas=[0.9, {b}]" for b in ("0.98", "0.999")}
    assert set(summary["curve"]) == curves
    assert all("max_steps" not in c for c in summary["curve"]) and summary["setting"].str.contains("max_steps").all()
    drawn = plot_budget(summary, tmp_path / "b.png")
    assert {k[2] for k in drawn if k[1] == "acc"} == curves
    assert all([p[0] for p in drawn[("acc/gsm8k", "acc", c)]] == [100, 200] for c in curves)


def test_table_of_a_subset_of_the_problems(tmp_path):
    """`table --problems test-`: the 500 test problems inside a 2,000-problem evaluation. Accuracies and
    differences are recomputed over the matching ids only (by hand: full 2/4 and 3/4 there, the half 4/4
    and 3/4), the rest of the predictions ignored; a pattern matching nothing is an error."""
    from resofilter.commands import table
    from resofilter.errors import ResoFilterError

    def run(name: str, variant: str, scorer: str, keep: float, seed: int, test: list[int], extra: list[int]):
        d = tmp_path / name
        ids = [f"test-{i:05d}" for i in range(len(test))] + [f"test_extra-{i:05d}" for i in range(len(extra))]
        _run(d, variant, scorer, keep, seed, test + extra)
        (d / "eval" / "predictions.jsonl").write_text("".join(
            json.dumps({"sample_id": i, "correct": bool(c)}) + "\n" for i, c in zip(ids, test + extra, strict=True)))

    run("f0", "full", "random", 1.0, 0, [1, 0, 1, 0], [0, 0, 0, 0, 0, 0])
    run("f1", "full", "random", 1.0, 1, [1, 1, 1, 0], [0, 0, 0, 0, 0, 0])
    run("r0", "resofilter", "resofilter", 0.5, 0, [1, 1, 1, 1], [1, 1, 1, 1, 1, 1])
    run("r1", "resofilter", "resofilter", 0.5, 1, [1, 1, 1, 0], [1, 1, 1, 1, 1, 1])
    out = table([str(tmp_path), "--problems", "test-", "--out", str(tmp_path / "t")])
    rows = {r["variant"]: r for r in out["rows"]}
    assert rows["full"]["acc/gsm8k mean"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert rows["resofilter"]["acc/gsm8k mean"] == pytest.approx((4 / 4 + 3 / 4) / 2)
    assert rows["resofilter"]["acc/gsm8k Δfull"] == pytest.approx(0.25) and rows["full"]["acc/gsm8k problems"] == 4
    everything = {r["variant"]: r for r in write_table(tmp_path)["rows"]}
    assert everything["full"]["acc/gsm8k problems"] == 10
    assert everything["full"]["acc/gsm8k mean"] == pytest.approx(0.25)
    with pytest.raises(ResoFilterError, match="matches 'nothing-'"):
        write_table(tmp_path, tmp_path / "u", problems="nothing-")


def test_a_table_reads_each_runs_predictions_once_and_again_when_they_change(tmp_path, monkeypatch):
    """`table --problems` needs each run's predictions for its accuracy and for its intervals: one read per
    file; a file rewritten since (a run evaluated again) is read anew."""
    import resofilter.reporting.table as tbl

    for seed in range(2):
        _run(tmp_path / f"f{seed}", "full", "random", 1.0, seed, [1, 0, 1, seed])
        _run(tmp_path / f"r{seed}", "resofilter", "resofilter", 0.5, seed, [1, 1, 1, seed])
    reads: list[str] = []
    real = tbl.read_jsonl
    monkeypatch.setattr(tbl, "read_jsonl", lambda p, *a, **k: reads.append(str(p)) or real(p, *a, **k))
    tbl._correctness.cache_clear()
    rows = {r["variant"]: r for r in tbl.write_table(tmp_path, problems="q")["rows"]}
    assert sorted(reads) == sorted(str((tmp_path / n / "eval" / "predictions.jsonl").resolve())
                                   for n in ("f0", "f1", "r0", "r1"))
    assert rows["resofilter"]["acc/gsm8k mean"] == pytest.approx((3 / 4 + 4 / 4) / 2)
    preds = tmp_path / "r1" / "eval" / "predictions.jsonl"
    preds.write_text("".join(json.dumps({"sample_id": f"q{i}", "correct": False}) + "\n" for i in range(4)))
    rows = {r["variant"]: r for r in tbl.write_table(tmp_path, problems="q")["rows"]}
    assert rows["resofilter"]["acc/gsm8k mean"] == pytest.approx((3 / 4 + 0) / 2)


def test_a_packaged_model_is_named_after_its_cache_is_gone(tmp_path):
    """Results kept from another machine name the model by a cache directory that is not here; its name
    (gguf-<the GGUF's hash>) is content-addressed, so the shipped model config pinning that hash names it."""
    from resofilter.configs import load_group_option

    pkg = load_group_option("model", "smollm2_135m").package
    gone = f"/elsewhere/.cache/resofilter/models/gguf-{pkg.sha256[:16]}"
    for seed in range(2):
        write_result(tmp_path / f"r{seed}", seed=seed, model=gone, train_model=gone)
    md = write_table(tmp_path)["markdown"]
    assert f"Scored by and fine-tuned: SmolLM2-135M-Instruct.Q4_1 ({pkg.name} {pkg.version})." in md
    assert "/elsewhere" not in md
    # an embedded build whose cache is gone: named from the run's setting
    gone = "/elsewhere/.cache/resofilter/models/base-0123456789abcdef"
    setting = {"variant_name": "resofilter", "model.embedded.arch": "llama",
               "model.embedded.architecture.num_hidden_layers": 4, "model.embedded.architecture.hidden_size": 128}
    for seed in range(2):
        write_result(tmp_path / "emb" / f"r{seed}", seed=seed, model=gone, train_model=gone, setting=setting)
    assert "Scored by and fine-tuned: embedded llama 4L d128." in write_table(tmp_path / "emb")["markdown"]


def _mean_squares_by_loop(y: np.ndarray) -> tuple[float, float, float]:
    """Two-way mean squares (rows, columns, residual) of y by explicit loops."""
    g, p = y.shape
    m = sum(y[i, j] for i in range(g) for j in range(p)) / (g * p)
    row = [sum(y[i, j] for j in range(p)) / p for i in range(g)]
    col = [sum(y[i, j] for i in range(g)) / g for j in range(p)]
    ms_r = p * sum((r - m) ** 2 for r in row) / (g - 1)
    ms_c = g * sum((c - m) ** 2 for c in col) / (p - 1)
    ms_e = sum((y[i, j] - row[i] - col[j] + m) ** 2 for i in range(g) for j in range(p)) / ((g - 1) * (p - 1))
    return ms_r, ms_c, ms_e


def test_t_interval_reduces_to_students_t_when_only_builds_vary():
    """No problem effect and no residual (every problem of a build scored alike): the pivot is exactly
    Z·√(MS_build·k/χ²_k/(G·P)) = T_k·SE, so the interval is the mean ± t_{k, 0.975} × SE (k = G − 1) up to
    the Monte Carlo error of 20,000 draws, and its df recovers k."""
    from scipy import stats

    build_means = np.array([0.31, 0.42, 0.28, 0.37])
    values = np.repeat(np.repeat(build_means[:, None], 2, axis=0), 50, axis=1)  # 4 builds × 2 seeds × 50
    iv = t_interval(values, np.repeat(np.arange(4), 2))
    se = build_means.std(ddof=1) / 2  # s/√G
    assert iv.mean == pytest.approx(build_means.mean()) and iv.se == pytest.approx(se)
    assert (iv.hi - iv.mean) / se == pytest.approx(stats.t.ppf(0.975, 3), rel=0.02)
    assert iv.df == pytest.approx(3, rel=0.1) and iv.n_builds == 4


def test_t_interval_of_one_run_is_the_t_over_problems():
    values = np.array([[1, 0, 1, 1, 0, 1, 1, 1.0]])
    iv = t_interval(values)
    s = np.sqrt(sum((v - 0.75) ** 2 for v in values[0]) / 7 / 8)  # sample sd / √n, by hand
    assert iv.se == pytest.approx(s) and iv.df == 7
    assert (iv.lo, iv.hi) == pytest.approx((0.75 - 2.364624 * s, 0.75 + 2.364624 * s), rel=1e-6)  # t_{7, 0.975}


def test_t_interval_variance_matches_the_three_way_components():
    """The SE² of the mean equals Σ of the variance components' parts of the grand mean (three-way ANOVA
    over builds × seeds × problems) whenever no component is truncated — two estimators, one quantity —
    and the mean squares it uses equal a literal loop's."""
    rng = np.random.default_rng(3)
    b, s, p = 4, 3, 60
    x = (rng.normal(0, 0.1, (b, 1, 1)) + rng.normal(0, 0.05, (b, s, 1)) + rng.normal(0, 0.3, (1, 1, p))
         + rng.normal(0, 0.2, (b, 1, p)) + rng.normal(0, 0.3, (b, s, p)))
    vc = variance_components(x)
    assert min(vc.build, vc.seed, vc.problem, vc.build_problem) > 0  # no truncation in this draw
    iv = t_interval(x.reshape(b * s, p), np.repeat(np.arange(b), s))
    assert iv.se ** 2 == pytest.approx(sum(vc.of_mean().values()), rel=1e-10)
    ms_g, ms_p, ms_e = _mean_squares_by_loop(x.mean(axis=1))
    assert iv.se ** 2 == pytest.approx((ms_g + ms_p - ms_e) / (b * p), rel=1e-10)


def test_detectable_uses_the_degrees_of_freedom():
    assert detectable(1.0) == pytest.approx(1.959964 + 0.841621, rel=1e-6)
    assert detectable(1.0, 4) == pytest.approx(2.776445 + 0.940965, rel=1e-6)  # t_{4, 0.975} + t_{4, 0.80}
    iv = t_interval(np.repeat(np.array([[0.2], [0.4], [0.3]]), 10, axis=1) + np.linspace(0, 0.01, 10))
    assert iv.detectable == pytest.approx(detectable(iv.se, iv.df))


COVERAGE_DESIGNS = {
    # the embedded tier's five builds: the build most of a level's variance, seeds most of a difference's
    "five builds": Design(5, 2, 400, Components(build=0.27, row_build=0.05, seed=0.09, problem=0.9,
                                                build_problem=0.8, residual=0.6), (1.16, 1.14)),
    # the pretrained model's headline sweep: one model, 3 seeds (σ ≈ 3 points), 500 problems
    "one model": Design(1, 3, 500, Components(seed=0.12, problem=1.0, residual=0.5), (-0.76, -0.70)),
}


@pytest.mark.parametrize("name", COVERAGE_DESIGNS)
def test_intervals_keep_their_coverage_on_simulated_designs(name):
    """2,000 simulated sweeps of each design, binary correctness with a known population accuracy: the
    level interval and the paired-difference interval each hold the truth 95 % ± 2 points of the time.
    (The bootstrap the table used before covers the five builds' level 88–90 %: experiments/README.md.)"""
    c = coverage(t_interval, COVERAGE_DESIGNS[name], n=2000, seed=1)
    assert abs(c["level"] - 0.95) <= 0.02 and abs(c["difference"] - 0.95) <= 0.02, c


def test_coverage_truth_is_the_simulated_accuracy():
    """The design's closed-form accuracy Φ(−c/σ) against the mean of many simulated designs."""
    from resofilter.reporting.coverage import simulate

    design = COVERAGE_DESIGNS["five builds"]
    a, b = simulate(design, 400, np.random.default_rng(0))
    level, diff = design.truth
    assert a.mean() == pytest.approx(level, abs=0.005) and (a - b).mean() == pytest.approx(diff, abs=0.002)


def test_variance_components_recover_known_ones():
    """A simulated array with known components (Gaussian): the estimates land near them, and the
    variance of the grand mean they predict matches the spread of the mean over repeated draws."""
    from resofilter.reporting.intervals import VarianceComponents, variance_components

    rng = np.random.default_rng(0)
    sd = {"build": 0.08, "seed": 0.05, "problem": 0.3, "build_problem": 0.1, "residual": 0.25}

    def draw(b: int, s: int, p: int) -> np.ndarray:
        return (rng.normal(0, sd["build"], (b, 1, 1)) + rng.normal(0, sd["seed"], (b, s, 1))
                + rng.normal(0, sd["problem"], (1, 1, p)) + rng.normal(0, sd["build_problem"], (b, 1, p))
                + rng.normal(0, sd["residual"], (b, s, p)))

    vc = variance_components(draw(60, 5, 400))
    for k, v in sd.items():
        assert getattr(vc, k) == pytest.approx(v ** 2, rel=0.3), k
    means = [draw(5, 3, 200).mean() for _ in range(2000)]
    true = VarianceComponents(**{k: v ** 2 for k, v in sd.items()}, shape=(5, 3, 200))
    assert np.var(means) == pytest.approx(sum(true.of_mean().values()), rel=0.1)  # of_mean against repeated draws
    assert true.of_mean(builds=10)["build"] == pytest.approx(sd["build"] ** 2 / 10)
    with pytest.raises(ValueError, match="≥ 2"):
        variance_components(np.zeros((1, 3, 10)))


def test_build_variance_script_reports_components_and_signs_per_build(tmp_path):
    bv = load_experiment_script("build_variance.py")
    rng = np.random.default_rng(2)
    n, gains = 80, {0: 10, 1: 6, 2: -4}  # ResoFilter gets that many more problems right than full on each build
    diffs: dict[int, list[np.ndarray]] = {}
    for build, gain in gains.items():
        for seed in range(2):
            full = (rng.random(n) < 0.4).astype(int)
            rf = full.copy()
            idx = np.flatnonzero(full == (0 if gain > 0 else 1))[:abs(gain)]
            rf[idx] = 1 if gain > 0 else 0
            diffs.setdefault(build, []).append((rf - full).astype(float))
            _run(tmp_path / f"f{build}{seed}", "full", "random", 1.0, seed, full.tolist(), build=build)
            _run(tmp_path / f"r{build}{seed}", "resofilter", "resofilter", 0.5, seed, rf.tolist(), build=build)
    md = bv.report(tmp_path, None)
    row = next(line for line in md.splitlines() if line.startswith("| resofilter 0.5 − full 1 |") and "b0" in line)
    # per build: gain / 80 problems, the same on both seeds; overall +12/240 = +5.0 points, positive on 2 of 3 builds
    # sign test: 2 of 3 positive, p = P(|K − 1.5| ≥ 0.5) = 1 under Binomial(3, ½)
    assert "| +5.0 | 2/3 | 1 | b0: +12.5, b1: +7.5, b2: −5.0 |".replace("−", "-") in row.replace("−", "-")
    iv = t_interval(np.array([d for b in sorted(diffs) for d in diffs[b]]), np.repeat(np.arange(3), 2))
    assert row.endswith(f"| [{100 * iv.lo:+.1f}, {100 * iv.hi:+.1f}] |")  # the interval with builds as a factor
    assert "| full 1 |" in md and "σ build" in md


def test_a_figure_says_what_its_means_and_intervals_are_over():
    """The figures' titles name the design the table's note names: builds (when more than one) and seeds, the
    problems, and the factors of the interval."""
    import pandas as pd

    from resofilter.reporting.table import _design

    three = pd.DataFrame({"builds": [3, 3], "seeds": [2, 2], "acc/x problems": [2000, 2000]})
    one = pd.DataFrame({"builds": [1], "seeds": [3], "acc/x problems": [500]})
    lone = pd.DataFrame({"builds": [1], "seeds": [1], "acc/x problems": [float("nan")]})
    assert _design(three, "acc/x") == ("mean of 3 builds × 2 seeds × 2000 problems\n"
                                       "95 % interval (builds and problems as factors)")
    # rows over different numbers of seeds (a budget curve: 3 seeds at one budget, 1 at another) say the range,
    # and that a row of one seed has the problems alone as its factor
    mixed = pd.DataFrame({"builds": [0, 0], "seeds": [3, 1], "acc/x problems": [500, 500]})
    assert _design(mixed, "acc/x") == ("mean of 1–3 seeds × 500 problems\n95 % interval (seeds and problems as "
                                       "factors; problems alone for a row of 1 seed)")
    assert _design(three.assign(seeds=[2, 1]), "acc/x").startswith("mean of 3 builds × 1–2 seeds × 2000 problems")
    assert _design(one, "acc/x") == "mean of 3 seeds × 500 problems\n95 % interval (seeds and problems as factors)"
    assert _design(lone, "acc/x") == "mean of 1 seed\n95 % interval (problems as the factor)"


def test_the_budget_length_not_in_force_is_not_part_of_a_setting(tmp_path):
    """Under budget=steps fine-tuning never reads finetune.epochs, under budget=epochs never max_steps: two runs
    differing only there are one setting (resume, table rows), and a row's label names only the length in force."""
    from resofilter.reporting.results import canonical_setting

    steps = {"finetune.budget": "steps", "finetune.max_steps": 400, "finetune.epochs": 5, "seed": 0, "x": None}
    assert canonical_setting(steps) == {"finetune.budget": "steps", "finetune.max_steps": 400, "seed": 0}
    assert canonical_setting({**steps, "finetune.epochs": 1}) == canonical_setting(steps)
    epochs = {**steps, "finetune.budget": "epochs", "finetune.max_steps": -1, "finetune.epochs": 1}
    assert canonical_setting(epochs) == {"finetune.budget": "epochs", "finetune.epochs": 1, "seed": 0}
    for seed in range(2):
        for budget, length in (("steps", {"finetune.max_steps": 100, "finetune.epochs": 5}),
                               ("steps", {"finetune.max_steps": 200, "finetune.epochs": 5}),
                               ("epochs", {"finetune.max_steps": -1, "finetune.epochs": 1})):
            tag = "-".join(str(v) for v in length.values())
            _run(tmp_path / f"rf-{tag}-{seed}", "resofilter", "resofilter", 0.5, seed, [1, 0, 1, seed],
                 steps=length["finetune.max_steps"] if budget == "steps" else 63,  # what a run trained
                 extra={"finetune.budget": budget, **length})
    labels = sorted(r["setting"] for r in write_table(tmp_path)["rows"])
    assert labels == ["finetune.epochs=1", "finetune.max_steps=100", "finetune.max_steps=200"]
    # the budget curve: one curve per kind of budget, one colour per variant (the full pool black)
    from resofilter.reporting.table import _curve_colors, collect, summarize

    for seed in range(2):
        _run(tmp_path / f"full-{seed}", "full", "random", 1.0, seed, [1, 1, 1, seed], steps=100,
             extra={"finetune.budget": "steps", "finetune.max_steps": 100})
    colors = _curve_colors(summarize(collect(tmp_path)[0]))
    assert set(colors) == {"resofilter 0.5", "resofilter 0.5, budget=epochs", "full 1"}
    assert colors["resofilter 0.5"] == colors["resofilter 0.5, budget=epochs"] != "k" and colors["full 1"] == "k"
    # the figure draws variants with a curve: the one-epoch point beside ResoFilter's steps curve is drawn; a
    # baseline trained at one budget only (a point of table.png) is not, nor is the full pool's one point
    from resofilter.reporting.table import plot_budget

    for seed in range(2):
        _run(tmp_path / f"loss-{seed}", "loss50", "loss", 0.5, seed, [1, 0, 0, seed], steps=100,
             extra={"finetune.budget": "steps", "finetune.max_steps": 100})
    drawn = plot_budget(summarize(collect(tmp_path)[0]), tmp_path / "b.png")
    assert {k[2] for k in drawn if k[1] == "acc"} == {"resofilter 0.5", "resofilter 0.5, budget=epochs"}


def test_a_weak_scorers_half_pairs_with_the_strong_models_rows_by_seed(tmp_path):
    """Weak to strong across families: the embedded model (build 0) scores, a model from a path is fine-tuned.
    Its reference rows (the full pool, the random half: the path model alone, no build) pair with it by seed and
    problem — by hand, seeds 0-2: (+2, +1, 0) problems of 4 better than the full pool."""
    from resofilter.reporting.table import _by_my_units

    assert _by_my_units({(0, 1): "m"}, {(-1, 1): "t", (-1, 2): "u"}) == {(0, 1): "t"}
    assert _by_my_units({(0, 1): "m"}, {(0, 1): "t"}) == {(0, 1): "t"}  # the same units: as they are
    assert _by_my_units({(0, 1): "m"}, {(1, 1): "t"}) == {(1, 1): "t"}  # other builds: nothing to pair
    full = {0: [1, 0, 0, 1], 1: [1, 1, 0, 0], 2: [0, 1, 1, 1]}
    weak = {0: [1, 1, 1, 1], 1: [1, 1, 1, 0], 2: [0, 1, 1, 1]}
    for seed in range(3):
        setting = {"variant_name": "resofilter", "scorer.name": "resofilter", "selection.keep_ratio": 0.5,
                   "model.embedded.arch": "llama", "train_model.name_or_path": "/m/smollm2", "eval.name": "gsm8k"}
        _run(tmp_path / f"full{seed}", "full", "random", 1.0, seed, full[seed],
             extra={"model.name_or_path": "/m/smollm2"}, choices={"model": "smollm2", "model@train_model": None})
        _run(tmp_path / f"weak{seed}", "resofilter", "resofilter", 0.5, seed, weak[seed], build=0, extra=setting,
             choices={"model": "tiny_llama", "model@train_model": "smollm2"})
        _run(tmp_path / f"self{seed}", "resofilter", "resofilter", 0.5, seed, full[seed],
             extra={"model.name_or_path": "/m/smollm2"}, choices={"model": "smollm2", "model@train_model": None})
    table = write_table(tmp_path)
    rows = {(r["variant"], r["builds"]): r for r in table["rows"]}
    assert rows[("resofilter", 1)]["acc/gsm8k Δfull"] == pytest.approx((2 + 1 + 0) / 12)
    assert rows[("full", 0)]["builds"] == 0
    # labels name each group by its option ("model@train_model" is the train_model group); an unset one not at all
    assert rows[("resofilter", 1)]["setting"] == "model=tiny_llama, train_model=smollm2"
    assert rows[("resofilter", 0)]["setting"] == "model=smollm2"
    assert "3 seeds × 4 problems; the rows with an embedded model are of one build" in table["markdown"]


def test_a_table_of_two_directories_is_the_table_of_their_runs_together(tmp_path):
    """A headline sweep (64 steps) and a budget sweep (16, 128) kept apart are read as one table: the same rows
    and intervals as the runs copied under one directory, runs named by directory; several need --out."""
    import shutil

    from resofilter.commands import table
    from resofilter.errors import ResoFilterError

    rng = np.random.default_rng(7)
    for where, steps_list in (("headline", (64,)), ("budget", (16, 128))):
        for steps in steps_list:
            for seed in range(2):
                for name, variant, scorer, keep in (("full", "full", "random", 1.0),
                                                    ("rf", "resofilter", "resofilter", 0.5)):
                    _run(tmp_path / where / f"s{seed}" / f"{name}-{steps}", variant, scorer, keep, seed,
                         (rng.random(40) < 0.5).astype(int).tolist(), steps=steps)
    both = table([str(tmp_path / "headline"), str(tmp_path / "budget"), "--out", str(tmp_path / "t")])
    for where in ("headline", "budget"):
        shutil.copytree(tmp_path / where, tmp_path / "one" / where)
    one = write_table(tmp_path / "one")
    assert both["n_runs"] == one["n_runs"] == 12 and (tmp_path / "t" / "budget.png").exists()
    import pandas as pd

    cols = ["acc/gsm8k mean", "acc/gsm8k lo", "acc/gsm8k hi", "acc/gsm8k Δfull"]
    rows = {(r["variant"], r["train_steps"]): r for r in both["rows"]}
    assert len(rows) == 6
    for r in one["rows"]:
        mine = rows[(r["variant"], r["train_steps"])]
        assert [mine[c] for c in cols] == pytest.approx([r[c] for c in cols], nan_ok=True)
    runs = pd.read_csv(tmp_path / "t" / "runs.csv")["run"]
    assert set(runs.str.split("/").str[0]) == {"headline", "budget"}
    with pytest.raises(ResoFilterError, match="needs --out"):
        write_table([tmp_path / "headline", tmp_path / "budget"])


def test_a_difference_whose_sides_ran_in_different_environments_is_marked(tmp_path):
    """Runs merged from two machine kinds: each row names the environment its runs ran in, and a difference is
    marked † exactly when, for some seed, its two sides ran in different ones (the float32 kernels differ)."""
    from resofilter.environment import environment

    def on(d: Path, cap: str) -> None:
        f = d / "results.json"
        r = json.loads(f.read_text())
        r["environment"] = {**environment(), "torch_cpu_capability": cap}
        f.write_text(json.dumps(r))

    correct = [1, 0, 1, 1, 0, 0, 1, 0]
    for steps, caps in ((16, {"full": "AVX512", "rf": "AVX2", "rnd": "AVX2"}),  # full on the other machine
                        (32, {"full": "AVX2", "rf": "AVX2", "rnd": "AVX2"})):   # all on one
        for seed in (0, 1):
            for name, variant, scorer, keep in (("full", "full", "random", 1.0), ("rf", "resofilter", "resofilter",
                                                0.5), ("rnd", "random50", "random", 0.5)):
                d = tmp_path / f"{name}{steps}_{seed}"
                _run(d, variant, scorer, keep, seed, correct[seed:] + correct[:seed], steps=steps)
                on(d, caps[name])
    md = write_table(tmp_path)["markdown"]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    head = lines[0]
    rows = {(r[head.index("variant")], r[head.index("setting")]): dict(zip(head, r, strict=True)) for r in lines[2:]}
    assert rows[("full", "finetune.max_steps=16")]["environment"] == "AVX512"
    assert rows[("resofilter", "finetune.max_steps=16")]["environment"] == "AVX2"
    assert rows[("resofilter", "finetune.max_steps=16")]["Δ full"].endswith("†")        # AVX2 against AVX512
    assert not rows[("resofilter", "finetune.max_steps=16")]["Δ random"].endswith("†")  # both AVX2
    assert rows[("random50", "finetune.max_steps=16")]["Δ full"].endswith("†")
    assert not any(v.endswith("†") for k, r in rows.items() if k[1] == "finetune.max_steps=32" for v in r.values())
    assert "†: the two sides of the difference ran" in md
    # one seed of the half re-run on the full pool's machine: the row spans both, and its Δ is still marked
    _run(tmp_path / "rf16_0_again", "resofilter", "resofilter", 0.5, 0, correct, steps=16)
    on(tmp_path / "rf16_0_again", "AVX512")
    md = write_table(tmp_path)["markdown"]
    row = next(line for line in md.splitlines() if "| resofilter |" in line and "max_steps=16" in line)
    assert "| AVX2; AVX512 |" in row and "] †" in row
    # one environment throughout: no column, no mark
    for d in tmp_path.glob("*/results.json"):
        on(d.parent, "AVX2")
    md = write_table(tmp_path)["markdown"]
    assert "environment" not in md.splitlines()[0] and "†" not in md
