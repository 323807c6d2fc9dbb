"""Token-level loss signals from the scoring pass's own per-token losses (no extra forward).

A mean over ~40 response tokens cannot see one wrong digit; the worst tokens and the
answer span can:

* ``tok_max`` — the largest response-token loss;
* ``tok_topk_mean`` — the mean of the k largest (k = ``score.tokens.topk``; all tokens when
  the response is shorter);
* ``answer_loss`` — the mean loss over the tokens of the answer span, the first capture
  group of ``data.answer_pattern`` searched in the rendered response (e.g. MetaMathQA's
  ``The answer is: (.*)``); NaN where it does not match or was cut off.

Losses are indexed like the shifted labels: entry t is the loss of predicting token t+1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from resofilter.data.records import Record
from resofilter.data.templates import Template, render
from resofilter.data.tokenize import IGNORE_INDEX, TokenizedSample
from resofilter.errors import ConfigError

COLUMNS = ("tok_max", "tok_topk_mean")
ANSWER_COLUMN = "answer_loss"
NO_SPAN = (-1, -1)


@dataclass(frozen=True)
class TokenSignalSpec:
    """``score.tokens`` + ``data.answer_pattern``."""

    topk: int = 4
    answer_pattern: str | None = None

    @classmethod
    def from_cfg(cls, cfg: Any) -> TokenSignalSpec:
        topk = int(cfg.score.get("tokens", {}).get("topk", 4))
        if topk < 1:
            raise ConfigError("score.tokens.topk", f"must be ≥ 1, got {topk}")
        pattern = cfg.data.get("answer_pattern")
        if pattern is not None:
            try:
                if re.compile(pattern).groups < 1:
                    raise ConfigError("data.answer_pattern", f"{pattern!r} has no capture group (the answer span)")
            except re.error as e:
                raise ConfigError("data.answer_pattern", f"{pattern!r} is not a regular expression: {e}") from None
        return cls(topk, pattern)

    def describe(self) -> dict[str, Any]:
        return {"topk": self.topk, "answer_pattern": self.answer_pattern}


def answer_spans(records: Sequence[Record], samples: Sequence[TokenizedSample], template: Template, tokenizer: Any,
                 pattern: str) -> dict[str, tuple[int, int]]:
    """``{sample_id: (first, last + 1)}`` in response-token positions of the answer span.

    The response is tokenized alone when samples are built (``tokenize_record``), so the
    offsets of that same call map characters to exactly those tokens. A token counts when
    it overlaps the span's characters.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("data.answer_pattern", f"{type(tokenizer).__name__} gives no character offsets "
                          "(a fast tokenizer is needed for answer spans); set data.answer_pattern=null")
    rx = re.compile(pattern)
    by_id = {r.sample_id: r for r in records}
    out: dict[str, tuple[int, int]] = {}
    for s in samples:
        _, response = render(template, by_id[s.sample_id], tokenizer)
        m = rx.search(response)
        if m is None or m.end(1) <= m.start(1):
            out[s.sample_id] = NO_SPAN
            continue
        a, b = m.span(1)
        offsets = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        toks = [j for j, (s0, s1) in enumerate(offsets) if s0 < b and s1 > a]
        out[s.sample_id] = (toks[0], toks[-1] + 1) if toks else NO_SPAN
    return out


def token_signals(tok_losses: torch.Tensor, labels: torch.Tensor, topk: int,
                  spans: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample signals (B,) from token losses (B, T−1) and the batch's labels (B, T).

    ``spans`` (B, 2): the answer span in response-token positions (−1, −1: none).
    """
    valid = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): the response tokens' losses
    neg = torch.finfo(tok_losses.dtype).min
    masked = tok_losses.masked_fill(~valid, neg)
    n = valid.sum(dim=1)
    k = min(topk, masked.shape[1])
    top = masked.topk(k, dim=1).values  # (B, k), descending
    take = torch.arange(k, device=top.device).unsqueeze(0) < n.clamp_max(k).unsqueeze(1)
    out = {"tok_max": top[:, 0],
           "tok_topk_mean": (top * take).sum(dim=1) / take.sum(dim=1).clamp_min(1)}
    if spans is not None:
        # response token j sits at label position start+j, i.e. shifted index start+j−1
        start = valid.to(torch.int64).argmax(dim=1)  # first response token's shifted index
        pos = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0) - start.unsqueeze(1)
        a, b = spans[:, :1].to(pos.device), spans[:, 1:].to(pos.device)
        in_span = (pos >= a) & (pos < b) & valid
        cnt = in_span.sum(dim=1)
        total = tok_losses.masked_fill(~in_span, 0).sum(dim=1)
        out[ANSWER_COLUMN] = torch.where(cnt > 0, total / cnt.clamp_min(1), torch.full_like(total, float("nan")))
    return out
