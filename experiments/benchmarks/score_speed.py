"""Scoring speed and memory: literal loop vs forward-only floor vs fast closed form, side by side.

    python experiments/benchmarks/score_speed.py                      # defaults below (~10 min on 2 cores)
    python experiments/benchmarks/score_speed.py --n 128 --layers 4   # a quick look

``fast_signals`` adds the issue-15 signals (16 × 16 gradient sketches of the three matrices,
token-level losses) to ``fast``: their cost is ``fast+signals / fast``.

Model: a random-init tiny Llama (12 layers, d_model 256, a BPE vocabulary of a few
thousand trained on GSM8K text) scoring GSM8K train samples, last-3-layer up_proj, AdamW.
Every mode runs in its own subprocess (so peak RSS is that mode's own) on the same
batches (bucketed by length). Printed: times, the ratios the project tracks, peak RSS,
and the rank agreement of fast (fp32) with the exact oracle (float64).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
if not DEFAULT_DATA.exists():
    DEFAULT_DATA = ROOT / "tests" / "fixtures" / "gsm8k" / "train.jsonl"


def setup(args: argparse.Namespace):  # noqa: ANN201
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from resofilter.data.records import load_records
    from resofilter.data.tokenize import tokenize_records
    from resofilter.features.targets import find_targets
    from resofilter.models.loading import build_tiny_model
    from resofilter.models.tokenizer import train_tokenizer

    records = load_records(args.data, "question", "answer", max_samples=max(args.n, 2000))
    tok = train_tokenizer([f"{r.query}\n{r.response}" for r in records], vocab_size=args.vocab)
    template = instantiate(OmegaConf.load(ROOT / "conf" / "template" / "metamath.yaml"))
    samples, _ = tokenize_records(records[: args.n], template, tok, 512)
    model = build_tiny_model("llama", len(tok), seed=0, hidden_size=256, intermediate_size=688,
                             num_hidden_layers=args.layers, num_attention_heads=8,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             bos_token_id=tok.bos_token_id)
    model.eval()
    targets = find_targets(model, ["mlp.up_proj"], [-3, -2, -1])
    return tok, samples, model, targets


def run_mode(args: argparse.Namespace) -> dict:
    from resofilter.data.tokenize import Collator, length_buckets
    from resofilter.features.closed_form import StepConfig
    from resofilter.features.fast import FastScorer
    from resofilter.features.literal import LiteralScorer

    torch.set_num_threads(args.threads)
    tok, samples, model, targets = setup(args)
    samples = samples[: args.count]
    collate = Collator(tok.pad_token_id)
    batches = [collate([samples[i] for i in b])
               for b in length_buckets([len(s) for s in samples], args.batch_size)]
    step = StepConfig("adamw", 1e-5, 0.01, 1e-8)
    stats = ["mean_abs"]
    scores: dict[str, float] = {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if args.mode == "forward":
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    else:
        if args.mode in ("fast", "fast_signals"):
            if args.dtype == "float64":
                model = model.to(torch.float64)  # in place: targets keep pointing at its Linears
            from resofilter.features.sketch import SketchSpec

            # fast_signals: + 16×16 gradient sketches of the 3 matrices and the token-level signals
            sketch = SketchSpec(enabled=True, k_out=16, k_in=16) if args.mode == "fast_signals" else None
            scorer = FastScorer(model, targets, step, stats, sketch=sketch)
        else:  # the literal loop: fresh AdamW over all parameters, step, diff, restore
            scorer = LiteralScorer(model, targets, step, stats,
                                 dtype=torch.float64 if args.dtype == "float64" else torch.float32)
        from resofilter.features.tokens import token_signals

        for b in batches:
            scored = scorer.score_batch(b)
            out = scored.stats
            if args.mode == "fast_signals":  # what the feature module adds per batch
                token_signals(scored.token_losses, b["labels"], 4, None)
                scored.sketch.to(torch.float32).numpy()
            per = np.mean([out[t.name]["mean_abs"].numpy() for t in targets], axis=0)
            scores.update(zip(b["sample_ids"], per.tolist(), strict=True))
    elapsed = time.perf_counter() - t0
    return {"mode": args.mode, "dtype": args.dtype, "n": len(samples), "seconds": elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss0 / 1024, "scores": scores,
            "tokens": sum(len(s) for s in samples)}


def sub(args: argparse.Namespace, mode: str, dtype: str, count: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--dtype", dtype, "--count", str(count),
           "--n", str(args.n), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--batch-size", str(args.batch_size), "--data", str(args.data), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="samples (the 4N growth check uses N/4 and N)")
    p.add_argument("--exact-n", type=int, default=128, help="samples for the float64 oracle (Spearman)")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--modes", default="forward,fast,fast_signals,fast_quarter,fast64,literal,exact64",
                   help="which measurements to run (ratios need their inputs)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the listed modes this many times, interleaved; times are medians, ratios the median "
                        "of each round's ratio (this machine is shared and noisy)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_mode(args)))
        return
    from scipy.stats import spearmanr

    n = args.n
    plan = {
        "forward": ("forward", "float32", n), "fast": ("fast", "float32", n),
        "fast_signals": ("fast_signals", "float32", n),
        "fast_quarter": ("fast", "float32", n // 4), "fast64": ("fast", "float64", n // 4),
        "literal": ("literal", "float32", n), "exact64": ("literal", "float64", args.exact_n),
    }
    modes = args.modes.split(",")
    rounds = [{k: sub(args, *plan[k]) for k in modes} for _ in range(max(args.repeat, 1))]
    for i, rnd in enumerate(rounds):
        for k, r in rnd.items():
            print(f"{k:>13}: n={r['n']:4d}  {r['seconds']:8.2f} s  {r['n'] / r['seconds']:7.2f} samples/s  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB" + (f"  (round {i + 1})" if len(rounds) > 1 else ""))
    res = {k: {**rounds[0][k], "seconds": float(np.median([r[k]["seconds"] for r in rounds])),
               "peak_rss_mb": float(np.median([r[k]["peak_rss_mb"] for r in rounds]))} for k in modes}
    f, fw = res["fast"]["seconds"], res["forward"]["seconds"]
    print()
    print(f"fast / forward-only time            {f / fw:6.2f}   (target ≤ 1.8)")
    print(f"fast peak RSS / forward peak RSS    {res['fast']['peak_rss_mb'] / res['forward']['peak_rss_mb']:6.2f}"
          "   (target ≤ 1.5)")
    if "fast_signals" in res:
        fs = res["fast_signals"]["seconds"]
        per_round = [r["fast_signals"]["seconds"] / r["fast"]["seconds"] for r in rounds]
        print(f"fast+signals / forward-only time    {fs / fw:6.2f}   (sketches 16×16 + token signals)")
        print(f"fast+signals / fast time            {np.median(per_round):6.2f}   (the extra cost of the new signals; "
              f"rounds: {', '.join(f'{x:.3f}' for x in per_round)})")
    if "fast_quarter" in res:
        print(f"fast time N/4 → N                   {f / res['fast_quarter']['seconds']:6.2f}x  (target ≤ 4.4x)")
    if "fast64" in res and "fast_quarter" in res:
        print(f"fast float64 / fast fp32 time       {res['fast64']['seconds'] / res['fast_quarter']['seconds']:6.2f}"
              "   (on N/4 samples)")
    if "literal" in res:
        lit = res["literal"]["seconds"]
        print(f"literal / forward-only time         {lit / fw:6.2f}   (the ceiling of literal/fast on this machine)")
        print(f"literal / fast time                 {lit / f:6.2f}   (target ≥ 0.5 × ceiling = {0.5 * lit / fw:.2f})")
    if "exact64" in res:
        ids = list(res["exact64"]["scores"])
        ex64 = [res["exact64"]["scores"][i] for i in ids]
        fast = [res["fast"]["scores"][i] for i in ids]
        print(f"Spearman fast fp32 vs exact fp64    {spearmanr(fast, ex64).statistic:8.5f} (target ≥ 0.999; "
              f"{len(ids)} samples)")
        if "fast64" in res:
            ids64 = [i for i in ids if i in res["fast64"]["scores"]]
            fast64 = [res["fast64"]["scores"][i] for i in ids64]
            sub64 = [res["exact64"]["scores"][i] for i in ids64]
            rho = spearmanr(fast64, sub64).statistic
            print(f"Spearman fast fp64 vs exact fp64    {rho:8.5f} ({len(ids64)} samples)")
        if "literal" in res:
            lit32 = [res["literal"]["scores"][i] for i in ids]
            rho = spearmanr(lit32, ex64).statistic
            print(f"Spearman literal fp32 vs exact fp64 {rho:8.5f} (the authors' fp32 loop)")
        rel = np.std(ex64) / np.mean(ex64)
        print(f"score spread: mean {np.mean(ex64):.4g}, std {np.std(ex64):.3g} (relative {rel:.2g})")


if __name__ == "__main__":
    main()
