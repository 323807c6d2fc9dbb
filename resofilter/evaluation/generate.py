"""Batched greedy generation and accuracy with a 95 % interval."""

from __future__ import annotations

import logging
from collections.abc import Container, Sequence
from typing import Any

import torch

from resofilter.data.records import Record
from resofilter.data.templates import Template, generation_prompt, generation_stops
from resofilter.progress import iterate

log = logging.getLogger(__name__)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``k/n`` (``scipy.stats.binomtest``)."""
    if n == 0:
        return (0.0, 0.0)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    add_special_tokens: bool = True,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    min_new_tokens: int = 0,
) -> list[str]:
    """Greedy continuations of ``prompts`` (left padding, stop at EOS or a stop string)."""
    model.eval()
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together
    try:
        for start in iterate(range(0, len(order), batch_size), -(-len(order) // batch_size), "generation", "batches",
                             enabled=progress):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            kwargs: dict[str, Any] = {}
            if stop_strings:
                kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new, strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                for s in stop_strings:
                    text = text.split(s)[0]
                outputs[i] = text
    finally:
        tokenizer.padding_side = old_side
    return outputs


def predict_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    golds: Sequence[str],
    template: Template,
    extractor: Any,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
    min_new_tokens: int = 0,
    prompts: Sequence[str] | None = None,
    overflow: Container[int] = (),
) -> list[dict[str, Any]]:
    """One prediction row per record: prompt, generation, extracted answer, gold, correct.

    Records at the positions in ``overflow`` (prompts with no room left in the model's
    positions) are not generated: scored wrong, marked ``prompt_overflow``. Metrics over the
    rows: :func:`accuracy_metrics` (kept apart so that ranks can each predict a share and one
    process can score the merged rows).
    """
    if prompts is None:  # the training template (protocol zero_shot): it also says where a turn ends
        prompts = [generation_prompt(template, r.query, r.input, tokenizer) for r in records]
        stop_strings = [*stop_strings, *(s for s in generation_stops(template) if s not in stop_strings)]
    todo = [p for i, p in enumerate(prompts) if i not in overflow]
    gens = iter(generate(model, tokenizer, todo, template.add_special_tokens, batch_size,
                         max_new_tokens, stop_strings, progress, min_new_tokens) if todo else [])
    preds = []
    for i, (r, prompt, gold) in enumerate(zip(records, prompts, golds, strict=True)):
        if i in overflow:
            preds.append({"sample_id": r.sample_id, "prompt": prompt, "generation": "", "extracted": None,
                          "gold": gold, "correct": False, "prompt_overflow": True})
            continue
        gen = next(gens)
        extracted = extractor.extract(gen)
        preds.append({"sample_id": r.sample_id, "prompt": prompt, "generation": gen,
                      "extracted": extracted, "gold": gold, "correct": extractor.equal(extracted, gold)})
    return preds


def accuracy_metrics(preds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy with its Wilson 95 % interval, extraction failures and empty generations."""
    n = len(preds)
    k = sum(p["correct"] for p in preds)
    lo, hi = wilson_interval(k, n)
    metrics = {
        "accuracy": k / n, "ci95_low": lo, "ci95_high": hi, "n": n, "n_correct": k,
        "extraction_failures": sum(p["extracted"] is None for p in preds),
        "empty_generations": sum(not p["generation"].strip() for p in preds),
    }
    log.info("accuracy %.4f (%d/%d, 95%% CI %.3f–%.3f), %d extraction failures",
             metrics["accuracy"], k, n, lo, hi, metrics["extraction_failures"])
    return metrics
