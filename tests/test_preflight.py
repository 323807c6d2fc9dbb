"""Every config error before any work (issue 23): each command's inputs are checked from the config at
start-up, so a missing ``eval.path`` fails in a second with exit 2, not after scoring and fine-tuning.

Each case runs the real command on a composed config; building the benchmark or the base model, or
reading the data, fails the test, so an error raised later than start-up is caught.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from resofilter import commands
from resofilter.errors import ConfigError
from resofilter.stages import context
from resofilter.stages.config_check import check_inputs
from tests.conftest import FIXTURES, GSM8K_TRAIN, compose_cfg

OWN = [f"data=jsonl data.path={GSM8K_TRAIN} data.query_field=question data.response_field=answer"]
MISSING = "/nonexistent/pool.jsonl"


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Anything that builds or reads fails the test; the cache must stay empty."""
    import resofilter.stages.embedded as embedded

    def forbidden(*_a, **_k):
        raise AssertionError("work started before the config error")

    for name in ("ensure_benchmark", "ensure_base_model", "ensure_extended_test", "ensure_reference"):
        monkeypatch.setattr(embedded, name, forbidden)
    monkeypatch.setattr(context, "load_data", forbidden)
    yield tmp_path
    assert not (tmp_path / "cache").exists()


def _cfg(command: str, *overrides: str, tmp):
    flat = [o for group in overrides for o in group.split()]
    return compose_cfg([*flat, f"paths.cache_dir={tmp / 'cache'}", f"output_dir={tmp / 'out'}"], command)


# (command, overrides, the key the error names): the data × eval combinations the README shows, and the
# inputs of every other command
ERRORS = [
    ("run", ["data=jsonl"], "data.path"),                                     # own data, no file named
    ("run", ["data=metamathqa"], "data.path"),
    ("run", [f"data=jsonl data.path={MISSING}"], "data.path"),
    ("score", [f"data=gsm8k data.path={MISSING}"], "data.path"),
    ("prepare", ["data=jsonl"], "data.path"),
    ("run", [*OWN, "eval=gsm8k", f"eval.path={MISSING}"], "eval.path"),
    ("run", ["+eval@evals.math=math", f"evals.math.path={MISSING}"], "evals.math.path"),
    # a model of the user's own (any existing dir here) has no synthetic benchmark: eval=math_synth needs eval.path
    ("run", [*OWN, "model=gemma2_2b", f"model.name_or_path={FIXTURES}"], "eval.path"),
    ("evaluate", [*OWN, f"model=gemma2_2b model.name_or_path={FIXTURES}"], "eval.path"),
    ("score", [f"model=gemma2_2b model.name_or_path={MISSING}"], "model.name_or_path"),  # a local path, missing
    ("evaluate", [f"checkpoint_dir={MISSING}"], "checkpoint_dir"),
    ("select", [], "features_dir"),
    ("select", [f"features_dir={MISSING}"], "features_dir"),
    ("select", ["scorer=target features_dir=."], "scorer.reference.features_dir"),
    ("finetune", [f"subset_path={MISSING}"], "subset_path"),
    ("finetune", ["data=jsonl"], "data.path"),
    ("run", [*OWN, "scorer=target"], "scorer.reference.path"),
    ("run", ["scorer=target", f"scorer.reference.path={MISSING}"], "scorer.reference.path"),
    ("run", ["run.until=evaluate"], "run.until"),
]


@pytest.mark.parametrize("command,overrides,key", ERRORS, ids=[f"{c}-{k}-{i}" for i, (c, _, k) in enumerate(ERRORS)])
def test_a_missing_input_fails_before_any_work(no_work, command, overrides, key):
    cfg = _cfg(command, *overrides, tmp=no_work)
    with pytest.raises(ConfigError) as err:
        getattr(commands, command)(cfg)
    assert err.value.key == key, str(err.value)


# the combinations that are valid: nothing to build is asked for that cannot be built
VALID = [
    ("run", []),                                                              # the embedded default
    ("run", ["eval=math_synth_2000"]),
    ("run", [*OWN]),                                                          # own data: the benchmark's test split
    ("run", [*OWN, "eval=math_synth_2000"]),
    ("run", [*OWN, "eval=gsm8k"]),
    ("run", [*OWN, "eval=math"]),
    ("run", ["data=gsm8k", "eval=gsm8k", "+eval@evals.math=math"]),
    ("run", ["data=metamathqa", f"data.path={FIXTURES / 'metamathqa' / 'train.jsonl'}", "eval=gsm8k"]),
    ("run", ["run.until=score", "data=jsonl", f"data.path={GSM8K_TRAIN}", "model=gemma2_2b",
             f"model.name_or_path={FIXTURES}"]),                              # stops before evaluating
    ("score", ["model=gemma2_2b"]),                                           # a hub name: not checked here
    ("evaluate", []),
    ("score", ["data=gsm8k"]),
    ("finetune", []),
]


@pytest.mark.parametrize("command,overrides", VALID)
def test_valid_inputs_pass_the_start_up_check(no_work, command, overrides):
    check_inputs(_cfg(command, *overrides, tmp=no_work))


def test_own_data_on_the_embedded_model_evaluates_on_its_benchmark(monkeypatch, tmp_path):
    """The embedded model is built from the default benchmark whatever the data, so own data evaluates on
    that benchmark's test split (eval=math_synth) unless eval.path names another file."""
    import resofilter.stages.embedded as embedded

    seen = []
    monkeypatch.setattr(embedded, "ensure_benchmark", lambda synth, cache: seen.append(synth) or tmp_path / "bench")
    cfg = _cfg("run", *OWN, tmp=tmp_path)
    assert context.input_source(cfg, "eval") == "benchmark"
    assert context.eval_path(cfg) == tmp_path / "bench" / "test.jsonl"
    assert dict(seen[0]) == dict(compose_cfg([], "run").data.synthetic)  # the default benchmark's recipe
    with pytest.raises(ConfigError, match="data.path"):  # the data itself never falls back to the benchmark pool
        context.input_source(_cfg("run", "data=jsonl", tmp=tmp_path), "data")


def test_the_cli_exits_2_naming_the_key_before_writing(tmp_path):
    p = subprocess.run([sys.executable, "-m", "resofilter", "run", "data=jsonl", f"data.path={GSM8K_TRAIN}",
                        "data.query_field=question", "data.response_field=answer", "model=gemma2_2b",
                        f"model.name_or_path={FIXTURES}", f"paths.cache_dir={tmp_path / 'cache'}",
                        f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "eval.path" in p.stderr and "eval=gsm8k" in p.stderr
    assert not (tmp_path / "cache").exists()
