"""Scoring speed and memory: literal loop vs forward-only floor vs fast closed form, side by side.

    python experiments/benchmarks/score_speed.py                      # defaults below (~10 min on 2 cores)
    python experiments/benchmarks/score_speed.py --n 128 --layers 4   # a quick look
    python experiments/benchmarks/score_speed.py --memory             # fast vs fast without recompute/mmap threshold

On a lent GPU (one device with ≥ 24 GB; ~3-5 minutes, most of it building the random model):

    python experiments/benchmarks/score_speed.py --device cuda --shape gemma2-2b --n 256 \
        --modes forward,fast,fast_signals,literal --batch-size 8

``--shape`` takes a real model's shape with random weights (no download): ``gemma2-2b``
(Gemma2Config of the 2b: 26 layers, d 2304, up_proj 9216×2304, vocabulary 256k, fp32 ≈ 10.5 GB)
or ``llama2-7b`` (d 4096, up_proj 11008×4096, vocabulary 32k; ``--layers 8`` keeps it ≈ 8 GB).
On several GPUs, a model larger than one of them, its layers split over all (``score.device_map=auto``):

    python experiments/benchmarks/score_speed.py --device cuda --device-map --shape llama2-7b --n 128 \
        --modes forward,fast --batch-size 8

On CUDA peak memory is ``torch.cuda.max_memory_allocated`` of each mode's own process (with
``--device-map`` the largest device's); on CPU the process's peak RSS. The projection prints
GPU-hours for 395k MetaMathQA samples of the fixture's length distribution
(tests/fixtures/metamathqa) at the measured fast tokens per second.

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
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
if not DEFAULT_DATA.exists():
    DEFAULT_DATA = ROOT / "tests" / "fixtures" / "gsm8k" / "train.jsonl"


CONF = OmegaConf.load(ROOT / "conf" / "config.yaml")  # the score stage's defaults
ALL_STATISTICS = list(OmegaConf.load(ROOT / "conf" / "candidates" / "paper.yaml").statistics)  # the default's eight

# Real models' shapes (random weights): the sizes of their Hugging Face configs.
SHAPES = {
    "tiny": None,  # the 12-layer d256 tiny Llama below (--layers, --vocab)
    "gemma2-2b": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                 final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=256,
                                 sliding_window=4096, max_position_embeddings=8192, tie_word_embeddings=True)),
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                tie_word_embeddings=False)),
}


def model_config(args: argparse.Namespace, vocab: int):  # noqa: ANN201
    """The benchmark model's config: ``--shape`` (a real model's sizes, ``--layers`` overriding its depth if
    given) or the tiny Llama."""
    from resofilter.models.loading import tiny_model_config

    if SHAPES.get(args.shape) is None:
        # d 256 → up_proj 688: the tiny Llama's 2.69× MLP width kept at every --hidden unless --mlp-ratio
        return tiny_model_config("llama", vocab, hidden_size=args.hidden,
                                 intermediate_size=int(args.hidden * (args.mlp_ratio or 688 / 256)),
                                 num_hidden_layers=args.layers, num_attention_heads=8)
    from transformers import Gemma2Config, LlamaConfig

    arch, sizes = SHAPES[args.shape]
    sizes = {**sizes, **({"num_hidden_layers": args.layers} if args.layers else {})}
    return (Gemma2Config if arch == "gemma2" else LlamaConfig)(**sizes)


def fp32_bytes(config) -> int:  # noqa: ANN001
    """The model's fp32 weights, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 4 * sum(p.numel() for p in model.parameters())


