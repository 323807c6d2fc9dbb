"""Selection against hand-computed expectations; scorers; diagnostics against brute force; the stage."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from resofilter.errors import ConfigError, ResoFilterError
from resofilter.selection.diagnostics import auprc, auroc
from resofilter.selection.scorers import ColumnScorer, CombinedScorer, ResoFilterScorer, ScoredPool, badness
from resofilter.selection.select import n_to_keep, select
from tests.helpers.common import _stage_cfg

SCORES = np.array([0.5, 0.9, 0.1, 0.7, 0.3])  # positions 0..4


@pytest.mark.parametrize("ratio,direction,expected", [
    (1.0, "drop_high", [True] * 5),
    (0.5, "drop_high", [True, False, True, False, True]),   # drop int(5 × 0.5) = 2: keep 0.1, 0.3, 0.5
    (0.25, "drop_high", [False, False, True, False, True]),  # drop int(5 × 0.75) = 3: keep 0.1, 0.3
    (0.5, "drop_low", [True, True, False, True, False]),    # the 3 highest: 0.9, 0.7, 0.5
    (0.01, "drop_high", [False, False, True, False, False]),  # at least one
])
def test_keep_ratio_on_odd_n(ratio, direction, expected):
    assert select(SCORES, ratio, direction).kept.tolist() == expected


def test_even_n_and_rounding():
    s = np.array([4.0, 3.0, 2.0, 1.0])
    assert select(s, 0.5).kept.tolist() == [False, False, True, True]
    assert select(s, 0.25).kept.tolist() == [False, False, False, True]
    assert [n_to_keep(n, 0.5) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]  # n − int(n × 0.5)
    assert [n_to_keep(7, k) for k in (0.25, 0.5, 0.75)] == [2, 4, 6]  # 7 − int(7 × p): drop 5, 3, 1
    assert n_to_keep(10, 0.7) == 7 and n_to_keep(100, 0.29) == 29  # the ratio as written, not its float
    assert select(s, 0.5).rank.tolist() == [3, 2, 1, 0]


def test_ties_break_by_original_position():
    s = np.array([1.0, 1.0, 1.0, 1.0])
    # reso_filter.py: sorted(key=(score, -idx), reverse=True), the first int(n × p) dropped: lower index first
    assert select(s, 0.5, "drop_high").kept.tolist() == [False, False, True, True]
    assert select(s, 0.5, "drop_low").kept.tolist() == [True, True, False, False]


def test_dedup_after_cut_keeps_first_in_original_order():
    s = np.array([0.1, 0.2, 0.3, 0.9])
    queries = ["What is 2?", "what is 2", "What is 2?", "other"]
    sel = select(s, 0.75, queries=queries, dedup="exact")
    assert sel.kept.tolist() == [True, True, False, False] and sel.dedup_removed == 1
    sel = select(s, 0.75, queries=queries, dedup="normalized")
    assert sel.kept.tolist() == [True, False, False, False] and sel.dedup_removed == 2


@pytest.mark.parametrize("ratio", [0, -0.5, 1.01, "half"])
def test_bad_keep_ratio(ratio):
    with pytest.raises(ConfigError, match="keep_ratio"):
        select(SCORES, ratio)


def test_auroc_equals_brute_force_pair_count():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 5, size=40).astype(float)  # many ties
    y = rng.random(40) < 0.4
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p, q in itertools.product(b[y], b[~y])]
    assert auroc(b, y) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert auroc(np.array([3.0, 2, 1]), np.array([True, False, False])) == 1.0
    # AUPRC: perfect ranking → 1; noisy first then clean: precision at hits 1/1, 2/3
    assert auprc(np.array([3.0, 2, 1]), np.array([True, False, True])) == pytest.approx((1 + 2 / 3) / 2)


FEATURES = pd.DataFrame({
    "sample_id": ["a", "b", "c"],
    "loss": [1.0, 3.0, 2.0],
    **{f"model.layers.{i}.mlp.up_proj/mean_abs": [1.0 + i, 2.0, 0.5 * i] for i in range(4)},
    **{f"model.layers.{i}.mlp.up_proj/l2": [3.0, 2.0, 1.0] for i in range(4)},
})
POOL = ScoredPool(FEATURES, 4)


def test_resofilter_scorer_averages_the_layer_set():
    s = ResoFilterScorer(["mlp.up_proj"], [-3, -2, -1], "mean_abs", 4)
    np.testing.assert_allclose(s.scores(POOL), [(2 + 3 + 4) / 3, 2.0, (0.5 + 1 + 1.5) / 3])
    with pytest.raises(ConfigError, match="available statistics"):
        ResoFilterScorer(["mlp.up_proj"], "all", "max_abs", 4).scores(POOL)


def test_combined_rank_mean_and_topsis():
    loss = ColumnScorer("loss", "loss")
    l2 = ResoFilterScorer(["mlp.up_proj"], "all", "l2", 4)
    rm = CombinedScorer([(loss, 1.0), (l2, 1.0)], "rank_mean").scores(POOL)
    # loss ranks a,b,c = 1,3,2; l2 ranks 3,2,1 → mean percentiles (1+3)/6, (3+2)/6, (2+1)/6
    np.testing.assert_allclose(rm, [4 / 6, 5 / 6, 3 / 6])
    t = CombinedScorer([(loss, 1.0), (l2, 0.0)], "topsis").scores(POOL)
    assert np.argsort(t).tolist() == np.argsort(FEATURES["loss"].to_numpy()).tolist()  # one indicator = its order
    low = ColumnScorer("loss", "loss", bad_end="low")
    assert badness(low, POOL).tolist() == [-1.0, -3.0, -2.0]


def test_topsis_by_hand_with_unequal_weights():
    """Two indicators, weights 3:1. By hand: shifted columns (0, 2, 1) and (4, 0, 2), norms √5 and 2√5, so the
    weighted points are a = (0, ½)/√5, b = (3/2, 0)/√5, c = (¾, ¼)/√5; best (0, 0), worst (3/2, ½)/√5;
    d_best = ½, 3/2, √⅝ and d_worst = 3/2, ½, √⅝ (all /√5): closeness 0.25, 0.75, 0.5. With equal weights
    a and b swap places on the two axes and every sample is 0.5: the weights are what orders them."""
    pool = ScoredPool(pd.DataFrame({"sample_id": ["a", "b", "c"], "loss": [1.0, 3.0, 2.0],
                                    "n_tokens": [4.0, 0.0, 2.0]}), 4)
    loss, length = ColumnScorer("loss", "loss"), ColumnScorer("length", "n_tokens")
    np.testing.assert_allclose(CombinedScorer([(loss, 0.75), (length, 0.25)], "topsis").scores(pool),
                               [0.25, 0.75, 0.5], rtol=1e-12)
    np.testing.assert_allclose(CombinedScorer([(loss, 3.0), (length, 1.0)], "topsis").scores(pool),
                               [0.25, 0.75, 0.5], rtol=1e-12)  # only the weights' ratio counts
    np.testing.assert_allclose(CombinedScorer([(loss, 1.0), (length, 1.0)], "topsis").scores(pool),
                               [0.5, 0.5, 0.5], rtol=1e-12)




def test_select_stage_outputs(tmp_path):
    from resofilter.commands import select as select_cmd

    cfg, pool = _stage_cfg(tmp_path, "scorer=loss", "selection.keep_ratio=0.5", "selection.dedup=null")
    manifest = select_cmd(cfg)
    out = tmp_path / "out"
    subset = [json.loads(line) for line in (out / "subset.jsonl").read_text().splitlines()]
    # loss: noisy (i%3==0) are highest → dropped; keep 5 of 9 lowest: 1,2,4,5,7 in original order
    assert [r["id"] for r in subset] == ["s1", "s2", "s4", "s5", "s7"]
    assert subset[0] == pool[1]  # the input's own schema, untouched
    table = pd.read_parquet(out / "selection.parquet")
    assert list(table.columns) == ["sample_id", "score", "badness", "rank", "kept"]
    diag = json.loads((out / "diagnostics.json").read_text())
    assert diag["selected_scorer"]["auroc"] == 1.0 and diag["selected_scorer"]["recall"] == 1.0
    assert diag["scorers"]["mean_abs/last3"]["auroc"] == pytest.approx(auroc(np.arange(9.0), np.arange(9) % 3 == 0))
    assert (out / "roc.png").stat().st_size > 0 and (out / "score_hist.png").exists()
    assert manifest["n_out"] == 5 and manifest["n_in"] == 9
    # confounds: loss = [1, .01, .02, 1.03, .04, .05, 1.06, .07, .08] against n_tokens 0..8 → ρ by hand
    r_loss = [7, 1, 2, 8, 3, 4, 9, 5, 6]
    rho = np.corrcoef(r_loss, np.arange(1, 10))[0, 1]
    assert diag["selected_confounds"]["response_tokens"] == pytest.approx(rho)
    assert diag["selected_confounds"]["loss"] == pytest.approx(1.0) and manifest["confounds"]["loss"] == 1.0
    assert diag["confounds"]["mean_abs/last3"]["response_tokens"] == pytest.approx(1.0)  # both 0..8
    # response_chars: "r0".."r8" are all 2 characters: constant, no correlation defined
    assert diag["confounds"]["loss"]["response_chars"] is None
    # groups: kept s1, s2, s4, s5, s7 → garbled (s0, s3, s6) 0 of 3; clean 5 of 6
    assert diag["groups"]["meta.noise_kind"] == {"clean": {"n": 6, "kept": 5 / 6}, "garbled": {"n": 3, "kept": 0.0}}
    assert diag["scorers"]["loss"]["auroc_by_kind"] == {"garbled": 1.0}
    assert (out / "confounds.png").stat().st_size > 0


def test_confounds_and_groups_without_noise_labels(tmp_path):
    """Every selection reports what its scores rank by and whom it keeps, labels or not."""
    from resofilter.commands import select as select_cmd

    cfg, _ = _stage_cfg(tmp_path, "scorer=length", "selection.keep_ratio=0.5", "data.label_field=null",
                        "data.group_fields=[extra]")
    manifest = select_cmd(cfg)
    diag = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert "scorers" not in diag and "diagnostics" not in manifest  # nothing to score noise against
    assert diag["selected_confounds"]["response_tokens"] == pytest.approx(1.0)  # length is n_tokens
    assert diag["groups"]["extra"]["0"] == {"n": 1, "kept": 1.0} and diag["groups"]["extra"]["8"]["kept"] == 0.0
    with pytest.raises(ConfigError, match=r"data.group_fields.*'s0' has no field 'nope'"):
        (tmp_path / "b").mkdir()
        select_cmd(_stage_cfg(tmp_path / "b", "data.group_fields=[nope]")[0])


def test_auroc_by_kind_leaves_other_kinds_out():
    from resofilter.selection.diagnostics import auroc_by_kind, group_retention, spearman

    bad = np.array([0.1, 0.2, 0.9, 0.3, 0.05, 0.8])
    kinds = ["clean", "clean", "a", "b", "b", "a"]
    y = np.array([k != "clean" for k in kinds])
    # a: 0.9, 0.8 vs clean 0.1, 0.2 → 4/4 pairs; b: 0.3 beats both, 0.05 beats none → 2/4
    assert auroc_by_kind(bad, y, kinds) == {"a": 1.0, "b": 0.5}
    assert group_retention(np.array([1, 0, 1], bool), {"f": ["x", "y", "x"]}) == {
        "f": {"x": {"n": 2, "kept": 1.0}, "y": {"n": 1, "kept": 0.0}}}
    assert spearman(np.array([1.0, 2, 3]), np.array([3.0, 2, 1])) == pytest.approx(-1.0)


@pytest.mark.parametrize("extra,err,match", [
    (["selection.keep_ratio=0"], ConfigError, "keep_ratio"),
    (["statistic=l2"], ConfigError, "available statistics"),
    (["selection.diagnostics=true", "data.label_field=meta.nope"], ConfigError, "meta.nope"),
])
def test_select_stage_bad_input_writes_nothing(tmp_path, extra, err, match):
    from resofilter.commands import select as select_cmd

    cfg, _ = _stage_cfg(tmp_path, *extra)
    with pytest.raises(err, match=match):
        select_cmd(cfg)
    assert not (tmp_path / "out" / "subset.jsonl").exists()


def test_mismatched_sample_ids(tmp_path):
    from resofilter.commands import select as select_cmd

    cfg, _ = _stage_cfg(tmp_path)
    f = pd.read_parquet(tmp_path / "feat" / "features.parquet")
    f.loc[0, "sample_id"] = "zzz"
    f.to_parquet(tmp_path / "feat" / "features.parquet")
    with pytest.raises(ResoFilterError, match="absent from the data"):
        select_cmd(cfg)


class ShortestFirstScorer:
    """A user's scorer: one class plus a `_target_` config; drops the longest responses."""

    def __init__(self, name: str = "shortest", bad_end: str = "high") -> None:
        self.name, self.bad_end = name, bad_end

    def scores(self, pool) -> np.ndarray:
        assert pool.n_layers == 4  # the scored model's depth, from the manifest
        return pool.features["n_tokens"].to_numpy(dtype=float)


def test_a_user_scorer_is_one_class_and_a_target(tmp_path):
    from resofilter.commands import select as select_cmd

    cfg, _ = _stage_cfg(tmp_path, "+scorer._target_=tests.test_selection.ShortestFirstScorer", "~scorer.bad_end",
                        "scorer.name=shortest", "selection.keep_ratio=0.5", "selection.dedup=null")
    select_cmd(cfg)
    subset = [json.loads(line) for line in (tmp_path / "out" / "subset.jsonl").read_text().splitlines()]
    assert [r["id"] for r in subset] == ["s0", "s1", "s2", "s3", "s4"]  # n_tokens = 0..8: the 5 shortest kept
    (tmp_path / "b").mkdir()
    bad, _ = _stage_cfg(tmp_path / "b", "+scorer._target_=builtins.dict")
    with pytest.raises(ConfigError, match="Scorer protocol"):
        select_cmd(bad)
