"""The synthetic benchmark is deterministic and its noise labels are what they say."""

from __future__ import annotations

import re

import pytest

from resofilter.data.synthetic import SyntheticConfig, apply_op, generate, write_benchmark
from resofilter.errors import ConfigError

SMALL = dict(n_base_train=200, n_base_test=50, n_pool=400, n_test=100)
LINE = re.compile(r"^[A-Z][^:]*: (\d+) ([+\-*]) (\d+) = (\d+)$")


@pytest.fixture(scope="module")
def bench():
    return generate(SyntheticConfig(seed=3, **SMALL))


def test_deterministic_by_seed(bench):
    assert generate(SyntheticConfig(seed=3, **SMALL)) == bench
    assert generate(SyntheticConfig(seed=4, **SMALL))["pool"] != bench["pool"]


def test_sizes_and_disjoint_test_set(bench):
    assert [len(bench[k]) for k in ("base_train", "base_test", "pool", "test")] == [200, 50, 400, 100]
    test_q = {r["query"] for r in bench["test"]} | {r["query"] for r in bench["base_test"]}
    assert not test_q & {r["query"] for r in bench["pool"] + bench["base_train"]}


def _check_clean(r):
    lines = r["response"].split("\n")
    assert lines[-1] == f"The answer is: {r['meta']['answer']}"
    nums = [int(n) for n in re.findall(r"\d+", r["query"].split(" How many")[0])]
    x = nums[0]
    for line, n in zip(lines[:-1], nums[1:], strict=True):
        a, op, b, c = LINE.match(line).groups()
        assert int(a) == x and int(b) == n and int(c) == apply_op(x, op, n)
        x = int(c)
    assert x == r["meta"]["answer"]


def test_clean_records_are_correct_step_by_step(bench):
    for r in bench["test"] + bench["base_train"][:50]:
        _check_clean(r)
    clean = [r for r in bench["pool"] if r["meta"]["noise_kind"] == "clean"]
    assert clean and all(not r["meta"]["noisy"] for r in clean)
    for r in clean:
        _check_clean(r)
        assert r["meta"]["n_steps"] in (2, 3)


def test_noise_rates_are_exact_counts(bench):
    cfg = SyntheticConfig(**SMALL)
    kinds = [r["meta"]["noise_kind"] for r in bench["pool"]]
    for kind, rate in cfg.noise.items():
        assert kinds.count(kind) == round(rate * 400)


def test_noise_kinds_are_what_they_say(bench):
    by_q = {r["query"]: r for r in bench["pool"]}
    for r in bench["pool"]:
        kind, resp, ans = r["meta"]["noise_kind"], r["response"], r["meta"]["answer"]
        final = re.search(r"The answer is: (\d+)$", resp)
        if kind == "wrong_final":
            assert int(final.group(1)) != ans
            body = "\n".join(resp.split("\n")[:-1])
            _check_clean({**r, "response": body + f"\nThe answer is: {ans}"})
        elif kind == "corrupted_step":
            lines = resp.split("\n")[:-1]
            assert any(int(LINE.match(line).group(4)) != apply_op(int(LINE.match(line).group(1)),
                       LINE.match(line).group(2), int(LINE.match(line).group(3))) for line in lines) \
                or int(final.group(1)) != ans
        elif kind == "truncated":
            assert "The answer is" not in resp
        elif kind == "easier":  # the correct solution of only the first step
            first, last = resp.split("\n")
            a, op, b, c = LINE.match(first).groups()
            assert int(final.group(1)) == int(c) == apply_op(int(a), op, int(b))
            assert r["meta"]["n_steps"] >= 2
        elif kind == "mismatched":  # a clean solution of a different problem
            lines = resp.split("\n")
            first = [int(x) for x in LINE.match(lines[0]).groups()[::2]]
            start = int(re.search(r"has (\d+)", r["query"]).group(1))
            assert int(final.group(1)) != ans or first[0] != start or first[1] != int(
                re.findall(r"\d+", r["query"])[1])
        elif kind == "garbled":
            assert final is None
        elif kind == "near_duplicate":  # another pool question, cosmetically changed, solved correctly
            _check_clean(r)
            q = r["query"]
            assert q.replace("?", " now?") in by_q or q.rstrip(" ") in by_q
        else:
            assert kind == "clean"


def test_write_benchmark_manifest(tmp_path):
    m = write_benchmark(SyntheticConfig(**SMALL), tmp_path)
    assert m["counts"]["pool"] == 400 and (tmp_path / "pool.jsonl").exists()
    assert abs(m["pool_noise_rate"] - sum(SyntheticConfig().noise.values())) < 0.01


def test_invalid_noise_config():
    with pytest.raises(ConfigError, match="noise"):
        generate(SyntheticConfig(noise={"sarcasm": 0.1}))
    with pytest.raises(ConfigError, match="noise"):
        generate(SyntheticConfig(noise={"wrong_final": 0.7, "garbled": 0.4}))