class Device:
    """Where a mode runs and how its peak memory is read: CUDA's allocator statistics, or the process's RSS."""

    def __init__(self, name: str, split: bool = False) -> None:
        self.name = name
        self.is_cuda = name.startswith("cuda")
        # a model split over the GPUs (--device-map): each one's peak is read, the largest is reported
        self.names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if split and self.is_cuda else [name]

    def reset(self) -> None:
        if self.is_cuda:
            for d in self.names:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)

    def sync(self) -> None:
        if self.is_cuda:
            for d in self.names:
                torch.cuda.synchronize(d)

    def peak_mb(self) -> float:
        if self.is_cuda:
            return max(torch.cuda.max_memory_allocated(d) for d in self.names) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def place(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """The model's layers over the GPUs as ``score.device_map=auto`` places them (accelerate); on the CPU every
    layer a separately hooked placement on the CPU (the same hooks, nothing offloaded), as tests/test_device_map.py."""
    from accelerate import dispatch_model, infer_auto_device_map

    if device.startswith("cuda"):
        return dispatch_model(model, device_map=infer_auto_device_map(
            model, no_split_module_classes=model._no_split_modules))
    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)


def setup(args: argparse.Namespace):  # noqa: ANN201
    from hydra.utils import instantiate
    from transformers import AutoModelForCausalLM

    from resofilter.data.records import load_records
    from resofilter.data.tokenize import tokenize_records
    from resofilter.features.targets import find_targets
    from resofilter.models.tokenizer import train_tokenizer

    query_field, response_field = args.fields.split(",")
    records = load_records(args.data, query_field, response_field, max_samples=max(args.n, 2000))
    if args.model is not None:  # real weights: the model's own tokenizer and chat template (e.g. the converted SmolLM2)
        from resofilter.data.templates import ChatTemplate
        from resofilter.models.loading import load_causal_lm, load_tokenizer

        tok = load_tokenizer(str(args.model))
        template = ChatTemplate() if tok.chat_template else instantiate(
            OmegaConf.load(ROOT / "conf" / "template" / "metamath.yaml"))
        samples, _ = tokenize_records(records[: args.n], template, tok, 512)
        model = load_causal_lm(str(args.model), "float32", "sdpa")
        config = model.config
        if not args.device_map:
            model.to(args.device)
    else:
        tok = train_tokenizer([f"{r.query}\n{r.response}" for r in records], vocab_size=args.vocab)
        template = instantiate(OmegaConf.load(ROOT / "conf" / "template" / "metamath.yaml"))
        samples, _ = tokenize_records(records[: args.n], template, tok, 512)
        config = model_config(args, len(tok))  # a real shape's vocabulary holds the small tokenizer's ids
        config.pad_token_id, config.eos_token_id, config.bos_token_id = (tok.pad_token_id, tok.eos_token_id,
                                                                         tok.bos_token_id)
        with torch.random.fork_rng(devices=[]), torch.device("cpu" if args.device_map else args.device):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation="eager" if config.model_type == "gemma2" else "sdpa")
    model.eval()
    if args.device_map:
        model = place(model, args.device)
    layers = list(range(config.num_hidden_layers)) if args.score_layers == "all" else [-3, -2, -1]
    targets = find_targets(model, ["mlp.up_proj"], layers)
    return tok, samples, model, targets


