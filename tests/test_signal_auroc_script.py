"""experiments/signal_auroc.py: every row composes to the scorer it names; the table's layout by hand; the
AUROC's bootstrap interval against a literal replay of its draws and against DeLong's standard error."""

from __future__ import annotations

import numpy as np
import pytest

from resofilter.stages.config_check import validate
from tests.conftest import load_experiment_script


@pytest.fixture(scope="module")
def script():
    return load_experiment_script("signal_auroc.py")


def test_every_row_composes_validates_and_keeps_half(script):
    names = []
    for _, overrides in script.ROWS:
        cfg = script.compose(["model=tiny_llama_8l", *overrides])
        validate(cfg)
        assert cfg.selection.keep_ratio == 0.5 and cfg.model.embedded.architecture.num_hidden_layers == 8
        names.append((cfg.scorer.name, cfg.scorer.get("reduce"), cfg.scorer.get("method")))
    assert len(set(names)) == len(names), "two rows select with the same scorer"
    assert ("target", "max", None) in names and ("tok_topk", None, None) in names


def test_markdown_orders_kinds_and_formats_by_hand(script):
    rows = [("a", {"auroc": 0.61234, "auroc_by_kind": {"garbled": 0.9, "wrong_final": 0.555, "zzz": 0.1}}),
            ("b", {"auroc": 0.5, "auroc_by_kind": {"zzz": 0.5, "garbled": 0.25, "wrong_final": 0.75}})]
    assert script.markdown(rows).splitlines() == [
        "| scorer | all | wrong_final | garbled | zzz |",
        "|---|---:|---:|---:|---:|",
        "| a | **0.612** | 0.56 | 0.90 | 0.10 |",
        "| b | **0.500** | 0.75 | 0.25 | 0.50 |",
    ]


def test_markdown_shows_the_intervals_where_a_row_has_them(script):
    rows = [("a", {"auroc": 0.7, "auroc_ci": (0.68, 0.723), "auroc_by_kind": {"garbled": 0.9},
                   "auroc_by_kind_ci": {"garbled": (0.851, 0.94)}}),
            ("b", {"auroc": 0.5, "auroc_by_kind": {"garbled": 0.25}})]
    assert script.markdown(rows).splitlines()[2:] == ["| a | **0.700 [0.68, 0.72]** | 0.90 [0.85, 0.94] |",
                                                      "| b | **0.500** | 0.25 |"]


def _literal_bootstrap(badness, y, n_resamples, seed):
    """The documented draws replayed one resample at a time, each AUROC by ranks (Mann–Whitney)."""
    from resofilter.selection.diagnostics import auroc

    rng = np.random.default_rng(seed)
    pos, neg = badness[y], badness[~y]
    pi = rng.integers(0, len(pos), (n_resamples, len(pos)))
    ni = rng.integers(0, len(neg), (n_resamples, len(neg)))
    return np.array([auroc(np.concatenate([pos[pi[b]], neg[ni[b]]]),
                           np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]) for b in range(n_resamples)])


def test_auroc_interval_is_the_bootstrap_of_its_draws_and_matches_delong():
    from resofilter.selection.diagnostics import auroc, auroc_interval

    rng = np.random.default_rng(5)
    y = rng.random(300) < 0.4
    badness = np.round(rng.normal(size=300) + 0.7 * y, 1)  # rounded: many ties, counted ½
    literal = _literal_bootstrap(badness, y, 300, seed=3)
    assert auroc_interval(badness, y, 300, seed=3) == pytest.approx(tuple(np.quantile(literal, [0.025, 0.975])),
                                                                    abs=1e-12)
    # DeLong's standard error from the structural components (pairwise, by brute force)
    pos, neg = badness[y], badness[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    se = np.sqrt(psi.mean(axis=1).var(ddof=1) / len(pos) + psi.mean(axis=0).var(ddof=1) / len(neg))
    lo, hi = auroc_interval(badness, y, 4000)
    assert lo < auroc(badness, y) < hi and (hi - lo) / (2 * 1.96) == pytest.approx(se, rel=0.1)
    assert auroc_interval(np.r_[np.ones(5), np.zeros(5)], np.r_[np.ones(5, bool), np.zeros(5, bool)]) == (1.0, 1.0)
