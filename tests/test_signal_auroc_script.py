"""experiments/signal_auroc.py: every row composes to the scorer it names; the table's layout by hand."""

from __future__ import annotations

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
