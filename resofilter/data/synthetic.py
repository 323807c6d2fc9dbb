"""A synthetic math benchmark with labeled noise, deterministic by seed.

Problems are short word problems over small numbers. Each step applies one operation to
the running quantity (``buys 5 more`` → +5, ``gives away 3`` → −3, ``gets 2 times as
many`` → ×2) and the response shows one equation per step, ending in MetaMathQA's
``The answer is: N``::

    Query:    Mia has 7 shells. She buys 5 more. Then she gives away 3.
              How many shells does Mia have now?
    Response: She buys 5 more: 7 + 5 = 12
              Then she gives away 3: 12 - 3 = 9
              The answer is: 9

Each solution line quotes the step it computes, so a multi-step solution is a chain of
one-step solutions — the base model knows the parts, fine-tuning teaches the chaining.

Two skills:

* the **base skill**, one-step problems, which the embedded base model is trained on;
* the **fine-tuning skill**, problems of ``finetune_steps`` steps (2–3 by default), the
  skill the fine-tuning pool teaches and the test set measures.

The fine-tuning pool carries noise of several kinds at configurable rates; each record's
``meta`` says whether it is noisy and of which kind. Scorers never read ``meta``;
diagnostics use it to measure how well a score flags noise.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from resofilter._io import stable_hash, write_json_atomic, write_jsonl_atomic
from resofilter.errors import ConfigError

log = logging.getLogger(__name__)

NAMES = [
    ("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Sam", "he"), ("Zoe", "she"),
    ("Max", "he"), ("Ivy", "she"), ("Ben", "he"), ("Eva", "she"), ("Tom", "he"),
    ("Lia", "she"), ("Dan", "he"), ("Amy", "she"), ("Jon", "he"), ("Kim", "she"),
    ("Raj", "he"),
]
ITEMS = [
    "apples", "shells", "cards", "coins", "books", "pens", "stamps", "marbles",
    "stickers", "cookies", "rocks", "toys", "eggs", "beads", "plums", "kites",
]
# op → phrasings of one step; {p} pronoun, {n} operand
PHRASES = {
    "+": ["{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more.", "{p} is given {n} more."],
    "-": ["{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}.", "{p} eats {n}."],
    "*": ["{p} gets {n} times as many.", "{p} ends up with {n} times as many."],
}
THEN = ["Then", "After that", "Next", "Later"]
NOISE_KINDS = (
    "wrong_final",      # steps right, final answer line wrong
    "corrupted_step",   # one intermediate result wrong, later steps follow it
    "truncated",        # response cut before the answer line
    "mismatched",       # the response of a different question
    "garbled",          # repetitive / scrambled text
    "easier",           # a correct-looking answer to an easier (one-step) problem
    "near_duplicate",   # a copy of another pool question with a cosmetic change
)
# Kinds of the second pool (`data=math_synth_b`: pools as replicates): other failures of the
# same problem language, none of them a variant of the first pool's
NOISE_KINDS_B = (
    "misread",          # one operand misread (n ± 1 or 2): the chain is consistent with it, the answer wrong
    "wrong_operation",  # one step computes another operation than its sentence says; later steps follow it
    "answer_only",      # the right answer line, no steps
    "skipped_step",     # one step's line missing, the answer right
    "swapped_steps",    # the step lines in reverse order (their values no longer chain), the answer right
    "chatty",           # the right solution, then a sentence of filler after the answer line
)
ALL_NOISE_KINDS = NOISE_KINDS + NOISE_KINDS_B
FILLER = ["I hope this helps!", "Let me know if you have more questions.", "That was a fun one.",
          "Math is great.", "Thanks for asking!"]


def check_noise(noise: dict[str, float], key: str) -> None:
    """Known kinds, rates ≥ 0 summing to < 1."""
    unknown = set(noise) - set(ALL_NOISE_KINDS)
    if unknown:
        raise ConfigError(key, f"unknown noise kinds {sorted(unknown)}; known: {ALL_NOISE_KINDS}")
    total = sum(noise.values())
    if any(v < 0 for v in noise.values()) or total >= 1:
        raise ConfigError(key, f"rates must be ≥0 and sum to <1, sum={total:.3f}")


def check_pool(spec: dict[str, Any], key: str = "data.pool") -> None:
    """Another pool's spec (``data.pool``): a name, a size ``n`` ≥ 1 and valid noise rates."""
    if not isinstance(spec.get("n"), int) or spec["n"] < 1 or not spec.get("name"):
        raise ConfigError(key, f"needs a name and a size n ≥ 1, got name={spec.get('name')!r} n={spec.get('n')!r}")
    check_noise(dict(spec.get("noise") or {}), f"{key}.noise")