def _steps(r: dict) -> list[tuple[int, str, int, int]]:
    return [tuple(int(g) if g.isdigit() else g for g in LINE.match(x).groups())
            for x in r["response"].split("\n") if LINE.match(x)]


def test_another_pool_keeps_the_benchmark_and_has_its_own_noise(bench, tmp_path):
    """data=math_synth_b: a second pool drawn beside the benchmark, disjoint from it, with the second
    pool's kinds at exact counts, each kind what it says (checked against the clean solution)."""
    from omegaconf import OmegaConf

    from resofilter.configs import load_group_option
    from resofilter.data.synthetic import FILLER, NOISE_KINDS_B, another_pool

    cfg = SyntheticConfig(seed=3, **SMALL)
    noise = dict(OmegaConf.to_container(load_group_option("data", "math_synth_b").pool.noise))
    assert set(noise) == set(NOISE_KINDS_B)
    taken = {r["query"] for split in bench.values() for r in split}
    pool = another_pool(cfg, "b", 500, noise, taken)
    assert pool == another_pool(cfg, "b", 500, noise, taken) and pool != another_pool(cfg, "c", 500, noise, taken)
    assert not {r["query"] for r in pool} & taken and len({r["query"] for r in pool}) == 500
    kinds = [r["meta"]["noise_kind"] for r in pool]
    assert all(kinds.count(k) == round(v * 500) for k, v in noise.items())
    assert pool[0]["id"] == "pool_b-00000"
    for r in pool:
        kind, answer = r["meta"]["noise_kind"], r["meta"]["answer"]
        clean = generate_clean(r)
        lines = r["response"].split("\n")
        if kind == "clean":
            _check_clean(r)
        elif kind == "answer_only":
            assert r["response"] == f"The answer is: {answer}"
        elif kind == "skipped_step":
            assert len(lines) == len(clean) - 1 and set(lines) < set(clean) and lines[-1] == clean[-1]
        elif kind == "swapped_steps":
            assert lines == [*clean[:-1][::-1], clean[-1]]
        elif kind == "chatty":
            assert lines[:-1] == clean and lines[-1] in FILLER
        else:  # misread / wrong_operation: one step's operand / operation differs from its sentence; a wrong answer
            steps = _steps(r)
            assert all(c == apply_op(a, op, b) for a, op, b, c in steps)  # every equation right in itself …
            assert lines[-1] == f"The answer is: {steps[-1][3]}" and steps[-1][3] != answer  # … the answer wrong
            true_steps = _steps({"response": "\n".join(clean)})
            changed = [(s, t) for s, t in zip(steps, true_steps, strict=True) if s[1:3] != t[1:3]]
            assert len(changed) == 1
            (a, op, b, _), (_, op0, b0, _) = changed[0]
            assert (op == op0 and b != b0) if kind == "misread" else (op != op0 and b == b0)


def generate_clean(r: dict) -> list[str]:
    """The clean solution lines of a pool record's query, rebuilt from the query text."""
    nums = [int(n) for n in re.findall(r"\d+", r["query"].split(" How many")[0])]
    sentences = re.split(r"(?<=\.) ", r["query"].split(" How many")[0])[1:]
    ops = []
    for s in sentences:
        op = "*" if "times" in s else "+" if any(w in s for w in ("buys", "finds", "gets", "given")) else "-"
        ops.append(op)
    x, lines = nums[0], []
    for s, op, n in zip(sentences, ops, nums[1:], strict=True):
        y = apply_op(x, op, n)
        lines.append(f"{s.rstrip('.')}: {x} {op} {n} = {y}")
        x = y
    return [*lines, f"The answer is: {x}"]


def test_another_pool_by_config(tmp_path):
    from resofilter.stages import context
    from resofilter.stages.config_check import validate
    from tests.conftest import compose_cfg

    small = [f"data.synthetic.{k}={v}" for k, v in SMALL.items()] + [f"paths.cache_dir={tmp_path}"]
    b, a = compose_cfg(["data=math_synth_b", "data.pool.n=50", *small]), compose_cfg(small)
    assert context.benchmark_dir(b) == context.benchmark_dir(a)  # one benchmark, one base model, one test set
    path = context.data_path(b)
    assert path.parent == context.benchmark_dir(a) and path.name.startswith("pool_b-")
    records, _ = context.load_data(b)
    assert len(records) == 50 and not {r.query for r in records} & {r.query for r in context.load_data(a)[0]}
    for bad, key in ((["data.pool.noise.misread=0.99"], "data.pool.noise"), (["+data.pool.noise.typo=0.1"],
                     "data.pool.noise"), (["data.pool.n=0"], "data.pool")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(compose_cfg(["data=math_synth_b", *bad, *small]))
