"""Issue 13: input and filesystem faults get a named error and leave outputs others can read."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import stat

import pytest

from resofilter._io import temporary_dir, write_json_atomic
from resofilter.data.records import load_records
from resofilter.errors import DataError
from tests.conftest import FIXTURES, compose_cfg
from tests.helpers.common import score_args

ROWS = [{"query": f"q{i}", "response": f"r{i}"} for i in range(3)]


@pytest.mark.parametrize("ending,opener", [(".jsonl.gz", gzip.open), (".jsonl.bz2", bz2.open),
                                           (".jsonl.xz", lzma.open), (".json.gz", gzip.open)])
def test_compressed_inputs_read_transparently(tmp_path, ending, opener):
    path = tmp_path / f"data{ending}"
    text = json.dumps(ROWS) if ".json." in ending else "".join(json.dumps(r) + "\n" for r in ROWS)
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    assert [r.response for r in load_records(path)] == ["r0", "r1", "r2"]


def test_compressed_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl.gz:2.*malformed JSON"):
        load_records(path)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"query": "q", "response": "r"}\n' * 50)[:40])  # truncated archive
    with pytest.raises(DataError, match="broken.jsonl.gz.*cannot read"):
        load_records(broken)


def test_a_directory_that_is_not_a_dataset_is_a_named_error(tmp_path):
    (tmp_path / "somedir").mkdir()
    with pytest.raises(DataError, match="somedir.*not a `datasets.save_to_disk`"):
        load_records(tmp_path / "somedir")


@pytest.mark.parametrize("response", ["\u200b", " \u200b\u200d\n", "\ufeff", "\u00a0\u2060"])
def test_invisible_responses_are_refused(tmp_path, response):
    path = tmp_path / "d.jsonl"
    rows = [{"query": "q", "response": "ok"}, {"query": "q2", "response": response}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"d.jsonl:2.*empty response"):
        load_records(path)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        d = temporary_dir(tmp_path / "checkpoint")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, tiny_model_dir):
    import fcntl

    from resofilter._io import LOCK_FILE
    from resofilter.commands import score
    from resofilter.errors import ResoFilterError

    out = tmp_path / "o"
    out.mkdir()
    holder = open(out / LOCK_FILE, "w")  # another process's lock (flock conflicts across open files)
    holder.write('{"pid": 4242, "host": "node17", "stage": "score"}\n')
    holder.flush()
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(ResoFilterError, match="being written by another resofilter process.*4242.*node17"):
            score(compose_cfg(score_args(tiny_model_dir, out, "data.max_samples=8"), "score"))
    finally:
        holder.close()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else written
    assert score(compose_cfg(score_args(tiny_model_dir, out, "data.max_samples=8"), "score"))["records"]["n"] == 8


def test_a_waiting_writer_goes_on_when_the_holder_is_done(tmp_path):
    import threading
    import time

    from resofilter._io import output_lock

    order = []

    def first():
        with output_lock(tmp_path, "score"):
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.1)
    with output_lock(tmp_path, "score", wait=True):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]


def test_temporaries_of_a_killed_run_are_removed_on_the_next_start(tmp_path, tiny_model_dir):
    from resofilter.commands import score

    out = tmp_path / "o"
    (out / "shards").mkdir(parents=True)
    orphans = [out / ".features.parquet.abc123.tmp", out / ".manifest.json.x9.tmp",
               out / "shards" / ".shard-00001.parquet.q.tmp"]
    for p in orphans:
        p.write_text("half")
    score(compose_cfg(score_args(tiny_model_dir, out, "data.max_samples=8"), "score"))
    assert not any(p.exists() for p in orphans) and (out / "features.parquet").exists()


def test_unwritable_destinations_are_named_before_hydra_writes(tmp_path, monkeypatch):
    """Root passes every permission check, so the probe is patched: only `locked` refuses writes."""
    from resofilter import cli

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: os.path.realpath(p) != os.path.realpath(locked))
    msg = cli._unwritable([f"output_dir={locked / 'run1'}"])
    assert msg and "output_dir=" in msg and str(locked) in msg
    monkeypatch.chdir(locked)
    assert "current directory" in cli._unwritable(["seed=1"])
    assert cli._unwritable([f"output_dir={tmp_path / 'fine'}"]) is None  # output_dir is Hydra's run dir too
    assert "hydra.sweep.dir" in cli._unwritable(["-m", f"hydra.sweep.dir={locked / 's'}"])
    with pytest.raises(SystemExit) as e:
        cli.main(["score", f"output_dir={locked / 'x'}"])
    assert e.value.code == 2 and not (locked / "x").exists()


def test_output_dir_is_the_run_dir_so_nothing_lands_in_outputs(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "resofilter.cli", "score", "model.name_or_path=/nonexistent",
                        f"output_dir={tmp_path / 'out'}", "data=gsm8k"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "GSM8K_DIR": str(FIXTURES / "gsm8k")})
    assert p.returncode == 2 and "model.name_or_path`: /nonexistent does not exist" in p.stderr
    assert not (tmp_path / "outputs").exists() and (tmp_path / "out" / ".hydra").is_dir()


def test_a_killed_evaluation_resumes_to_the_same_predictions(tmp_path, tiny_model_dir, monkeypatch):
    """An eval loop that dies after 2 chunks: the rerun generates only the rest and ends identical."""
    from resofilter.commands import evaluate
    from resofilter.evaluation import generate as gen_mod

    calls = []

    def canned(model, tokenizer, prompts, *a, **k):  # deterministic per prompt, like greedy decoding
        calls.append(len(prompts))
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("killed")
        return [f"The answer is: {len(p) % 7}" for p in prompts]

    monkeypatch.setattr(gen_mod, "generate", canned)
    args = [f"model.name_or_path={tiny_model_dir}", "eval=gsm8k", "eval.max_samples=10", "eval.save_every=3",
            "template=plain"]
    fail_after = None
    ref = evaluate(compose_cfg([*args, f"output_dir={tmp_path / 'ref'}"], "evaluate"))["gsm8k"]
    out = tmp_path / "killed"
    calls.clear()
    fail_after = 2
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(compose_cfg([*args, f"output_dir={out}"], "evaluate"))
    assert not (out / "metrics.json").exists() and not (out / "predictions.jsonl").exists()
    calls.clear()
    fail_after = None
    got = evaluate(compose_cfg([*args, f"output_dir={out}"], "evaluate"))["gsm8k"]
    assert sum(calls) == 4 and got["resumed"] == 6  # 2 chunks of 3 were kept; 10 − 6 generated again
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "ref" / "predictions.jsonl").read_text()
    assert {k: v for k, v in got.items() if k != "resumed"} == {k: v for k, v in ref.items() if k != "resumed"}
    assert not list(out.glob(".predictions.*"))  # the partial files are gone once complete


@pytest.fixture(scope="module")
def reference_features(tmp_path_factory, tiny_model_dir):
    """Features of an uninterrupted run (the same settings as the damaged runs)."""
    import pandas as pd

    from resofilter.commands import score

    ref = tmp_path_factory.mktemp("ref")
    score(compose_cfg(score_args(tiny_model_dir, ref), "score"))
    return pd.read_parquet(ref / "features.parquet")


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "edit_value", "extra_row", "no_checksum"])
def test_a_damaged_shard_is_named_and_recomputed(tmp_path, tiny_model_dir, reference_features, monkeypatch,
                                                 caplog, damage):
    """Resume checks every shard against its checksum; only the bad one is scored again."""
    import logging

    import pandas as pd

    from resofilter.commands import score
    from resofilter.features import extract

    out = tmp_path / "o"
    real, written = extract.write_shard, []

    def dies_after_three(shard_dir, k, frame):
        if len(written) == 3:
            raise RuntimeError("killed")
        written.append(k)
        real(shard_dir, k, frame)

    monkeypatch.setattr(extract, "write_shard", dies_after_three)
    with pytest.raises(RuntimeError, match="killed"):
        score(compose_cfg(score_args(tiny_model_dir, out), "score"))
    monkeypatch.setattr(extract, "write_shard", real)
    bad = out / "shards" / "shard-00001.parquet"
    raw = bytearray(bad.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x10
        bad.write_bytes(bytes(raw))
    elif damage == "truncate":
        bad.write_bytes(bytes(raw[: len(raw) // 3]))
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "no_checksum":
        (out / "shards" / "shard-00001.parquet.sha256.json").unlink()
    else:
        df = pd.read_parquet(bad)
        df = df.assign(loss=df["loss"] + 1.0) if damage == "edit_value" else pd.concat([df, df.iloc[:1]])
        df.to_parquet(bad, index=False)
    with caplog.at_level(logging.WARNING):
        manifest = score(compose_cfg(score_args(tiny_model_dir, out), "score"))
    assert "shard-00001.parquet is invalid" in caplog.text
    assert manifest["resumed_shards"] == 2  # shards 0 and 2 kept, 1 recomputed
    pd.testing.assert_frame_equal(pd.read_parquet(out / "features.parquet"), reference_features)
