"""What an interruption costs: each stage uninterrupted, then SIGKILLed about halfway and rerun.

    python experiments/benchmarks/resume_overhead.py            # ~6 min on 2 cores; run it alone
    python experiments/benchmarks/resume_overhead.py --quick    # smaller stages, a quick look

Model: a random-init tiny Llama (8 layers, d_model 256, a BPE vocabulary trained on GSM8K
text) saved as an HF directory; data: GSM8K train (scoring, fine-tuning) and test
(evaluation). Every run is the real CLI in its own process, so the times include what a
user pays on a rerun (start-up, loading the model, reading what was done). For each stage:

    full       the uninterrupted run
    killed     time until the SIGKILL (the progress marker past about half)
    rerun      the rerun that resumes and finishes
    rerun/full what the rerun costs against starting over (1.0 = no resume at all)
    overhead   (killed + rerun − full) / full: work lost at the kill plus the restart
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "gsm8k"
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k"
DATA = SHARED if (SHARED / "train.jsonl").exists() else FIXTURE


def build_model(out: Path) -> Path:
    from resofilter.data.records import load_records
    from resofilter.models.loading import build_tiny_model
    from resofilter.models.tokenizer import train_tokenizer

    records = load_records(DATA / "train.jsonl", "question", "answer", max_samples=2000)
    tok = train_tokenizer([f"{r.query}\n{r.response}" for r in records], vocab_size=2048)
    model = build_tiny_model("llama", len(tok), seed=0, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                             num_attention_heads=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id, max_position_embeddings=1024)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "resofilter.cli", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    if cli(args).wait() != 0:
        raise SystemExit(f"failed: resofilter {' '.join(args)}")
    return time.perf_counter() - t0


def killed_at(args: list[str], halfway: Callable[[], bool]) -> float:
    t0 = time.perf_counter()
    p = cli(args)
    while not halfway():
        if p.poll() is not None:
            raise SystemExit(f"finished before the kill: resofilter {' '.join(args)}")
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return time.perf_counter() - t0


def saves_seen(k: int) -> Callable[[Path], bool]:
    """True once ``resume/last.ckpt`` has been (re)written ``k`` times (polled for mtime changes)."""
    seen: set[float] = set()

    def check(out: Path) -> bool:
        ckpt = out / "resume" / "last.ckpt"
        try:
            seen.add(ckpt.stat().st_mtime)
        except FileNotFoundError:
            pass
        return len(seen) >= k

    return check


def lines(pattern: str, d: Path) -> int:
    return sum(len(f.read_text().splitlines()) - 1 for f in d.glob(pattern))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    n_score, steps, n_eval = (64, 40, 16) if a.quick else (512, 200, 64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model")
        common = [f"model.name_or_path={model}", "model.embedded=null", "template=plain", "tokenize.max_length=512"]
        shard = 32
        stages = {
            "score": (lambda out: ["score", *common, "data=gsm8k", f"data.path={DATA / 'train.jsonl'}",
                                   f"data.max_samples={n_score}", f"score.shard_size={shard}", "score.batch_size=8",
                                   "score.progress_bar=false", f"output_dir={out}"],
                      lambda out: len(list((out / "shards").glob("shard-*.parquet"))) >= n_score // shard // 2),
            "finetune": (lambda out: ["finetune", *common, "data=gsm8k", f"data.path={DATA / 'train.jsonl'}",
                                      f"data.max_samples={n_score}", f"finetune.max_steps={steps}",
                                      "finetune.batch_size=8", f"finetune.checkpoint_every_n_steps={steps // 10}",
                                      "trainer.enable_progress_bar=false", f"output_dir={out}"],
                         saves_seen(5)),  # 5 of the 9 periodic saves: step 100 of 200
            "evaluate": (lambda out: ["evaluate", *common, "eval=gsm8k", f"eval.path={DATA / 'test.jsonl'}",
                                      f"eval.max_samples={n_eval}", "eval.save_every=8", "eval.max_new_tokens=64",
                                      "eval.min_new_tokens=64", f"output_dir={out}"],
                         lambda out: lines(".predictions.*.partial.jsonl", out) >= n_eval // 2),
        }
        print(f"{'stage':>9} {'full s':>8} {'killed s':>9} {'rerun s':>8} {'rerun/full':>11} {'overhead':>9}")
        for name, (args, halfway) in stages.items():
            full = timed(args(tmp / f"{name}-full"))
            out = tmp / f"{name}-killed"
            kill = killed_at(args(out), lambda out=out, halfway=halfway: halfway(out))
            rerun = timed(args(out))
            print(f"{name:>9} {full:8.1f} {kill:9.1f} {rerun:8.1f} {rerun / full:11.2f} "
                  f"{(kill + rerun - full) / full:9.2f}", flush=True)


if __name__ == "__main__":
    main()
