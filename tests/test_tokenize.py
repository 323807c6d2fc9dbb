"""Tokenization and label masking against hand-built expectations."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from resofilter.data.records import Record
from resofilter.data.templates import ChatTemplate, FormatTemplate
from resofilter.data.tokenize import IGNORE_INDEX, Collator, length_buckets, tokenize_records
from resofilter.errors import ConfigError, DataError
from tests.conftest import compose_cfg


@pytest.mark.parametrize("name", ["metamath", "gemma_turns", "plain", "chat_template"])
def test_labels_are_exactly_the_response_plus_eos(name, gsm8k_records, tokenizer, turns_tokenizer):
    tokenizer = turns_tokenizer if name == "gemma_turns" else tokenizer  # it writes Gemma's turn tokens
    tpl = instantiate(compose_cfg([f"template={name}"]).template)
    samples, stats = tokenize_records(gsm8k_records[:8], tpl, tokenizer, max_length=2048)
    assert stats.n_out == 8 and stats.n_truncated == 0
    for rec, s in zip(gsm8k_records, samples, strict=False):
        n_prompt = next(i for i, t in enumerate(s.labels) if t != IGNORE_INDEX)
        prompt_text = tokenizer.decode(s.input_ids[:n_prompt]).replace("<s>", "")  # turn tokens stay, BOS goes
        assert prompt_text == tpl.render_prompt(rec.query, None, tokenizer).replace("<s>", "")
        assert all(t == IGNORE_INDEX for t in s.labels[:n_prompt])
        assert s.labels[n_prompt:] == s.input_ids[n_prompt:]  # response positions are their own labels
        assert s.input_ids[-1] == tokenizer.eos_token_id
        # the labelled turn markers (gemma_turns: <start_of_turn>model\n … <end_of_turn>) around the response
        assert tokenizer.decode(s.labels[n_prompt:-1]) == tpl.response_prefix + rec.response + tpl.response_suffix
        if name != "chat_template":
            assert s.input_ids[0] == tokenizer.bos_token_id


def test_metamath_prompt_text():
    from hydra.utils import instantiate

    tpl = instantiate(compose_cfg(["template=metamath"]).template)  # the shipped config, not a copy of it
    text = tpl.render_prompt("What is 2+3?", None)
    assert text.endswith("### Instruction:\nWhat is 2+3?\n\n### Response:\n")
    assert text.startswith("Below is an instruction that describes a task.")


def test_chat_template_without_one_is_a_config_error(tokenizer):
    class NoChat:
        chat_template = None

    with pytest.raises(ConfigError, match="template"):
        ChatTemplate().render_prompt("q", None, NoChat())


def test_truncation_flag_and_prompt_overflow(tokenizer):
    tpl = FormatTemplate("plain", "Q: {query}\nA: ")
    rec = Record("x", "one two three", "four five six seven eight nine ten", source="f.jsonl:7")
    n_prompt = len(tokenizer(tpl.render_prompt(rec.query, None))["input_ids"])
    (s,), stats = tokenize_records([rec], tpl, tokenizer, max_length=n_prompt + 3)
    assert s.truncated and len(s.input_ids) == n_prompt + 3 and s.n_response_tokens == 3
    assert stats.n_truncated == 1
    out, stats = tokenize_records([rec], tpl, tokenizer, max_length=n_prompt)
    assert out == [] and stats.n_skipped_prompt_overflow == 1
    with pytest.raises(DataError, match=r"f\.jsonl:7: sample 'x': prompt alone"):
        tokenize_records([rec], tpl, tokenizer, max_length=n_prompt, prompt_overflow="error")


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_on_the_configured_side(side):
    from resofilter.data.tokenize import TokenizedSample

    a = TokenizedSample("a", [5, 6, 7], [IGNORE_INDEX, 6, 7], False)
    b = TokenizedSample("b", [8, 9], [IGNORE_INDEX, 9], True)
    batch = Collator(pad_token_id=0, padding_side=side)([a, b])
    if side == "right":
        assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
        assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    else:
        assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["truncated"].tolist() == [False, True] and batch["sample_ids"] == ["a", "b"]
    assert batch["input_ids"].dtype == torch.long


def test_length_buckets_sort_and_cap():
    lengths = [5, 1, 9, 3, 7, 2]
    assert length_buckets(lengths, batch_size=2) == [[1, 5], [3, 0], [4, 2]]
    # max_tokens: a batch of two 9-long sequences would be 18 padded tokens > 12
    assert length_buckets([9, 9, 1], batch_size=4, max_tokens=12) == [[2], [0], [1]]
