"""Fine-tuning (full and LoRA) and evaluation: behaviour, reloads, determinism, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from resofilter.commands import evaluate, finetune
from resofilter.data.tokenize import IGNORE_INDEX
from resofilter.errors import ConfigError, DataError, ResoFilterError
from resofilter.evaluation.extract import GSM8KExtractor, MathExtractor, SyntheticExtractor
from resofilter.evaluation.generate import wilson_interval
from resofilter.training.sft import causal_lm_loss, make_scheduler
from tests.conftest import FIXTURES, GSM8K_TRAIN, compose_cfg, write_jsonl
from tests.helpers.common import ft_overrides


def test_causal_lm_loss_counts_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    loss, n = causal_lm_loss(logits, labels)
    logp = torch.log_softmax(logits, -1)
    by_hand = -(logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5] + logp[1, 0, 1] + logp[1, 1, 2]) / 5
    assert n == 5 and torch.allclose(loss, by_hand)


def test_lr_schedule_of_the_shipped_config():
    """tiny_full: 5 % warmup from 0, cosine down to 5 % of the peak (transformers' cosine_with_min_lr)."""
    from hydra.utils import instantiate

    ft = compose_cfg(["finetune=tiny_full"]).finetune
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched, warmup = make_scheduler(instantiate(ft.scheduler), opt, total_steps=105, warmup_ratio=ft.warmup_ratio)
    lrs = []
    for _ in range(106):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warmup 5 steps: 0, 0.2, …; peak at step 5; halfway through the decay (step 55) 0.05 + 0.95 · 0.5
    assert warmup == 5 and lrs[0] == 0.0 and lrs[1] == pytest.approx(2e-4) and lrs[5] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5)) and lrs[105] == pytest.approx(5e-5)


def _loss(model_dir_or_model, tokenizer_dir):
    from resofilter.data.records import load_records
    from resofilter.data.templates import FormatTemplate
    from resofilter.data.tokenize import Collator, tokenize_records
    from resofilter.models.loading import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    recs = load_records(GSM8K_TRAIN, "question", "answer", max_samples=16)
    s, _ = tokenize_records(recs, FormatTemplate("plain", "Question: {query}\nAnswer: "), tok, 128)
    b = Collator(tok.pad_token_id)(s)
    with torch.no_grad():
        return causal_lm_loss(model_dir_or_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["labels"])[0].item(), b


def test_full_finetune_lowers_loss_reloads_identically_and_is_seeded(tmp_path, tiny_model_dir):
    r1 = finetune(compose_cfg(ft_overrides(tiny_model_dir, tmp_path / "a"), "finetune"))
    r2 = finetune(compose_cfg(ft_overrides(tiny_model_dir, tmp_path / "b"), "finetune"))
    before, batch = _loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_model_dir)
    m1 = AutoModelForCausalLM.from_pretrained(r1["checkpoint"])
    after, _ = _loss(m1, tiny_model_dir)
    assert after < before - 0.1
    m2 = AutoModelForCausalLM.from_pretrained(r2["checkpoint"])
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2), n
    assert r1["steps"] == 8
    log = (tmp_path / "a" / "logs" / "metrics.csv").read_text()
    assert "train/loss" in log and "train/lr" in log and "train/tokens_per_s" in log


def test_lora_trains_only_adapters_and_reloads(tmp_path, tiny_model_dir):
    cfg = compose_cfg(ft_overrides(tiny_model_dir, tmp_path / "l", "finetune=lora",
                                   "finetune.lora.target_modules=[q_proj,v_proj,up_proj]", "finetune.lora.r=4",
                                   "finetune.optimizer.lr=1e-2"), "finetune")
    res = finetune(cfg)
    from peft import PeftModel

    ckpt = res["checkpoint"]
    assert (tmp_path / "l" / "checkpoint" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ckpt)
    # base weights untouched by training; the adapter changes the output
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = reloaded.merge_and_unload()
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, fresh.state_dict()[n])]
    assert changed and all(any(m in n for m in ("q_proj", "v_proj", "up_proj")) for n in changed)
    from resofilter.stages.finetune import load_checkpoint

    model, tok = load_checkpoint(tmp_path / "l", "float32")
    x = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, merged(x).logits, atol=1e-5)
        assert not torch.allclose(base(x).logits, merged(x).logits, atol=1e-5)


def test_gsm8k_gold_as_prediction_scores_100_percent():
    ex = GSM8KExtractor()
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()]
    for r in rows:
        gold = ex.gold(r["answer"])
        assert ex.equal(ex.extract(r["answer"].replace("####", "The answer is:")), gold)


@pytest.mark.parametrize("text,expected", [
    ("so the total is 1,234 apples. The answer is: 1,234", "1234"),
    ("She pays $18.00 in total.", "18"),
    ("The answer is: 42.", "42"),
    ("First 3 then 4 then 12", "12"),
    ("I do not know", None),
    ("The answer is: -7", "-7"),
    ("0.50 dollars", "0.5"),
])
def test_gsm8k_extraction_tricky(text, expected):
    assert GSM8KExtractor().extract(text) == expected


def test_synthetic_extractor_needs_the_answer_line():
    ex = SyntheticExtractor()
    assert ex.extract("She buys 5 more: 7 + 5 = 12\nThe answer is: 12") == "12"
    assert ex.extract("7 + 5 = 12") is None


