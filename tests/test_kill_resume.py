"""A real SIGKILL per stage (issue 13): a killed subprocess, rerun with the same command, ends with
the outputs of an uninterrupted run. (score's: tests/test_score_stage.py; in-process fault
injection for every stage: test_finetune_resume.py, test_faults.py, test_paper_scale.py.)"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import GSM8K_TRAIN
from tests.helpers.common import _cli

pytestmark = pytest.mark.slow


def _kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 300) -> None:
    p = _cli(args)
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, f"finished before the kill:\n{p.stdout.read()}"
    p.send_signal(signal.SIGKILL)
    p.wait()


def _run_ok(args: list[str]) -> str:
    p = _cli(args)
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log
    return log


def test_sigkilled_finetune_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model_dir):
    def args(out: Path) -> list[str]:
        return ["finetune", f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "data=gsm8k",
                f"data.path={GSM8K_TRAIN}", "data.max_samples=16", "template=plain", "tokenize.max_length=1024",
                f"output_dir={out}", "finetune.max_steps=40", "finetune.batch_size=4",
                "finetune.checkpoint_every_n_steps=5", "trainer.enable_progress_bar=false"]

    _run_ok(args(tmp_path / "ref"))
    out = tmp_path / "killed"
    ckpt = out / "resume" / "last.ckpt"
    first: list[float] = []

    def second_save() -> bool:  # a save exists and training went on past it
        if ckpt.exists() and not first:
            first.append(ckpt.stat().st_mtime)
        return bool(first) and ckpt.stat().st_mtime > first[0]

    _kill_when(args(out), second_save)
    assert not (out / "finetune.json").exists() and not (out / "checkpoint").exists()
    log = _run_ok(args(out))
    assert "resuming fine-tuning from" in log
    ref, got = (load_file(d / "checkpoint" / "model.safetensors") for d in (tmp_path / "ref", out))
    for name in ref:
        assert (ref[name] - got[name]).abs().max() <= 1e-6, name


def test_sigkilled_evaluation_resumes_to_the_same_predictions(tmp_path, tiny_model_dir):
    def args(out: Path) -> list[str]:
        return ["evaluate", f"model.name_or_path={tiny_model_dir}", "eval=gsm8k", "eval.max_samples=24",
                "eval.save_every=4", "eval.max_new_tokens=48", "eval.min_new_tokens=48", "template=plain",
                f"output_dir={out}"]

    _run_ok(args(tmp_path / "ref"))
    out = tmp_path / "killed"

    def some_done() -> bool:
        return any(len(f.read_text().splitlines()) >= 1 + 8 for f in out.glob(".predictions.*.partial.jsonl"))

    _kill_when(args(out), some_done)
    assert not (out / "metrics.json").exists()
    log = _run_ok(args(out))
    assert "predictions already done" in log
    assert (out / "predictions.jsonl").read_text() == (tmp_path / "ref" / "predictions.jsonl").read_text()
