"""experiments/keep_runs.py: finished members only, every kept file byte-equal to its source (or reduced to
the four prediction fields), a member kept before left as it was, an interrupted copy redone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_experiment_script


@pytest.fixture(scope="module")
def script():
    return load_experiment_script("keep_runs.py")


def _member(d: Path, finished: bool, acc: float = 0.5) -> None:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("- seed=0\n")
    (d / "resolved_config.json").write_text('{"seed": 0}\n')
    (d / "eval").mkdir()
    (d / "eval" / "metrics.json").write_text(json.dumps({"eval": "gsm8k", "accuracy": acc}))
    (d / "eval" / "predictions.jsonl").write_text("".join(
        json.dumps({"sample_id": f"q{i}", "prompt": "p" * 50, "generation": "g" * 80, "extracted": str(i),
                    "gold": "1", "correct": i == 1}) + "\n" for i in range(3)))
    (d / "select").mkdir()
    (d / "select" / "diagnostics.json").write_text("{}")
    (d / "select" / "subset.jsonl").write_text("{}\n")  # not kept: the subset
    if finished:
        (d / "results.json").write_text(json.dumps({"accuracy": acc}))


def test_keeps_finished_members_and_never_overwrites(script, tmp_path):
    sweep, dest = tmp_path / "sweep", tmp_path / "kept"
    _member(sweep / "0", True)
    _member(sweep / "1", False)
    _member(sweep / "10", True, acc=0.7)
    assert script.main([str(sweep), str(dest), "--reduce"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["0", "10"]
    for rel in ("results.json", "resolved_config.json", ".hydra/overrides.yaml", "eval/metrics.json",
                "select/diagnostics.json"):
        assert (dest / "10" / rel).read_bytes() == (sweep / "10" / rel).read_bytes()
    assert not (dest / "10" / "select" / "subset.jsonl").exists()
    preds = [json.loads(x) for x in (dest / "0" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert preds == [{"sample_id": f"q{i}", "extracted": str(i), "gold": "1", "correct": i == 1} for i in range(3)]
    # member 0 finished again elsewhere (a resumed sweep rewrites .hydra/): the first copy stays
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- seed=9\n")
    (sweep / "1" / "results.json").write_text("{}")  # member 1 has finished since
    (dest / "1").mkdir()  # an earlier copy interrupted before its results.json: redone
    (dest / "1" / "stale.txt").write_text("x")
    assert script.main([str(sweep), str(dest)]) == 0
    assert (dest / "0" / ".hydra" / "overrides.yaml").read_text() == "- seed=0\n"
    assert (dest / "1" / "results.json").exists() and not (dest / "1" / "stale.txt").exists()
    assert (dest / "1" / "eval" / "predictions.jsonl").read_bytes() == \
        (sweep / "1" / "eval" / "predictions.jsonl").read_bytes()  # without --reduce: as it was
    assert script.main([str(tmp_path / "nothing"), str(dest)]) == 2
