"""Data loading: formats, field mapping, stable ids, and every bad-input kind."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from resofilter.data.records import content_id, dedup_records, load_records, normalize_query
from resofilter.errors import ConfigError, DataError
from tests.conftest import GSM8K_TRAIN, write_jsonl

ROWS = [
    {"id": "a", "q": "What is 1+1?", "r": "2", "meta": {"noisy": False}},
    {"id": "b", "q": "What is 2+2?", "r": "4", "meta": {"noisy": True}},
]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hf_disk"])
def test_every_format_gives_the_same_records(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        import datasets

        path = tmp_path / "hf"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    recs = load_records(path, "q", "r", id_field="id")
    assert [(r.sample_id, r.query, r.response) for r in recs] == [
        ("a", "What is 1+1?", "2"), ("b", "What is 2+2?", "4")]
    assert recs[1].raw["meta"]["noisy"] is True


def test_gsm8k_fixture_ids_are_content_hash_plus_position():
    recs = load_records(GSM8K_TRAIN, "question", "answer")
    assert len(recs) == 64
    assert recs[3].sample_id == content_id(recs[3].query, None, recs[3].response, 3)
    again = load_records(GSM8K_TRAIN, "question", "answer")
    assert [r.sample_id for r in recs] == [r.sample_id for r in again]
    assert len({r.sample_id for r in recs}) == 64


def test_input_field_is_optional_and_mapped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}])
    (rec,) = load_records(path, "instruction", "output", input_field="input")
    assert rec.input == "1 2"


@pytest.mark.parametrize("lines,match", [
    (['{"q": "x", "r": "y"}', '{"q": "x", "r": '], r"d\.jsonl:2: malformed JSON"),
    (['{"q": "x"}'], r"d\.jsonl:1: missing field 'r'"),
    (['{"q": "x", "r": "   "}'], r"d\.jsonl:1: empty response"),
    (['{"q": "x", "r": 5}'], r"d\.jsonl:1: field 'r' must be a string"),
    (['{"q": "x", "r": "y", "id": 1}', '{"q": "z", "r": "w", "id": 1}'], r"d\.jsonl:2: duplicate sample id '1'"),
    (['[1, 2]'], r"d\.jsonl:1: expected a JSON object"),
    ([], r"d\.jsonl: no records"),
])
def test_bad_input_names_file_and_line(tmp_path, lines, match):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError, match=match):
        load_records(path, "q", "r", id_field="id" if "id" in "".join(lines) else None)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_dedup_exact_and_normalized():
    from resofilter.data.records import Record

    recs = [Record(str(i), q, "r") for i, q in enumerate(["Hi there!", "hi  there", "Hi there!", "other"])]
    kept, removed = dedup_records(recs, "exact")
    assert [r.sample_id for r in kept] == ["0", "1", "3"] and removed == 1
    kept, removed = dedup_records(recs, "normalized")
    assert [r.sample_id for r in kept] == ["0", "3"] and removed == 2
    assert normalize_query("Hi,  THERE!") == "hi there"
    with pytest.raises(ConfigError, match="dedup"):
        dedup_records(recs, "fuzzy")
