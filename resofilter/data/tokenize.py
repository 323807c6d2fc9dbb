"""Tokenization with label masking, length bucketing and padding.

Labels are the response tokens (plus EOS); prompt tokens are ``-100`` so they carry no
loss and no gradient. Sequences longer than ``max_length`` are cut from the right and
flagged ``truncated``; a sample whose prompt alone fills ``max_length`` has no response
token left and is skipped (counted) or raises, per ``prompt_overflow``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from resofilter.data.records import Record
from resofilter.data.templates import Template, check_fits, render
from resofilter.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions
    truncated: bool

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizeStats:
    n_in: int
    n_out: int
    n_skipped_prompt_overflow: int
    n_truncated: int
    n_tokens: int
    n_response_tokens: int
    max_len: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class TokenizeSpec:
    """``tokenize.*``: how records become samples (their content is hashed into the features' identity too)."""

    max_length: int
    prompt_overflow: str = "error"  # skip | error
    append_eos: bool = True

    @classmethod
    def from_cfg(cls, t: Any) -> TokenizeSpec:
        return cls(max_length=int(t.max_length), prompt_overflow=str(t.prompt_overflow), append_eos=bool(t.append_eos))


def tokenize_record(
    record: Record,
    template: Template,
    tokenizer: Any,
    max_length: int,
    append_eos: bool = True,
) -> TokenizedSample | None:
    """Tokenize one record; ``None`` if its prompt leaves no room for a response token."""
    prompt, response = render(template, record, tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=template.add_special_tokens)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ConfigError("tokenizer", "tokenizer has no eos_token_id; set tokenize.append_eos=false")
        response_ids = [*response_ids, tokenizer.eos_token_id]
    if len(prompt_ids) >= max_length:
        return None
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    return TokenizedSample(record.sample_id, ids[:max_length], labels[:max_length], truncated)


def tokenize_records(
    records: Sequence[Record],
    template: Template,
    tokenizer: Any,
    max_length: int,
    prompt_overflow: str = "skip",
    append_eos: bool = True,
    template_key: str = "template",
) -> tuple[list[TokenizedSample], TokenizeStats]:
    """Tokenize every record. ``prompt_overflow``: ``skip`` (count and log) or ``error``.

    The template must fit the tokenizer (:func:`~resofilter.data.templates.check_fits`); a misfit
    is a ConfigError naming ``template_key`` (``train_template`` where the fine-tuned model's is meant).
    """
    if max_length < 2:
        raise ConfigError("tokenize.max_length", f"must be ≥ 2, got {max_length}")
    if prompt_overflow not in ("skip", "error"):
        raise ConfigError("tokenize.prompt_overflow", f"expected skip|error, got {prompt_overflow!r}")
    check_fits(template, tokenizer, template_key)
    out: list[TokenizedSample] = []
    skipped = 0
    for r in records:
        s = tokenize_record(r, template, tokenizer, max_length, append_eos)
        if s is None:
            if prompt_overflow == "error":
                path, _, line = r.source.rpartition(":")
                raise DataError(
                    path or r.source, int(line) if line.isdigit() else None,
                    f"sample {r.sample_id!r}: prompt alone is ≥ max_length={max_length} tokens",
                )
            skipped += 1
            continue
        out.append(s)
    if skipped:
        log.warning("skipped %d samples whose prompt alone is ≥ max_length=%d", skipped, max_length)
    stats = TokenizeStats(
        n_in=len(records),
        n_out=len(out),
        n_skipped_prompt_overflow=skipped,
        n_truncated=sum(s.truncated for s in out),
        n_tokens=sum(len(s) for s in out),
        n_response_tokens=sum(s.n_response_tokens for s in out),
        max_len=max((len(s) for s in out), default=0),
    )
    return out, stats


class Collator:
    """Pad a list of :class:`TokenizedSample` into a batch.

    Returns ``input_ids``/``attention_mask``/``labels`` (B, T), ``truncated`` (B,) and the
    list of ``sample_ids``. ``padding_side``: ``right`` for training and scoring, ``left``
    for generation.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right",
                 pad_to_multiple_of: int | None = None) -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError("padding_side", f"expected left|right, got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, samples: Sequence[TokenizedSample]) -> dict[str, Any]:
        T = max(len(s) for s in samples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        B = len(samples)
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s)
            sl = slice(T - n, T) if self.padding_side == "left" else slice(0, n)
            ids[i, sl] = torch.tensor(s.input_ids)
            labels[i, sl] = torch.tensor(s.labels)
            mask[i, sl] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "truncated": torch.tensor([s.truncated for s in samples]),
            "sample_ids": [s.sample_id for s in samples],
        }


def length_buckets(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Group indices into batches of similar length (sorted by length, stable).

    A batch holds at most ``batch_size`` samples and, if ``max_tokens`` is set, at most
    that many padded tokens (``batch × longest``). Batches are returned in length order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in cur] + [lengths[i]])
        if cur and (len(cur) >= batch_size or (max_tokens and longest * (len(cur) + 1) > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