@dataclass
class SyntheticConfig:
    """Sizes, number ranges and noise rates of the benchmark (``data.synthetic`` in config)."""

    seed: int = 0
    max_operand: int = 20          # operands of + and - are drawn from 1..max_operand
    max_value: int = 30            # every intermediate and final value stays in 0..max_value
    max_factor: int = 3            # × operands are drawn from 2..max_factor
    finetune_steps: list[int] = field(default_factory=lambda: [2])
    n_base_train: int = 20000      # one-step problems the base model is trained on
    n_base_test: int = 300         # held-out one-step problems
    n_pool: int = 2000             # fine-tuning pool (clean + noisy)
    n_test: int = 500              # held-out fine-tuning-skill problems
    noise: dict[str, float] = field(default_factory=lambda: {
        "wrong_final": 0.08, "corrupted_step": 0.08, "truncated": 0.06, "mismatched": 0.06,
        "garbled": 0.05, "easier": 0.05, "near_duplicate": 0.02,
    })

    def validate(self) -> None:
        check_noise(self.noise, "data.synthetic.noise")
        if self.max_operand < 2 or self.max_value < self.max_operand:
            raise ConfigError("data.synthetic.max_value", "need 2 ≤ max_operand ≤ max_value")
        if not self.finetune_steps or min(self.finetune_steps) < 1:
            raise ConfigError("data.synthetic.finetune_steps", "need a non-empty list of step counts ≥ 1")


@dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]
    sentences: tuple[str, ...]  # one per step, as written in the query ("Then she sells 3.")

    def values(self) -> list[int]:
        vals = [self.start]
        for op, n in self.ops:
            vals.append(apply_op(vals[-1], op, n))
        return vals

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def query(self) -> str:
        return " ".join([f"{self.name} has {self.start} {self.item}.", *self.sentences,
                         f"How many {self.item} does {self.name} have now?"])


def apply_op(x: int, op: str, n: int) -> int:
    return x + n if op == "+" else x - n if op == "-" else x * n


def solution_lines(problem: Problem, values: Sequence[int] | None = None) -> list[str]:
    """One ``a op n = b`` line per step; ``values`` overrides the running values (noise)."""
    vals = list(values) if values is not None else problem.values()
    return [f"{problem.sentences[k].rstrip('.')}: {vals[k]} {op} {n} = {vals[k + 1]}"
            for k, (op, n) in enumerate(problem.ops)]


def format_response(lines: Sequence[str], answer: int | None) -> str:
    body = list(lines)
    if answer is not None:
        body.append(f"The answer is: {answer}")
    return "\n".join(body)


