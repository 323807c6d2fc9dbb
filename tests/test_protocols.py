"""Evaluation protocols by name: prompts by hand, exemplar drawing, and extraction of canned generations."""

from __future__ import annotations

import itertools
import json

import pytest

from resofilter.commands import evaluate
from resofilter.data.records import load_records
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.evaluation.extract import GSM8KExtractor, MathExtractor
from resofilter.evaluation.protocols import ProtocolSpec, build_prompts, draw_exemplars, reasoning_of
from resofilter.stages import context
from tests.conftest import FIXTURES, compose_cfg

GSM_TRAIN = FIXTURES / "gsm8k" / "train.jsonl"


def _gsm(extra=()):
    return compose_cfg(["eval=gsm8k", *extra], "evaluate")


def test_zero_shot_is_the_training_template():
    cfg = _gsm()
    spec = ProtocolSpec.from_cfg(cfg.eval)
    recs = load_records(FIXTURES / "gsm8k" / "test.jsonl", "question", "answer", max_samples=2)
    assert spec.name == "zero_shot"
    assert build_prompts(spec, recs, context.template(cfg), None) == [
        context.template(cfg).render_prompt(r.query, None, None) for r in recs]


def test_few_shot_cot_prompt_by_hand():
    cfg = _gsm(["eval.protocol=few_shot_cot", "eval.few_shot=2", f"eval.few_shot_path={GSM_TRAIN}",
                "eval.few_shot_seed=3"])
    spec = ProtocolSpec.from_cfg(cfg.eval)
    pool = load_records(GSM_TRAIN, "question", "answer")
    evaluated = pool[:5]  # evaluated questions are never exemplars
    shots = draw_exemplars(spec, "question", "answer", GSM8KExtractor(), {r.query for r in evaluated})
    assert len(shots) == 2 and not {q for q, _ in shots} & {r.query for r in evaluated}
    assert shots == draw_exemplars(spec, "question", "answer", GSM8KExtractor(), {r.query for r in evaluated})
    # Natalia's answer, written as open-instruct writes an exemplar: one line, no <<…>>, "So the answer is N."
    natalia = json.loads(GSM_TRAIN.read_text().splitlines()[0])["answer"]
    assert (reasoning_of(natalia, spec.cot) + f" So the answer is {GSM8KExtractor().gold(natalia)}." ==
            "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. "
            "So the answer is 72.")
    for _q, sol in shots:
        assert "<<" not in sol and sol.startswith(" ") and sol.rstrip().endswith(".") and "So the answer is" in sol
    prompts = build_prompts(spec, evaluated[:1], context.template(cfg), None, shots)
    expected = "".join(f"Question: {q}\nAnswer:{s}\n\n" for q, s in shots) + f"Question: {evaluated[0].query}\nAnswer:"
    assert prompts == [expected]


@pytest.mark.parametrize("extra,match", [
    (["eval.protocol=chain"], "eval.protocol"),
    (["eval.few_shot=4"], "few_shot_cot"),  # exemplars under zero_shot: a contradiction, named
    (["eval.protocol=few_shot_cot", "eval.few_shot=0"], "few_shot"),
    (["eval.prompt_overflow=truncate"], "eval.prompt_overflow"),
    (["+eval@evals.math=math", "evals.math.prompt_overflow=skip"], "evals.math.prompt_overflow"),
])
def test_protocol_config_errors(extra, match):
    from resofilter.stages.config_check import validate

    with pytest.raises(ConfigError, match=match):
        validate(_gsm(extra))


