"""Fine-tuning throughput: the shipped Lightning SFT vs a plain PyTorch loop, side by side.

    python experiments/benchmarks/train_speed.py                  # defaults below (~5 min on 2 cores)
    python experiments/benchmarks/train_speed.py --steps 60 --repeats 1   # a quick look

Both sides train the same model (the embedded default's architecture, random init, saved
once as an HF directory) on the same tokenized samples of the synthetic pool, in the same
batch order, with the same AdamW, warmup + cosine schedule and gradient clipping:

- ``lightning``: :func:`resofilter.stages.finetune.run_finetune`, the code `resofilter
  finetune` runs (Trainer with CSV logger, deterministic, checkpoint saved afterwards);
- ``plain``: forward → loss → backward → clip → step → schedule, nothing else.

Each trial is a fresh subprocess (Lightning's ``deterministic=True`` changes global torch
state), trials alternate L P P L L P … so drift on a shared machine hits both alike.
Tokens/s counts non-padding tokens over the wall time of training only (model loading and
tokenization excluded, Lightning's fit set-up included). Printed: every trial, the median
ratio lightning/plain (target ≥ 0.9) and the final losses, which must agree (same work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def compose(args: argparse.Namespace, model_dir: str, out_dir: str) -> Any:
    from resofilter.cli import compose_config

    overrides = [f"model.name_or_path={model_dir}", f"output_dir={out_dir}", f"finetune.max_steps={args.steps}",
                 f"finetune.batch_size={args.batch_size}", "trainer.enable_progress_bar=false",
                 f"tokenize.max_length={args.max_length}", f"paths.cache_dir={args.cache_dir}"]
    return compose_config("finetune", overrides)


def records_and_template(cfg: Any) -> tuple[list, Any]:
    from resofilter.stages.context import load_data, template

    records, _ = load_data(cfg)
    return records, template(cfg)


def build_model(args: argparse.Namespace, model_dir: Path) -> None:
    """The embedded architecture, random init, with a tokenizer trained on the pool; saved to ``model_dir``."""
    from resofilter.models.loading import build_tiny_model
    from resofilter.models.tokenizer import train_tokenizer

    cfg = compose(args, "unused", str(model_dir))
    records, tmpl = records_and_template(cfg)
    e = cfg.model.embedded
    tok = train_tokenizer([f"{r.query}\n{r.response}" for r in records] + [tmpl.render_prompt("x", None, None)],
                          vocab_size=e.tokenizer.vocab_size)
    model = build_tiny_model(e.arch, len(tok), seed=cfg.build, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **e.architecture)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


def run_lightning(cfg: Any, model_dir: str, out_dir: str) -> dict[str, Any]:
    from resofilter.stages import specs
    from resofilter.stages.finetune import run_finetune

    records, tmpl = records_and_template(cfg)
    r = run_finetune(specs.finetune_spec(cfg), model_dir, records, tmpl, out_dir)
    tokens = r["tokens_per_s"] * r["train_s"]
    return {"tokens": tokens, "seconds": r["train_s"], "steps": r["steps"],
            "final_loss": r["final_metrics"]["train/loss"]}


def run_plain(cfg: Any, model_dir: str) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate
    from pytorch_lightning import seed_everything

    from resofilter.data.tokenize import tokenize_records
    from resofilter.models.loading import load_causal_lm, load_tokenizer
    from resofilter.training.sft import SFTDataModule, causal_lm_loss, make_scheduler

    ft = cfg.finetune
    records, tmpl = records_and_template(cfg)
    tok = load_tokenizer(model_dir)
    samples, _ = tokenize_records(records, tmpl, tok, cfg.tokenize.max_length, cfg.tokenize.prompt_overflow,
                                  cfg.tokenize.append_eos)
    seed_everything(ft.seed, workers=True, verbose=False)
    model = load_causal_lm(model_dir, cfg.model.dtype, cfg.model.get("attn_implementation"))
    model.train()
    loader = SFTDataModule(samples, tok.pad_token_id, ft.batch_size, seed=ft.seed).train_dataloader()
    t0 = time.perf_counter()
    opt = instantiate(ft.optimizer)([p for p in model.parameters() if p.requires_grad])
    total = ft.max_steps
    sched, _ = make_scheduler(instantiate(ft.scheduler), opt, total, ft.warmup_ratio)
    step, tokens, loss = 0, 0, torch.tensor(float("nan"))
    while step < total:
        # len(loader) batches per epoch, like Lightning: running the sampler to exhaustion would
        # draw one more (empty) permutation from its generator and shift every later epoch's order
        batches = iter(loader)
        for _ in range(len(loader)):
            batch = next(batches)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            loss, _ = causal_lm_loss(out.logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ft.gradient_clip_val)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step == total:
                break
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "steps": step, "final_loss": float(loss)}


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = compose(args, str(args.model_dir), out)
        if args.mode == "lightning":
            r = run_lightning(cfg, str(args.model_dir), out)
        else:
            r = run_plain(cfg, str(args.model_dir))
    return {"mode": args.mode, **r, "tokens_per_s": r["tokens"] / r["seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per trial")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3, help="trials per side (alternating order)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", default=os.environ.get("RESOFILTER_CACHE", str(ROOT / ".cache" / "resofilter")),
                   help="where the synthetic benchmark is built/cached")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(args, model_dir)
        order = ["lightning", "plain", "plain", "lightning"] * ((args.repeats + 1) // 2)
        trials: list[dict[str, Any]] = []
        for mode in order[: 2 * args.repeats]:
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--model-dir", str(model_dir),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--threads", str(args.threads),
                   "--cache-dir", args.cache_dir]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if out.returncode != 0:
                sys.exit(f"{mode} trial failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            trials.append(r)
            print(f"{mode:>9}: {r['steps']} steps  {r['tokens']:9.0f} tokens  {r['seconds']:7.2f} s  "
                  f"{r['tokens_per_s']:8.0f} tokens/s  final loss {r['final_loss']:.6f}", flush=True)

    by = {m: [t for t in trials if t["mode"] == m] for m in ("lightning", "plain")}
    med = {m: statistics.median(t["tokens_per_s"] for t in ts) for m, ts in by.items()}
    # trials come in adjacent pairs (L,P),(P,L),…: each pair's ratio sees the same machine load
    pairs = [(a, b) if a["mode"] == "lightning" else (b, a) for a, b in zip(trials[::2], trials[1::2], strict=True)]
    pair_ratios = [lt["tokens_per_s"] / pt["tokens_per_s"] for lt, pt in pairs]
    print()
    print(f"median tokens/s: lightning {med['lightning']:.0f}, plain {med['plain']:.0f}")
    print(f"lightning / plain tokens/s (median of {len(pair_ratios)} adjacent pairs)  "
          f"{statistics.median(pair_ratios):6.3f}   (target ≥ 0.9; pairs: "
          + ", ".join(f"{x:.3f}" for x in pair_ratios) + ")")
    losses = {m: {round(t["final_loss"], 6) for t in ts} for m, ts in by.items()}
    print(f"final loss after {args.steps} steps: lightning {sorted(losses['lightning'])}, "
          f"plain {sorted(losses['plain'])}")


if __name__ == "__main__":
    main()