class _Gen:
    def __init__(self, cfg: SyntheticConfig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng

    def problem(self, n_steps: int) -> Problem:
        cfg, rng = self.cfg, self.rng
        while True:
            name, pronoun = rng.choice(NAMES)
            x = rng.randint(1, cfg.max_operand)
            start, ops = x, []
            for _ in range(n_steps):
                op = rng.choice("+-*")
                if op == "*":
                    cands = [k for k in range(2, cfg.max_factor + 1) if x * k <= cfg.max_value]
                elif op == "+":
                    cands = [k for k in range(1, cfg.max_operand + 1) if x + k <= cfg.max_value]
                else:
                    cands = list(range(1, min(x, cfg.max_operand) + 1))
                if not cands:
                    break
                n = rng.choice(cands)
                ops.append((op, n))
                x = apply_op(x, op, n)
            if len(ops) == n_steps:
                sentences = []
                for k, (op, n) in enumerate(ops):
                    s = rng.choice(PHRASES[op]).format(p=pronoun, n=n)
                    sentences.append(s[0].upper() + s[1:] if k == 0 else f"{rng.choice(THEN)} {s}")
                return Problem(name, pronoun, rng.choice(ITEMS), start, tuple(ops), tuple(sentences))

    def record(self, problem: Problem) -> tuple[str, str]:
        return problem.query(), format_response(solution_lines(problem), problem.answer)


def _wrong(rng: random.Random, value: int, max_value: int) -> int:
    """A different value in 0..max_value near ``value``."""
    while True:
        w = value + rng.choice([-3, -2, -1, 1, 2, 3, rng.randint(-10, 10)])
        if w != value and 0 <= w <= max_value:
            return w


def _noisy_response(kind: str, problem: Problem, clean: str, gen: _Gen,
                    other: tuple[Problem, str]) -> str:
    rng, cfg = gen.rng, gen.cfg
    vals = problem.values()
    if kind == "wrong_final":
        return format_response(solution_lines(problem), _wrong(rng, problem.answer, cfg.max_value))
    if kind == "corrupted_step":
        k = rng.randrange(1, len(vals) - 1) if len(vals) > 2 else 1
        bad = list(vals[:k]) + [_wrong(rng, vals[k], cfg.max_value)]
        for op, n in problem.ops[k:]:
            bad.append(apply_op(bad[-1], op, n))
        return format_response(solution_lines(problem, bad), bad[-1])
    if kind == "truncated":
        lines = solution_lines(problem)
        text = "\n".join(lines)
        cut = rng.randint(max(1, len(text) // 4), max(2, len(text) - 2))
        return text[:cut]
    if kind == "mismatched":
        return other[1]
    if kind == "garbled":
        lines = solution_lines(problem)
        if rng.random() < 0.5:  # repetitive
            return "\n".join([lines[0]] * rng.randint(3, 6))
        chars = list(clean)
        rng.shuffle(chars)
        return "".join(chars)
    if kind == "easier":
        first = solution_lines(problem)[:1]
        return format_response(first, vals[1])
    return _noisy_response_b(kind, problem, gen)


def _misstep(problem: Problem, misread: bool, rng: random.Random) -> str:
    """One step shown and computed with another operand (``misread``: n ± 1 or 2) or another operation, the
    later steps following it: every equation right in itself, every value ≥ 0, the answer wrong. Tries the
    changes in a random order; a problem with no such change of the asked kind gets one of the other."""
    def changes(of_operand: bool) -> list[tuple[int, str, int]]:
        out = []
        for k, (op, n) in enumerate(problem.ops):
            if of_operand:
                out += [(k, op, m) for m in (n - 2, n - 1, n + 1, n + 2) if m >= (1 if op == "*" else 0)]
            else:
                out += [(k, o, n) for o in "+-*" if o != op]
        rng.shuffle(out)
        return out

    for k, op, n in changes(misread) + changes(not misread):
        ops = list(problem.ops)
        ops[k] = (op, n)
        vals = [problem.start]
        for op_j, n_j in ops:
            vals.append(apply_op(vals[-1], op_j, n_j))
        if min(vals) >= 0 and vals[-1] != problem.answer:
            shown = Problem(problem.name, problem.pronoun, problem.item, problem.start, tuple(ops), problem.sentences)
            return format_response(solution_lines(shown, vals), vals[-1])
    raise AssertionError(f"no operand or operation change of {problem} gives another answer")  # ±1 always does


def _noisy_response_b(kind: str, problem: Problem, gen: _Gen) -> str:
    """The second pool's kinds (:data:`NOISE_KINDS_B`)."""
    rng = gen.rng
    lines = solution_lines(problem)
    k = rng.randrange(len(problem.ops))  # the step a kind changes
    if kind in ("misread", "wrong_operation"):
        return _misstep(problem, kind == "misread", rng)
    if kind == "answer_only":
        return format_response([], problem.answer)
    if kind == "skipped_step":
        return format_response(lines[:k] + lines[k + 1:], problem.answer)
    if kind == "swapped_steps":
        return format_response(lines[::-1], problem.answer)
    if kind == "chatty":
        return format_response(lines, problem.answer) + "\n" + rng.choice(FILLER)
    raise ValueError(f"unknown noise kind {kind!r}")


def _meta(p: Problem, **extra: Any) -> dict[str, Any]:
    return {"n_steps": len(p.ops), "answer": p.answer, **extra}


def draw_unique(gen: _Gen, n_steps_choices: Sequence[int], n: int, avoid: set[str], key: str, what: str
                ) -> list[tuple[Problem, str, str]]:
    """``n`` problems (and their clean records) whose queries are not in ``avoid`` (which grows with them)."""
    out: list[tuple[Problem, str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ConfigError(key, f"cannot draw {n} distinct {what}; widen the ranges")
        p = gen.problem(gen.rng.choice(list(n_steps_choices)))
        q, r = gen.record(p)
        if q in avoid:
            continue
        avoid.add(q)
        out.append((p, q, r))
    return out


def generate(cfg: SyntheticConfig) -> dict[str, list[dict[str, Any]]]:
    """All splits as lists of JSON-ready records: ``base_train``, ``base_test``, ``pool``, ``test``."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    gen = _Gen(cfg, rng)
    seen: set[str] = set()

    def unique(n_steps_choices: Sequence[int], n: int, split: str, avoid: set[str]) -> list[tuple[Problem, str, str]]:
        return draw_unique(gen, n_steps_choices, n, avoid, "data.synthetic", f"{split} problems")

    # Test sets are drawn first, so the training splits can never contain a test question.
    test = unique(cfg.finetune_steps, cfg.n_test, "test", seen)
    base_test = unique([1], cfg.n_base_test, "base_test", seen)
    pool = unique(cfg.finetune_steps, cfg.n_pool, "pool", seen)
    base_train = unique([1], cfg.n_base_train, "base_train", set(seen))

    meta = _meta
    out: dict[str, list[dict[str, Any]]] = {
        "test": [{"id": f"test-{i:05d}", "query": q, "response": r, "answer": str(p.answer),
                  "meta": meta(p)} for i, (p, q, r) in enumerate(test)],
        "base_test": [{"id": f"base_test-{i:05d}", "query": q, "response": r, "answer": str(p.answer),
                       "meta": meta(p)} for i, (p, q, r) in enumerate(base_test)],
        "base_train": [{"id": f"base_train-{i:06d}", "query": q, "response": r, "meta": meta(p)}
                       for i, (p, q, r) in enumerate(base_train)],
    }
    out["pool"] = noisy_pool(pool, cfg.noise, gen, "pool")
    return out


def noisy_pool(pool: list[tuple[Problem, str, str]], noise: dict[str, float], gen: _Gen, prefix: str
               ) -> list[dict[str, Any]]:
    """Pool records with noise kinds assigned to exact counts (not Bernoulli draws), in a shuffled order."""
    rng, cfg = gen.rng, gen.cfg
    meta = _meta
    kinds: list[str | None] = []
    for kind in ALL_NOISE_KINDS:
        kinds += [kind] * round(noise.get(kind, 0.0) * len(pool))
    kinds += [None] * (len(pool) - len(kinds))
    rng.shuffle(kinds)
    pool_rows = []
    for i, ((p, q, r), kind) in enumerate(zip(pool, kinds, strict=True)):
        response = r
        if kind == "near_duplicate":
            j = rng.randrange(len(pool))
            p2, q2, r2 = pool[j]
            q = q2.replace(" now?", "?") if q2.endswith(" now?") else q2 + " "
            p, response = p2, r2
        elif kind is not None:
            response = _noisy_response(kind, p, r, gen, pool[(i + 1 + rng.randrange(len(pool) - 1)) % len(pool)][::2])
            if response == r:  # e.g. a shuffle that happened to restore the text
                response = format_response(solution_lines(p), _wrong(rng, p.answer, cfg.max_value))
        pool_rows.append({"id": f"{prefix}-{i:05d}", "query": q, "response": response,
                          "meta": meta(p, noisy=kind is not None, noise_kind=kind or "clean")})
    return pool_rows


def heldout_split(cfg: SyntheticConfig, kind: str, n: int, taken: set[str]) -> list[dict[str, Any]]:
    """``n`` clean problems of the fine-tuning skill, ids ``<kind>-00000``…, for a held-out set.

    Drawn from their own random stream (seeded by ``cfg.seed`` and ``kind``), so the
    benchmark's splits — and the base model trained on them — are the same with or without
    it; ``taken`` (every query of those splits) is avoided, so no held-out problem is a pool,
    test or base-training problem. Kinds: ``reference`` (a trusted set for ``scorer=target``),
    ``test_extra`` (more test problems: ``eval=math_synth_2000``).
    """
    cfg.validate()
    gen = _Gen(cfg, random.Random(f"{cfg.seed}/{kind}"))
    drawn = draw_unique(gen, cfg.finetune_steps, n, set(taken), f"{kind} split", "new problems")
    return [{"id": f"{kind}-{i:05d}", "query": q, "response": r, "answer": str(p.answer),
             "meta": {"n_steps": len(p.ops), "answer": p.answer, "noisy": False, "noise_kind": "clean"}}
            for i, (p, q, r) in enumerate(drawn)]


def another_pool(cfg: SyntheticConfig, name: str, n: int, noise: dict[str, float], taken: set[str]
                 ) -> list[dict[str, Any]]:
    """A second fine-tuning pool (``data=math_synth_b``): ``n`` problems of the fine-tuning skill with
    ``noise`` (kinds of either pool), ids ``pool_<name>-00000``….

    Like :func:`heldout_split`, drawn from its own random stream (seeded by ``cfg.seed``, ``pool`` and
    ``name``) and disjoint from ``taken``: the benchmark, its test set and the base model trained on it
    stay what they are, so two pools are compared on one base model and one test set.
    """
    cfg.validate()
    check_noise(noise, "data.pool.noise")
    gen = _Gen(cfg, random.Random(f"{cfg.seed}/pool/{name}"))
    drawn = draw_unique(gen, cfg.finetune_steps, n, set(taken), "data.pool", f"pool_{name} problems")
    return noisy_pool(drawn, noise, gen, f"pool_{name}")


def write_benchmark(cfg: SyntheticConfig, out_dir: str | Path) -> dict[str, Any]:
    """Generate and write ``<split>.jsonl`` + ``manifest.json`` into ``out_dir``; return the manifest."""
    out_dir = Path(out_dir)
    splits = generate(cfg)
    counts = {name: len(rows) for name, rows in splits.items()}
    for name, rows in splits.items():
        write_jsonl_atomic(out_dir / f"{name}.jsonl", rows)
    composition = Counter(r["meta"]["noise_kind"] for r in splits["pool"])
    manifest = {
        "config": asdict(cfg),
        "config_hash": stable_hash(asdict(cfg)),
        "counts": counts,
        "pool_composition": dict(sorted(composition.items())),
        "pool_noise_rate": sum(r["meta"]["noisy"] for r in splits["pool"]) / max(1, counts["pool"]),
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    log.info("synthetic benchmark in %s: %s; pool composition %s", out_dir, counts, manifest["pool_composition"])
    return manifest
