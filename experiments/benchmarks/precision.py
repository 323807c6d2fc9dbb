"""What precision does to the score and to fine-tuning, measured side by side (issue 11).

1. Scoring: tiny random Llama and Gemma-2 (4 layers), the paper's step (AdamW lr 1e-5, wd
   0.01), last-3 ``up_proj`` mean |ΔW|, GSM8K fixture samples scored one at a time with the
   fast scorer in bf16, fp32 and float64. Prints each dtype's Spearman against float64 and
   its worst error as a multiple of the across-sample std.
2. Fine-tuning: 10 AdamW steps at lr 1e-5 on the same model, batches of 4, three ways —
   bf16 weights stepped directly (what `model.dtype=bfloat16` + `bf16-mixed` did before),
   the shipped path with `bf16-mixed` (fp32 master weights, bf16 autocast), and `32-true`.
   Prints the fraction of ``up_proj`` weights that changed and the mean |change| relative
   to fp32.
3. A low-precision trunk (issue 25, for models that do not fit a device in fp32): 8- and
   12-layer models, the layers below the lowest scored one in bf16 or fp16, the scored
   layers, norm and head in fp32 (each trunk layer's floating inputs cast down, the lowest
   scored layer's cast back up; the embeddings and rotary tables stay fp32). Same columns
   as 1. Adopted only if it passes the precision check's bounds (Spearman ≥ 0.95, worst
   error ≤ 1 std); it does not (experiments/README.md), so the library has no such option.

    python experiments/benchmarks/precision.py [--n 48] [--hidden 64]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from resofilter.data.records import load_records
from resofilter.data.templates import FormatTemplate
from resofilter.data.tokenize import Collator, tokenize_records
from resofilter.features.closed_form import StepConfig
from resofilter.features.fast import FastScorer
from resofilter.features.targets import find_targets
from resofilter.models.loading import build_tiny_model
from resofilter.models.tokenizer import train_tokenizer
from resofilter.training.sft import causal_lm_loss

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "tests" / "fixtures" / "gsm8k" / "train.jsonl"
TEMPLATE = FormatTemplate("plain", "Question: {query}\nAnswer: ")
STEP = StepConfig("adamw", lr=1e-5, weight_decay=0.01, eps=1e-8)


def scores(model: torch.nn.Module, samples: list, pad: int, dtype: torch.dtype,
           trunk: torch.dtype | None = None) -> np.ndarray:
    m = build_copy(model, dtype)
    if trunk is not None:
        cast_trunk(m, m.config.num_hidden_layers - 3, trunk)
    targets = find_targets(m, ["mlp.up_proj"], [-3, -2, -1])
    scorer = FastScorer(m, targets, STEP, ["mean_abs"], logits_chunk_elements=0)
    out = []
    for s in samples:  # one at a time, as the authors' loop does
        stats, _, _ = scorer(Collator(pad)([s]))
        out.append(np.mean([stats[t.name]["mean_abs"].item() for t in targets]))
    return np.array(out)


def _cast(x: object, dtype: torch.dtype) -> object:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return tuple(_cast(v, dtype) for v in x) if isinstance(x, tuple) else x  # (cos, sin)


def cast_trunk(model: torch.nn.Module, lowest_scored: int, dtype: torch.dtype) -> torch.nn.Module:
    """Decoder layers below ``lowest_scored`` in ``dtype``, in place; the rest keep theirs."""
    layers = model.model.layers
    work = next(layers[lowest_scored].parameters()).dtype

    def to(d: torch.dtype):  # noqa: ANN202
        return lambda module, args, kwargs: (_cast(args, d), {k: _cast(v, d) for k, v in kwargs.items()})

    for layer in layers[:lowest_scored]:
        layer.to(dtype).register_forward_pre_hook(to(dtype), with_kwargs=True)
    layers[lowest_scored].register_forward_pre_hook(to(work), with_kwargs=True)
    return model


def build_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    m = copy.deepcopy(model).to(dtype)
    m.eval()
    return m


def moved(before: dict, model: torch.nn.Module) -> tuple[float, float]:
    d = torch.cat([(p.detach().double() - before[n]).abs().flatten()
                   for n, p in model.named_parameters() if "up_proj" in n])
    return float((d > 0).double().mean()), float(d.mean())


def train(model: torch.nn.Module, batches: list, mode: str) -> tuple[float, float]:
    """10 AdamW steps at lr 1e-5: ``bf16_weights`` | ``bf16_mixed`` (fp32 masters) | ``fp32``."""
    import copy

    m = copy.deepcopy(model).to(torch.bfloat16 if mode == "bf16_weights" else torch.float32)
    m.train()
    before = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95))
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss, _ = causal_lm_loss(logits, b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return moved(before, m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48, help="samples scored")
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recs = load_records(GSM8K, "question", "answer")
    tok = train_tokenizer([f"{r.query}\n{r.response}" for r in recs], vocab_size=400)
    with tempfile.TemporaryDirectory():
        samples, _ = tokenize_records(recs[:args.n], TEMPLATE, tok, 256)
    pad = tok.pad_token_id
    print(f"scoring: {len(samples)} GSM8K samples one at a time, AdamW lr 1e-5, last-3 up_proj mean |ΔW|")
    print(f"{'model':>8} {'dtype':>9} {'Spearman vs f64':>16} {'max err / std':>14}")
    models = {}
    for arch in ("llama", "gemma2"):
        model = build_tiny_model(arch, len(tok), seed=0, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                 num_hidden_layers=4, num_attention_heads=4, pad_token_id=pad,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        models[arch] = model
        ref = scores(model, samples, pad, torch.float64)
        for dtype in (torch.bfloat16, torch.float32):
            got = scores(model, samples, pad, dtype)
            rho = spearmanr(got, ref).statistic
            print(f"{arch:>8} {str(dtype)[6:]:>9} {rho:16.4f} {np.abs(got - ref).max() / ref.std():14.3f}")
    print("\nlow-precision trunk: layers below the scored last 3 in bf16/fp16, scored layers + head in fp32")
    print(f"{'model':>8} {'layers':>6} {'trunk':>9} {'Spearman vs f64':>16} {'max err / std':>14}")
    for arch in ("llama", "gemma2"):
        for depth in (8, 12):
            model = build_tiny_model(arch, len(tok), seed=0, hidden_size=args.hidden,
                                     intermediate_size=4 * args.hidden, num_hidden_layers=depth,
                                     num_attention_heads=4, pad_token_id=pad, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id)
            ref = scores(model, samples, pad, torch.float64)
            for trunk in (None, torch.bfloat16, torch.float16):
                got = scores(model, samples, pad, torch.float32, trunk)
                name = "fp32" if trunk is None else str(trunk)[6:]
                print(f"{arch:>8} {depth:>6} {name:>9} {spearmanr(got, ref).statistic:16.4f} "
                      f"{np.abs(got - ref).max() / ref.std():14.3f}")
    batches = [Collator(pad)(samples[i:i + 4]) for i in range(0, 40, 4)]
    print("\nfine-tuning: 10 AdamW steps at lr 1e-5 (wd 0.1, β2 0.95), batches of 4")
    print(f"{'model':>8} {'weights':>28} {'up_proj moved':>14} {'mean |ΔW| / fp32':>17}")
    for arch, model in models.items():
        res = {mode: train(model, batches, mode) for mode in ("fp32", "bf16_mixed", "bf16_weights")}
        labels = {"bf16_weights": "bf16 weights (before)", "bf16_mixed": "fp32 masters + bf16 autocast",
                  "fp32": "fp32 (32-true)"}
        for mode, (frac, mean) in res.items():
            print(f"{arch:>8} {labels[mode]:>28} {frac:14.1%} {mean / res['fp32'][1]:17.3f}")


if __name__ == "__main__":
    main()
