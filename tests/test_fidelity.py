"""Fidelity to the authors' code (TAL-auroraX/ResoFilter@37366a7, issue 21), one test per step where
resofilter used to differ: dedup before scoring and the cut over unique queries (run_gemma.py,
reso_filter.py), a trained model separate from the scoring one (run_gemma.sh vs run_train.sh), the
global batch (run_train.sh: 2 per GPU × 8 GPUs), and the label spans (run_gemma.py / train.py).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hydra.utils import instantiate

from resofilter._io import model_fingerprint
from resofilter.commands import finetune, run, score, select
from resofilter.data.records import Record
from resofilter.data.tokenize import IGNORE_INDEX, tokenize_record
from resofilter.errors import ConfigError
from resofilter.evaluation.protocols import ProtocolSpec, stop_strings
from resofilter.stages import specs
from resofilter.stages.config_check import validate
from tests.conftest import FIXTURES, compose_cfg, shrink
from tests.helpers.common import TINY_RUN, ft_overrides

METAMATH = FIXTURES / "metamathqa" / "train.jsonl"
TURNS = ["<start_of_turn>", "<end_of_turn>"]


# --- label spans -------------------------------------------------------------------------------------

def test_gemma_turns_labels_the_model_turn_and_its_end_token_by_token(turns_tokenizer):
    tok = turns_tokenizer
    template = instantiate(compose_cfg(["template=gemma_turns"]).template)
    rec = Record(sample_id="s", query="What is 2+3?", response="2+3 = 5.\nThe answer is: 5", input=None,
                 raw={}, source="x:1")
    sample = tokenize_record(rec, template, tok, 768)
    # written out by hand as run_gemma.py / train.py build it: the source encoded with <bos>, the target
    # `<start_of_turn>model\n{response}<end_of_turn>` encoded on its own with its <bos> dropped, then <eos>
    source = tok.encode("<start_of_turn>user\nWhat is 2+3?<end_of_turn>\n")
    target = tok.encode("<start_of_turn>model\n2+3 = 5.\nThe answer is: 5<end_of_turn>")[1:]
    assert source[0] == tok.bos_token_id and source[1] == tok.convert_tokens_to_ids("<start_of_turn>")
    assert sample.input_ids == source + target + [tok.eos_token_id]
    assert sample.labels == [IGNORE_INDEX] * len(source) + target + [tok.eos_token_id]
    labelled = [t for t in sample.labels if t != IGNORE_INDEX]
    sot, eot = (tok.convert_tokens_to_ids(t) for t in TURNS)
    assert labelled[0] == sot and labelled[-2:] == [eot, tok.eos_token_id]  # the marker and the end are trained
    assert tok.decode(labelled[1:-2]) == "model\n2+3 = 5.\nThe answer is: 5"


def test_generation_under_gemma_turns_opens_the_model_turn_and_stops_at_its_end():
    from resofilter.data.templates import generation_prompt

    template = instantiate(compose_cfg(["template=gemma_turns"]).template)
    expected = "<start_of_turn>user\nQ?<end_of_turn>\n<start_of_turn>model\n"
    assert generation_prompt(template, "Q?", None, None) == expected
    zero = ProtocolSpec.from_cfg(compose_cfg(["eval=gsm8k"]).eval, "eval")
    assert "<end_of_turn>" in stop_strings(zero, [], template)
    assert stop_strings(zero, [], instantiate(compose_cfg([]).template)) == []  # plain: EOS only


def test_a_template_of_another_tokenizer_is_refused(tokenizer, turns_tokenizer, tmp_path):
    from resofilter.data.templates import check_fits

    template = instantiate(compose_cfg(["template=gemma_turns"]).template)
    check_fits(template, turns_tokenizer)
    with pytest.raises(ConfigError, match="<end_of_turn>.*one token"):
        check_fits(template, tokenizer)  # would be spelled out and trained on as text
    from resofilter.data.tokenize import tokenize_records

    rec = Record(sample_id="s", query="q", response="r")
    with pytest.raises(ConfigError, match="config key `train_template`"):  # fine-tuning names its own key
        tokenize_records([rec], template, tokenizer, 64, template_key="train_template")


# --- dedup before scoring, the cut over unique queries -------------------------------------------------

@pytest.mark.slow  # scores 64 samples and selects (~20 s)
def test_repeated_queries_are_dropped_before_scoring_and_the_cut_is_the_authors(tmp_path, tiny_model_dir):
    records = [json.loads(x) for x in METAMATH.read_text().splitlines()]
    first = {}
    for i, r in enumerate(records):
        first.setdefault(r["query"], i)
    unique = sorted(first.values())
    assert len(records) == 80 and len(unique) == 64  # the fixture repeats 16 queries, as MetaMathQA does
    common = [f"model.name_or_path={tiny_model_dir}", "model.embedded=null", "data=metamathqa",
              f"data.path={METAMATH}", "template=plain", "tokenize.max_length=768", "score.progress_bar=false",
              "score.sketch.enabled=false"]
    manifest = score(compose_cfg([*common, f"output_dir={tmp_path / 'score'}"], "score"))
    feats = pd.read_parquet(tmp_path / "score" / "features.parquet")
    assert manifest["data"]["dedup_removed"] == 16 and manifest["data"]["n_records"] == 80
    # only the first occurrences were scored (a sample id without an id field ends with the record's line)
    assert [int(i.rsplit("-", 1)[1]) for i in feats["sample_id"]] == unique
    select(compose_cfg([*common, f"features_dir={tmp_path / 'score'}", f"output_dir={tmp_path / 'sel'}",
                        "selection.keep_ratio=0.5"], "select"))
    kept = [json.loads(x) for x in (tmp_path / "sel" / "subset.jsonl").read_text().splitlines()]
    # reso_filter.py by hand: mean of the last 3 layers' mean_diff, sorted by (score, -idx) descending,
    # the first int(n × p) dropped, the rest in their original order
    cols = [f"model.layers.{k}.mlp.up_proj/mean_abs" for k in (1, 2, 3)]
    score_of = feats[cols].mean(axis=1).tolist()
    order = sorted(range(64), key=lambda i: (score_of[i], -i), reverse=True)
    dropped = set(order[: int(64 * 0.5)])
    expected = [records[unique[i]] for i in range(64) if i not in dropped]
    assert kept == expected


# --- the global batch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("devices,accumulation", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_the_paper_recipe_is_a_global_batch_of_16_on_any_number_of_gpus(devices, accumulation):
    cfg = compose_cfg(["experiment=paper_gemma2_2b_metamathqa", "data.path=/d.json", "trainer=ddp",
                       f"trainer.devices={devices}"])
    validate(cfg)
    spec = specs.finetune_spec(cfg)
    assert spec.batch_size == 2 and spec.accumulation(devices) == accumulation  # 2 × devices × accumulation = 16


def test_a_global_batch_that_does_not_divide_names_all_three():
    cfg = compose_cfg(["experiment=paper_gemma2_2b_metamathqa", "data.path=/d.json", "trainer=ddp",
                       "trainer.devices=3"])
    with pytest.raises(ConfigError, match=r"global_batch_size.*16.*finetune\.batch_size 2 × 3 processes.*devices"):
        validate(cfg)
    with pytest.raises(ConfigError, match="set one of them"):
        validate(compose_cfg(["finetune=full", "finetune.accumulate_grad_batches=2"]))


def test_a_fine_tuning_records_its_global_batch(tmp_path, tiny_model_dir):
    done = finetune(compose_cfg(ft_overrides(tiny_model_dir, tmp_path / "ft", "finetune.global_batch_size=8",
                                             "finetune.accumulate_grad_batches=null", "finetune.max_steps=2"),
                                "finetune"))
    assert done["batch"] == {"per_device": 4, "accumulate_grad_batches": 2, "world_size": 1, "global": 8}
    assert done["steps"] == 2


# --- a trained model separate from the scoring model --------------------------------------------------

@pytest.mark.slow  # two embedded builds and a run (~40 s)
def test_the_trained_model_is_not_the_scoring_model(tmp_path):

    small = {k.replace("model.", "train_model.", 1): v for k, v in TINY_RUN.items() if k.startswith("model.")}
    cfg = shrink(compose_cfg(["variant=reso50", "model@train_model=tiny_llama"], "run"), tmp_path,
                 **TINY_RUN, **small, **{"train_model.embedded.architecture.num_hidden_layers": 2})
    res = run(cfg)
    assert res["model"] != res["train_model"]
    assert res["weights"] == {"model": model_fingerprint(res["model"], None),
                              "train_model": model_fingerprint(res["train_model"], None)}
    assert res["weights"]["model"] != res["weights"]["train_model"]
    fman = json.loads((tmp_path / "out" / "select" / "manifest.json").read_text())
    features = json.loads((tmp_path / "cache" / "features" / res["stages"]["score"]["key"] / "manifest.json")
                          .read_text())
    assert features["structure"]["num_hidden_layers"] == 4  # the scoring model's depth: structure checks use it
    ft = json.loads((tmp_path / "out" / "finetune" / "finetune.json").read_text())
    assert ft["base_model"] == res["train_model"] and ft["scored_by"] == res["model"]
    trained = json.loads((tmp_path / "out" / "finetune" / "checkpoint" / "config.json").read_text())
    assert trained["num_hidden_layers"] == 2  # evaluation loaded this one
    assert fman["n_out"] == res["stages"]["finetune"]["n_records"]
    from resofilter.reporting.table import write_table

    header = write_table(tmp_path / "out")["markdown"].splitlines()[0].split(" | ")
    assert "scored by" in header and "fine-tuned" in header  # they differ: both are shown