@pytest.mark.parametrize("pred,gold,ok", [
    ("0.5", r"\frac{1}{2}", True), (r"\dfrac{1}{2}", r"\frac{1}{2}", True), ("3", "4", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", True),
])
def test_math_equivalence(pred, gold, ok):
    assert MathExtractor().equal(pred, gold) is ok
    assert MathExtractor().extract(f"so \\boxed{{{pred}}}.") == pred


def test_evaluate_writes_predictions_and_metrics(tmp_path, tiny_model_dir):
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "model.num_hidden_layers=4",
                       "eval=gsm8k", "eval.max_samples=4", "eval.max_new_tokens=4", f"output_dir={tmp_path}",
                       "template=plain", "eval.stop_strings=[]"], "evaluate")
    m = evaluate(cfg)["gsm8k"]
    preds = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert m["n"] == 4 and len(preds) == 4 and set(preds[0]) >= {"sample_id", "prompt", "generation", "extracted",
                                                                  "gold", "correct"}
    k = sum(p["correct"] for p in preds)
    assert m["n_correct"] == k and m["accuracy"] == k / 4
    assert (m["ci95_low"], m["ci95_high"]) == pytest.approx(wilson_interval(k, 4))


def test_wilson_interval_by_hand():
    # k=3, n=10, z=1.959964: centre (0.3 + z²/20)/(1 + z²/10) = 0.35550, half 0.24772
    assert wilson_interval(3, 10) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0


def test_evaluate_bad_input(tmp_path, tiny_model_dir):
    base = [f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "model.num_hidden_layers=4",
            "eval=gsm8k", "template=plain", f"output_dir={tmp_path}"]
    with pytest.raises(ResoFilterError, match="checkpoint_dir.*nope does not exist"):
        evaluate(compose_cfg([*base, f"checkpoint_dir={tmp_path / 'nope'}"], "evaluate"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'answer'"):
        evaluate(compose_cfg([*base, f"eval.path={bad}"], "evaluate"))
    assert not (tmp_path / "metrics.json").exists()


class FirstWordExtractor:
    """A user's own extractor: one class, named in config by `_target_`, nothing else to register."""

    name = "first_word"

    def extract(self, text: str) -> str | None:
        return text.split()[0] if text.split() else None

    def gold(self, text: str) -> str:
        return text.split("####")[-1].strip()

    def equal(self, pred: str | None, gold: str) -> bool:
        return pred == gold


@pytest.mark.parametrize("kind", ["perfect", "wrong", "unparsable", "custom"])
def test_evaluation_on_canned_generations(tmp_path, tiny_model_dir, monkeypatch, kind):
    """The metrics of known generations: all right, all wrong, none parsable; and a user-defined extractor."""
    from resofilter.evaluation import generate as gen_mod

    gold = [r["answer"].split("####")[-1].strip().replace(",", "")
            for r in map(json.loads, (FIXTURES / "gsm8k" / "test.jsonl").read_text().splitlines()[:6])]
    canned = {"perfect": [f"Let me think. The answer is: {g}" for g in gold],
              "wrong": [f"The answer is: {int(g) + 1}" for g in gold],
              "unparsable": ["I do not know." for _ in gold],
              "custom": [f"{g} is it" for g in gold]}[kind]
    prompts_seen = []

    def fake_generate(model, tokenizer, prompts, *a, **k):
        prompts_seen.extend(prompts)
        return [canned[i] for i in range(len(prompts))]  # records arrive in file order on one rank

    monkeypatch.setattr(gen_mod, "generate", fake_generate)
    extra = ["eval.extractor._target_=tests.test_training_eval.FirstWordExtractor"] if kind == "custom" else []
    m = evaluate(compose_cfg([f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "eval=gsm8k",
                              "eval.max_samples=6", f"output_dir={tmp_path}", "template=plain", *extra],
                             "evaluate"))["gsm8k"]
    expected = {"perfect": (6, 0), "wrong": (0, 0), "unparsable": (0, 6), "custom": (6, 0)}[kind]
    assert (m["n_correct"], m["extraction_failures"]) == expected and m["n"] == 6
    assert prompts_seen[0].startswith("Question: ")  # the plain template's prompt


@pytest.mark.parametrize("value,match", [("gsm8k", "name the extractor class"),
                                          ("{_target_: builtins.dict}", "lacks extract/gold/equal")])
def test_extractor_config_errors(value, match):
    from resofilter.stages.config_check import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(["eval=gsm8k", f"eval.extractor={value}"], "evaluate"))


def test_evaluate_uses_the_template_the_checkpoint_learned(tmp_path, tiny_model_dir):
    """What the artifact knows wins: a fine-tuned checkpoint evaluated with another template is an error."""
    ft = tmp_path / "ft"
    finetune(compose_cfg(ft_overrides(tiny_model_dir, ft, "finetune.max_steps=1"), "finetune"))
    assert json.loads((ft / "finetune.json").read_text())["template"]["name"] == "plain"
    base = [f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "eval=gsm8k", "eval.max_samples=2",
            "eval.max_new_tokens=2", f"output_dir={tmp_path / 'ev'}"]
    for ckpt in (ft, ft / "checkpoint"):
        with pytest.raises(ConfigError, match="fine-tuned with template 'plain'.*'metamath'"):
            evaluate(compose_cfg([*base, f"checkpoint_dir={ckpt}", "template=metamath"], "evaluate"))
    assert evaluate(compose_cfg([*base, f"checkpoint_dir={ft}", "template=plain"], "evaluate"))["gsm8k"]["n"] == 2
