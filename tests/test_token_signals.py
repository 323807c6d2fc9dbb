"""Token-level loss signals: hand-computed values, the sliced head's token losses, answer spans."""

from __future__ import annotations

import math

import pytest
import torch

from resofilter.data.records import Record
from resofilter.data.templates import FormatTemplate
from resofilter.data.tokenize import IGNORE_INDEX, Collator, tokenize_records
from resofilter.errors import ConfigError
from resofilter.features.closed_form import StepConfig
from resofilter.features.fast import FastScorer
from resofilter.features.literal import LiteralScorer
from resofilter.features.targets import find_targets
from resofilter.features.tokens import NO_SPAN, TokenSignalSpec, answer_spans, token_signals
from tests.conftest import compose_cfg, tiny

X = IGNORE_INDEX
TEMPLATE = FormatTemplate("p", "Q: {query}\nA: ")


def test_token_signals_by_hand():
    # sample 0: prompt of 2 tokens, response tokens at positions 2..5 → shifted losses at 1..4
    labels = torch.tensor([[X, X, 7, 8, 9, 3], [X, X, 6, X, X, X]])
    tok = torch.tensor([[9.0, 0.5, 2.0, 0.1, 4.0], [0.0, 1.5, 0.0, 0.0, 0.0]])
    spans = torch.tensor([[1, 3], list(NO_SPAN)])  # sample 0: response tokens 1 and 2 (losses 2.0, 0.1)
    out = token_signals(tok, labels, topk=3, spans=spans)
    # sample 0's response losses 0.5, 2.0, 0.1, 4.0 (the 9.0 is a prompt position and must not count)
    assert out["tok_max"].tolist() == [4.0, 1.5]
    assert out["tok_topk_mean"][0].item() == pytest.approx((4.0 + 2.0 + 0.5) / 3)
    assert out["tok_topk_mean"][1].item() == pytest.approx(1.5)  # one response token: the mean of what exists
    assert out["answer_loss"][0].item() == pytest.approx((2.0 + 0.1) / 2)
    assert math.isnan(out["answer_loss"][1].item())


def test_answer_span_tokens_cover_the_captured_text(tokenizer):
    recs = [Record("a", "What is 2+3?", "2 + 3 = 5\nThe answer is: 5", {}, "x:1"),
            Record("b", "What is 10+12?", "10 + 12 = 22\nThe answer is: 22", {}, "x:2"),
            Record("c", "Say hi", "hi", {}, "x:3")]
    samples, _ = tokenize_records(recs, TEMPLATE, tokenizer, 256)
    spans = answer_spans(recs, samples, TEMPLATE, tokenizer, r"The answer is: (.*)")
    assert spans["c"] == NO_SPAN
    for r, s in zip(recs[:2], samples[:2], strict=True):
        a, b = spans[r.sample_id]
        resp = [t for t in s.labels if t != IGNORE_INDEX]
        text = tokenizer.decode(resp[a:b]).strip()
        assert text == r.response.rsplit(": ", 1)[1]  # exactly the answer's tokens
        assert "answer" not in tokenizer.decode(resp[a:b])


def test_sliced_head_token_losses_equal_whole_logits_and_the_literal_scorer(tokenizer, gsm8k_records):
    model = tiny("llama", tokenizer, seed=5).to(torch.float64)
    targets = find_targets(model, ["mlp.up_proj"], [-1])
    samples, _ = tokenize_records(gsm8k_records[:5], TEMPLATE, tokenizer, 256)
    batch = Collator(tokenizer.pad_token_id)(samples)
    step = StepConfig("sgd", lr=1e-3)
    sliced = FastScorer(model, targets, step, ["l2"], logits_chunk_elements=3 * len(tokenizer) * 5).score_batch(batch)
    whole = FastScorer(model, targets, step, ["l2"], logits_chunk_elements=0).score_batch(batch)
    literal = LiteralScorer(model, targets, step, ["l2"]).score_batch(batch)
    # brute force: each sample alone, CE of every response token
    for b, s in enumerate(samples):
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
        lab = torch.tensor(s.labels[1:])
        for t in range(len(lab)):
            ref = 0.0 if lab[t] == X else float(-torch.log_softmax(logits[t], -1)[lab[t]])
            for got in (sliced, whole, literal):
                assert got.token_losses[b, t].item() == pytest.approx(ref, abs=1e-10)
    torch.testing.assert_close(sliced.losses, whole.losses, rtol=1e-12, atol=0)


def test_answer_pattern_is_validated():
    with pytest.raises(ConfigError, match="data.answer_pattern"):
        TokenSignalSpec.from_cfg(compose_cfg(["data.answer_pattern='The answer is: .*'"]))
    with pytest.raises(ConfigError, match="data.answer_pattern"):
        TokenSignalSpec.from_cfg(compose_cfg(["data.answer_pattern='(unclosed'"]))
    with pytest.raises(ConfigError, match="score.tokens.topk"):
        TokenSignalSpec.from_cfg(compose_cfg(["score.tokens.topk=0"]))
    assert TokenSignalSpec.from_cfg(compose_cfg([])).answer_pattern == "The answer is: (.*)"