def run_mode(args: argparse.Namespace) -> dict:
    from resofilter.data.tokenize import Collator, length_buckets
    from resofilter.features.closed_form import StepConfig
    from resofilter.features.fast import FastScorer
    from resofilter.features.literal import LiteralScorer
    from resofilter.features.memory import set_mmap_threshold

    torch.set_num_threads(args.threads)
    set_mmap_threshold(args.mmap_threshold or None)  # the score stage's default (score.mmap_threshold)
    device = Device(args.device, split=args.device_map)
    tok, samples, model, targets = setup(args)
    samples = samples[: args.count or None]
    collate = Collator(tok.pad_token_id)
    batches = [collate([samples[i] for i in b])
               for b in length_buckets([len(s) for s in samples], args.batch_size)]
    step = StepConfig("adamw", 1e-5, 0.01, 1e-8)
    # the paper's statistic, or the score stage's default list (conf/config.yaml score.statistics)
    stats = ALL_STATISTICS if args.statistics == "all" else ["mean_abs"]
    extra = dict(quantiles=list(CONF.score.quantiles), count_above=[b * step.lr for b in CONF.score.count_above]
                 ) if args.statistics == "all" else {}
    scores: dict[str, float] = {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    device.reset()
    t0 = time.perf_counter()
    if args.mode == "forward":
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"].to(args.device), attention_mask=b["attention_mask"].to(args.device),
                      use_cache=False)
    else:
        if args.mode in ("fast", "fast_signals"):
            if args.dtype == "float64":
                model = model.to(torch.float64)  # in place: targets keep pointing at its Linears
            from resofilter.features.sketch import SketchSpec

            # fast_signals: + 16×16 gradient sketches of the 3 matrices and the token-level signals
            sketch = SketchSpec(enabled=True, k_out=16, k_in=16) if args.mode == "fast_signals" else None
            scorer = FastScorer(model, targets, step, stats, sketch=sketch, recompute=args.recompute,
                                logits_chunk_elements=args.logits_chunk, **extra)
        else:  # the literal loop: fresh AdamW over all parameters, step, diff, restore
            scorer = LiteralScorer(model, targets, step, stats,
                                   dtype=torch.float64 if args.dtype == "float64" else torch.float32)
        from resofilter.features.tokens import token_signals

        for b in batches:
            scored = scorer.score_batch(b)
            out = scored.stats
            if args.mode == "fast_signals":  # what the feature module adds per batch
                token_signals(scored.token_losses.cpu(), b["labels"], 4, None)
                scored.sketch.to(torch.float32).cpu().numpy()
            per = np.mean([out[t.name]["mean_abs"].cpu().numpy() for t in targets], axis=0)
            scores.update(zip(b["sample_ids"], per.tolist(), strict=True))
    device.sync()
    elapsed = time.perf_counter() - t0
    return {"mode": args.mode, "dtype": args.dtype, "n": len(samples), "seconds": elapsed,
            "peak_mb": device.peak_mb(), "rss_before_mb": rss0 / 1024, "scores": scores,
            "tokens": sum(len(s) for s in samples)}


