"""Scorers on gradient sketches and token signals, by hand; the select stage with sketches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from resofilter._io import file_hash, read_json, write_json_atomic
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.features.sketch import SketchMatrix, load_sketches
from resofilter.selection.scorers import (
    ColumnScorer,
    CombinedScorer,
    ConsensusScorer,
    ScoredPool,
    TargetScorer,
    badness,
    build_scorer,
)
from tests.helpers.common import _stage_cfg

LAYOUT = {"k_out": 1, "k_in": 2, "seed": 0, "of": "gradient", "targets": ["m"], "model": "test", "model_weights": None}


def _with_sketches(features: pd.DataFrame, matrix, ids=None) -> ScoredPool:
    return ScoredPool(features, 4, SketchMatrix(ids or features["sample_id"].tolist(), np.asarray(matrix, float),
                                                {**LAYOUT, "dir": "pool"}))


def _add_sketches(d, matrix, **layout) -> None:
    """Give a features dir a sketches file (rows in features.parquet's order) and its manifest entry."""
    np.save(d / "sketches.npy", np.asarray(matrix, np.float32))
    m = read_json(d / "manifest.json")
    m["sketch"] = {"k_out": 1, "k_in": 2, "seed": 0, "of": "gradient", "targets": ["m"], "dim": 2,
                   "file": "sketches.npy", "sha256": file_hash(d / "sketches.npy", length=64), **layout}
    write_json_atomic(d / "manifest.json", m)


def test_consensus_by_hand():
    f = _with_sketches(pd.DataFrame({"sample_id": ["a", "b", "c", "d"]}),
                       [[1, 0], [1, 0], [1, 0], [-1, 2]], ids=["d", "a", "b", "c"])  # rows keyed by id, not position
    # by id: a=(1,0) b=(1,0) c=(-1,2) d=(1,0); mean (0.5, 0.5): cos = 1/√2 for (1,0), (−1+2)/(√5·√2·... ) below
    got = ConsensusScorer().scores(f)
    c_cos = (-0.5 + 1.0) / (np.sqrt(5) * np.sqrt(0.5))
    np.testing.assert_allclose(got, [2 ** -0.5, 2 ** -0.5, c_cos, 2 ** -0.5])
    assert badness(ConsensusScorer(), f).argmax() == 2  # the disagreeing sample is the bad one


def test_consensus_without_sketches_is_a_config_error():
    with pytest.raises(ConfigError, match="score.sketch.enabled=true"):
        ConsensusScorer().scores(ScoredPool(pd.DataFrame({"sample_id": ["a"]}), 4))


def test_answer_loss_missing_ranks_worst():
    f = ScoredPool(pd.DataFrame({"answer_loss": [0.1, np.nan, 3.0]}), 4)
    np.testing.assert_allclose(ColumnScorer("answer_loss", "answer_loss").scores(f), [0.1, 4.0, 3.0])
    np.testing.assert_allclose(ColumnScorer("x", "answer_loss", bad_end="low").scores(f), [0.1, -0.9, 3.0])


def test_target_mean_and_max_by_hand_and_layout_checks(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    pd.DataFrame({"sample_id": ["r0", "r1"]}).to_parquet(ref / "features.parquet")
    write_json_atomic(ref / "manifest.json", {"model": "test", "description": {"model_weights": None}})
    _add_sketches(ref, [[1, 0], [0, 1]])
    f = _with_sketches(pd.DataFrame({"sample_id": ["a", "b"]}), [[1, 0], [1, 1]])
    # cosines: a → (1, 0); b → (1/√2, 1/√2)
    np.testing.assert_allclose(TargetScorer(str(ref), "mean").scores(f), [0.5, 2 ** -0.5])
    np.testing.assert_allclose(TargetScorer(str(ref), "max").scores(f), [1.0, 2 ** -0.5])
    _add_sketches(ref, [[1, 0], [0, 1]], seed=1)
    with pytest.raises(ResoFilterError, match=r"not comparable.*seed"):
        TargetScorer(str(ref)).scores(f)
    (ref / "sketches.npy").write_bytes(b"tampered")
    with pytest.raises(ResoFilterError, match="checksum"):
        load_sketches(ref)
    with pytest.raises(ConfigError, match="scorer.reference.features_dir"):
        build_scorer({"name": "target", "bad_end": "low", "reference": {"features_dir": None}}, {}, "mean_abs", 4)


def test_combined_takes_any_scorer_config():
    f = _with_sketches(pd.DataFrame({"sample_id": ["a", "b", "c"], "loss": [1.0, 3.0, 2.0]}),
                       [[1, 0], [1, 0.1], [0, 1]])
    combo = build_scorer({"name": "combined", "method": "rank_mean", "indicators": [
        {"baseline": "loss", "weight": 1.0}, {"scorer": {"name": "consensus", "bad_end": "low"}, "weight": 1.0}]},
        {"modules": ["mlp.up_proj"]}, "mean_abs", 4)
    assert isinstance(combo, CombinedScorer)
    # loss ranks 1,3,2; consensus badness (−cos to the mean (2/3, 1.1/3)) ranks a,b,c = 2,1,3
    # → (1+2)/6, (3+1)/6, (2+3)/6
    np.testing.assert_allclose(combo.scores(f), [3 / 6, 4 / 6, 5 / 6])


def test_select_stage_with_sketches_reports_consensus(tmp_path):
    from resofilter.commands import select as select_cmd

    cfg, pool = _stage_cfg(tmp_path, "scorer=consensus", "selection.keep_ratio=0.5", "selection.dedup=null")
    ids = [r["id"] for r in pool]
    noisy = np.array([r["meta"]["noisy"] for r in pool])
    sk = np.where(noisy[:, None], [[0.0, 1.0]], [[1.0, 0.0]]) + np.arange(9)[:, None] * 1e-3
    feats = pd.read_parquet(tmp_path / "feat" / "features.parquet")
    assert feats["sample_id"].tolist() == ids
    feats.iloc[::-1].to_parquet(tmp_path / "feat" / "features.parquet")  # scored in another order than the records
    _add_sketches(tmp_path / "feat", sk[::-1])
    manifest = select_cmd(cfg)
    diag = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert diag["scorers"]["consensus"]["auroc"] == 1.0 and diag["selected_scorer"]["auroc"] == 1.0
    kept = [json.loads(x)["id"] for x in (tmp_path / "out" / "subset.jsonl").read_text().splitlines()]
    assert not any(r["meta"]["noisy"] for r in pool if r["id"] in kept) and manifest["n_out"] == 5