@pytest.mark.parametrize("protocol", ["zero_shot", "few_shot_cot"])
def test_gsm8k_canned_generations_per_protocol(tmp_path, tiny_model_dir, monkeypatch, protocol):
    """Right (`The answer is`, few-shot's `So the answer is N.`, a bare `#### N`), wrong and unparsable."""
    from resofilter.evaluation import generate as gen_mod

    golds = [GSM8KExtractor().gold(json.loads(x)["answer"])
             for x in (FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()[:6]]
    canned = [f"… The answer is: {golds[0]}", f"… So the answer is {golds[1]}.", f"…\n#### {golds[2]}",
              f"The answer is: {int(golds[3]) + 1}", "I cannot tell.", f"So the answer is {int(golds[5]) - 1}."]
    seen = []

    def fake_generate(model, tokenizer, prompts, add_special, batch_size, max_new, stops, *a, **k):
        seen.append((prompts, stops))
        return canned[:len(prompts)]

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    # generation is canned: the 2-shot prompts' length (> the tiny model's 512 positions) does not matter here
    monkeypatch.setattr("resofilter.stages.evaluate.check_context", lambda *a, **k: set())
    extra = ["eval.protocol=few_shot_cot", "eval.few_shot=2", f"eval.few_shot_path={GSM_TRAIN}"] \
        if protocol == "few_shot_cot" else []
    m = evaluate(compose_cfg([f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "eval=gsm8k",
                              "eval.max_samples=6", f"output_dir={tmp_path}", "template=plain", *extra],
                             "evaluate"))["gsm8k"]
    assert (m["n_correct"], m["n"]) == (3, 6) and m["protocol"] == protocol
    # "I cannot tell." has no number at all; every other generation commits to one
    assert m["extraction_failures"] == 1
    prompts, stops = seen[0]
    if protocol == "few_shot_cot":
        assert prompts[0].count("Question: ") == 3 and "\n\nQuestion:" in stops
    else:
        assert prompts[0].count("Question: ") == 1 and "\n\nQuestion:" not in stops
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["protocol"] == protocol


def test_math_extraction_on_canned_generations():
    ex = MathExtractor()
    gold = ex.gold(r"so the area is $\boxed{\frac{1}{2}}$.")
    assert ex.equal(ex.extract(r"Solution: ... $\boxed{\dfrac{1}{2}}$"), gold)  # boxed, equivalent form
    assert ex.equal(ex.extract("The answer is: 0.5"), gold)  # `The answer is` without a box
    assert not ex.equal(ex.extract(r"$\boxed{2}$"), gold)
    assert ex.extract("no idea") is None


def test_prompts_longer_than_the_model_context_are_refused_before_generating(tmp_path, tiny_model_dir, monkeypatch,
                                                                            caplog):
    """The tiny Llama has 512 positions: 8 GSM8K exemplars fill them; nothing is generated or written."""
    from transformers import AutoConfig, AutoTokenizer

    from resofilter.evaluation import generate as gen_mod

    limit = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    exemplars = [json.loads(x)["question"] + json.loads(x)["answer"] for x in GSM_TRAIN.read_text().splitlines()]
    assert sum(sorted(len(tok(e)["input_ids"]) for e in exemplars)[:8]) > limit  # any 8 of them overflow
    calls = []
    monkeypatch.setattr(gen_mod, "generate", lambda model, tokenizer, prompts, *a, **k: calls.append(prompts) or
                        ["The answer is: 1"] * len(prompts))
    base = [f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "eval=gsm8k", "eval.max_samples=4",
            "template=plain", "eval.max_new_tokens=64"]
    cot = ["eval.protocol=few_shot_cot", "eval.few_shot=8", f"eval.few_shot_path={GSM_TRAIN}"]
    with pytest.raises(ConfigError, match=rf"eval.prompt_overflow.*4 of 4 prompts leave no room .* {limit} positions"
                                          r".*eval.few_shot"):
        evaluate(compose_cfg([*base, f"output_dir={tmp_path / 'cot'}", *cot], "evaluate"))
    with pytest.raises(ResoFilterError, match="every one of the 4 prompts overflows"):
        evaluate(compose_cfg([*base, f"output_dir={tmp_path / 'cot2'}", *cot, "eval.prompt_overflow=count_wrong"],
                             "evaluate"))
    assert not calls and not list(tmp_path.glob("cot*/metrics.json"))
    # zero-shot prompts fit; a max_new_tokens reaching past the positions is a warning, not a refusal
    questions = [json.loads(x)["question"] for x in (FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()[:4]]
    shortest = min(len(tok(f"Question: {q}")["input_ids"]) for q in questions)
    with caplog.at_level("WARNING"):
        evaluate(compose_cfg([*base[:-1], f"output_dir={tmp_path / 'zs'}", f"eval.max_new_tokens={limit - shortest}"],
                             "evaluate"))
    assert calls and "4 of 4 prompts + max_new_tokens" in caplog.text


def test_prompt_overflow_count_wrong_scores_the_long_ones_wrong_without_generating(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """Room for min_new_tokens is what a prompt needs: make the longest prompts overflow, the others not."""
    from transformers import AutoConfig, AutoTokenizer

    from resofilter.evaluation import generate as gen_mod

    limit = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    calls = []
    monkeypatch.setattr(gen_mod, "generate", lambda model, tokenizer, prompts, *a, **k: calls.append(list(prompts))
                        or ["The answer is: 1"] * len(prompts))
    base = [f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "eval=gsm8k", "eval.max_samples=6",
            "template=plain"]
    evaluate(compose_cfg([*base, f"output_dir={tmp_path / 'probe'}", "eval.max_new_tokens=4"], "evaluate"))
    prompts = calls.pop()
    # with or without a BOS token: pick the threshold in the widest gap between two prompt lengths
    lengths = sorted({len(tok(p, add_special_tokens=s)["input_ids"]) for p in prompts for s in (True, False)})
    lo, hi = max(itertools.pairwise(lengths), key=lambda ab: ab[1] - ab[0])
    assert hi - lo >= 2
    threshold = (lo + hi) // 2  # prompts longer than this have no room for limit - threshold new tokens
    long_ = {p for p in prompts if len(tok(p)["input_ids"]) > threshold}
    assert 0 < len(long_) < len(prompts)
    room = limit - threshold
    m = evaluate(compose_cfg([*base, f"output_dir={tmp_path / 'cw'}", f"eval.min_new_tokens={room}",
                              f"eval.max_new_tokens={room}", "eval.prompt_overflow=count_wrong"], "evaluate"))["gsm8k"]
    assert m["n"] == 6 and m["n_prompt_overflow"] == len(long_)
    assert set(calls[0]) == set(prompts) - long_  # the long ones were never generated
    preds = [json.loads(x) for x in (tmp_path / "cw" / "predictions.jsonl").read_text().splitlines()]
    assert {p["prompt"] for p in preds if p.get("prompt_overflow")} == long_
    assert all(not p["correct"] and p["generation"] == "" for p in preds if p.get("prompt_overflow"))