# what each measurement runs: (mode, dtype, samples: n | quarter | exact, recompute, mmap threshold
# [, scored layers, statistics — else --score-layers and --statistics])
def plan(args: argparse.Namespace) -> dict[str, tuple]:
    n, thr, rec = args.n, args.mmap_threshold, args.recompute
    return {
        # the settings of `resofilter score` side by side (issue 36): the paper's (last 3 layers, mean |ΔW|, no
        # signals); the default (candidates=paper: last 3 layers × the eight statistics, sketches, token losses);
        # candidates=all (every layer × the eight + signals); every layer with mean |ΔW| alone
        "paper": ("fast", "float32", n, rec, thr, "last3", "paper"),
        "default": ("fast_signals", "float32", n, rec, thr, "last3", "all"),
        "candidates_all": ("fast_signals", "float32", n, rec, thr, "all", "all"),
        "all_mean_abs": ("fast", "float32", n, rec, thr, "all", "paper"),
        "forward": ("forward", "float32", n, True, thr), "fast": ("fast", "float32", n, rec, thr),
        "fast_signals": ("fast_signals", "float32", n, rec, thr),
        "fast_quarter": ("fast", "float32", n // 4, rec, thr), "fast64": ("fast", "float64", n // 4, rec, thr),
        "literal": ("literal", "float32", n, True, thr), "exact64": ("literal", "float64", args.exact_n, True, thr),
        "fast_no_recompute": ("fast", "float32", n, False, thr),  # the threshold alone
        # before issue 25: no recomputation, glibc's dynamic mmap threshold (and a forward pass under it)
        "fast_before": ("fast", "float32", n, False, 0), "forward_before": ("forward", "float32", n, True, 0),
    }


def sub(args: argparse.Namespace, mode: str, dtype: str, count: int, recompute: bool, threshold: int,
        layers: str | None = None, statistics: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--dtype", dtype, "--count", str(count),
           "--n", str(args.n), "--layers", str(args.layers), "--vocab", str(args.vocab),
           "--batch-size", str(args.batch_size), "--data", str(args.data), "--threads", str(args.threads),
           "--device", args.device, "--shape", args.shape, "--mmap-threshold", str(threshold),
           "--logits-chunk", str(args.logits_chunk), *(["--device-map"] if args.device_map else []),
           "--hidden", str(args.hidden),
           "--score-layers", layers or args.score_layers,
           "--statistics", statistics or args.statistics, "--mlp-ratio", str(args.mlp_ratio or 0),
           "--fields", args.fields,
           *(["--model", str(args.model)] if args.model else []), *([] if recompute else ["--no-recompute"])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def projection(fast: dict, tokens_per_sample: float, samples: int = 395_000) -> float:
    """Hours to score ``samples`` samples of ``tokens_per_sample`` tokens at ``fast``'s tokens per second."""
    return samples * tokens_per_sample / (fast["tokens"] / fast["seconds"]) / 3600


def metamath_tokens_per_sample(args: argparse.Namespace) -> float:
    """The mean tokenized length of the MetaMathQA fixture (query + response under the metamath template)."""
    from hydra.utils import instantiate

    from resofilter.data.records import load_records
    from resofilter.data.tokenize import tokenize_records
    from resofilter.models.tokenizer import train_tokenizer

    gsm = load_records(args.data, *args.fields.split(","), max_samples=2000)
    tok = train_tokenizer([f"{r.query}\n{r.response}" for r in gsm], vocab_size=args.vocab)
    template = instantiate(OmegaConf.load(ROOT / "conf" / "template" / "metamath.yaml"))
    mm = load_records(ROOT / "tests" / "fixtures" / "metamathqa" / "train.jsonl", "query", "response")
    samples, _ = tokenize_records(mm, template, tok, 512)
    return float(np.mean([len(s) for s in samples]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="samples (the 4N growth check uses N/4 and N)")
    p.add_argument("--exact-n", type=int, default=128, help="samples for the float64 oracle (Spearman)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 12 for tiny, the shape's own)")
    p.add_argument("--hidden", type=int, default=256, help="the tiny Llama's d_model (up_proj: d × 688/256)")
    p.add_argument("--statistics", default="paper", choices=["paper", "all"],
                   help="mean_abs (the paper's) or the score stage's default eight (quantiles, counts, ...)")
    p.add_argument("--mlp-ratio", type=float, default=0, help="tiny Llama: up_proj rows / d (0: 688/256)")
    p.add_argument("--score-layers", default="last3", choices=["last3", "all"],
                   help="the up_proj of the last 3 layers (the paper's) or of every layer (candidates.indices=all)")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="the model's shape (random weights)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (peak memory: RSS | max_memory_allocated)")
    p.add_argument("--mmap-threshold", type=int, default=CONF.score.mmap_threshold or 0,
                   help="score.mmap_threshold for every mode (default: conf/config.yaml's; 0: glibc's dynamic one)")
    p.add_argument("--device-map", action="store_true",
                   help="split the model's layers over every GPU (score.device_map=auto; accelerate); on the CPU "
                        "the same hooks with every layer on the CPU")
    p.add_argument("--logits-chunk", type=int, default=CONF.score.logits_chunk_elements,
                   help="score.logits_chunk_elements: the loss runs on slices of ≤ this many logits")
    p.add_argument("--no-recompute", dest="recompute", action="store_false",
                   help="score.recompute_layers=false (the child of fast_before)")
    p.add_argument("--memory", action="store_true",
                   help="modes forward,fast,fast_no_recompute,forward_before,fast_before: issue 25's memory "
                        "change side by side")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--fields", default="question,answer", help="the records' query and response fields (the "
                   "synthetic pool: query,response)")
    p.add_argument("--model", type=Path, default=None,
                   help="a model directory with real weights (e.g. .cache/resofilter/models/gguf-b179c9523d0e6a0f, "
                        "the converted SmolLM2): scored in its own tokenizer and chat template instead of --shape")
    p.add_argument("--modes", default="forward,fast,fast_signals,fast_quarter,fast64,literal,exact64",
                   help="which measurements to run (ratios need their inputs)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the listed modes this many times, interleaved; times are medians, ratios the median "
                        "of each round's ratio (this machine is shared and noisy)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.layers is None and args.shape == "tiny":
        args.layers = 12
    if args.memory:
        args.modes = "forward,fast,fast_no_recompute,forward_before,fast_before"
    if args.child:
        print(json.dumps(run_mode(args)))
        return
    from scipy.stats import spearmanr

    if args.model is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.model)
    else:
        config = model_config(args, args.vocab)
    memory = "peak device memory (max_memory_allocated)" if Device(args.device).is_cuda else "peak RSS"
    print(f"model: {args.model or args.shape}, {config.num_hidden_layers} layers, d {config.hidden_size}, up_proj "
          f"{config.intermediate_size}×{config.hidden_size}, vocabulary {config.vocab_size}, fp32 weights "
          f"{fp32_bytes(config) / 2**30:.1f} GiB; device {args.device}; memory: {memory}")
    steps = plan(args)
    modes = args.modes.split(",")
    rounds = [{k: sub(args, *steps[k]) for k in modes} for _ in range(max(args.repeat, 1))]
    for i, rnd in enumerate(rounds):
        for k, r in rnd.items():
            print(f"{k:>14}: n={r['n']:4d}  {r['seconds']:8.2f} s  {r['n'] / r['seconds']:7.2f} samples/s  "
                  f"{r['tokens'] / r['seconds']:8.0f} tokens/s  peak {r['peak_mb']:7.0f} MB"
                  + (f"  (round {i + 1})" if len(rounds) > 1 else ""))
    res = {k: {**rounds[0][k], "seconds": float(np.median([r[k]["seconds"] for r in rounds])),
               "peak_mb": float(np.median([r[k]["peak_mb"] for r in rounds]))} for k in modes}
    fw = res["forward"]["seconds"]
    print()
    settings = (("paper", "the paper's setting", "≤ 1.4"), ("default", "the default `score`", "≤ 4"),
                ("candidates_all", "candidates=all", "–"), ("all_mean_abs", "every layer, mean |ΔW|", "–"))
    for k, label, target in settings:
        if k in res:
            print(f"{label + ' / forward-only time':<48} {res[k]['seconds'] / fw:6.2f}   (target {target}); "
                  f"peak memory / forward's {res[k]['peak_mb'] / res['forward']['peak_mb']:5.2f}")
    if "fast" not in res:
        return
    f = res["fast"]["seconds"]
    print(f"fast / forward-only time            {f / fw:6.2f}   (target ≤ 1.4: issue 36)")
    print(f"fast peak / forward peak memory     {res['fast']['peak_mb'] / res['forward']['peak_mb']:6.2f}"
          "   (target ≤ 1.5)")
    if "fast_before" in res and "forward_before" in res:
        b = res["fast_before"]
        print(f"  before (no recompute, glibc's dynamic mmap threshold): fast / forward memory "
              f"{b['peak_mb'] / res['forward_before']['peak_mb']:6.2f}, fast / fast-before memory "
              f"{res['fast']['peak_mb'] / b['peak_mb']:5.2f}, time {f / b['seconds']:5.2f}")
    if "fast_no_recompute" in res:
        nr = res["fast_no_recompute"]
        print(f"  without recomputation: fast / forward memory {nr['peak_mb'] / res['forward']['peak_mb']:6.2f}, "
              f"time {nr['seconds'] / fw:5.2f}; recomputation costs {f / nr['seconds']:5.2f}× the time")
    tps = metamath_tokens_per_sample(args)
    hours = projection(res["fast"], tps)
    print(f"projected: 395k MetaMathQA samples × {tps:.0f} tokens (fixture mean) at the fast mode's "
          f"{res['fast']['tokens'] / f:.0f} tokens/s = {hours:.1f} "
          f"{'GPU-' if Device(args.device).is_cuda else ''}hours")
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
