"""Evaluation protocols by name: how a test question becomes a prompt.

Papers differ here, and a GSM8K number means little without it:

* ``zero_shot`` — the question in the **training template**, nothing else (MetaMath and
  Qwen-Math evaluations): it measures what fine-tuning taught, in the format it taught.
* ``few_shot_cot`` — ``k`` solved exemplars drawn by seed from a pool of training problems
  (never an evaluated question), each as question + chain-of-thought solution, then the
  question (the open-instruct evaluation the ResoFilter authors point to: ``Question: …
  Answer: … So the answer is N.``; MATH in the Minerva ``Problem:/Solution:`` format). The
  training template is not used; generation stops where the next exemplar would start.

The answer extractor of the eval set reads both (``The answer is``/``####``/``\\boxed``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from resofilter.data.records import Record, get_field, load_records
from resofilter.data.templates import Template, generation_prompt, generation_stops
from resofilter.errors import ConfigError

PROTOCOLS = ("zero_shot", "few_shot_cot")


@dataclass(frozen=True)
class CoTFormat:
    """How ``few_shot_cot`` writes a question and an exemplar's solution."""

    question: str = "Question: {query}\nAnswer:"
    solution: str = " {reasoning} So the answer is {gold}."
    reasoning_before: str | None = "####"  # the reasoning is the answer field before this marker; null: all of it
    strip_pattern: str | None = "<<.*?>>"  # removed from the reasoning (GSM8K's calculator annotations)
    separator: str = "\n\n"
    stop: tuple[str, ...] = ("\n\nQuestion:",)


@dataclass(frozen=True)
class ProtocolSpec:
    name: str = "zero_shot"
    k: int = 0
    pool_path: str | None = None
    seed: int = 0
    cot: CoTFormat = field(default_factory=CoTFormat)

    @classmethod
    def from_cfg(cls, ev: Any, key: str = "eval") -> ProtocolSpec:
        name = ev.get("protocol", "zero_shot")
        if name not in PROTOCOLS:
            raise ConfigError(f"{key}.protocol", f"expected one of {list(PROTOCOLS)}, got {name!r}")
        k = int(ev.get("few_shot") or 0)
        if name == "zero_shot" and k:
            raise ConfigError(f"{key}.few_shot", f"is {k} with protocol zero_shot; exemplars are "
                              f"{key}.protocol=few_shot_cot")
        if name == "few_shot_cot" and (k < 1 or not ev.get("few_shot_path")):
            raise ConfigError(f"{key}.few_shot", "protocol few_shot_cot needs few_shot ≥ 1 exemplars and "
                              "few_shot_path (the training problems they are drawn from)")
        c = ev.get("cot") or {}
        cot = CoTFormat(**{**CoTFormat().__dict__, **{k_: (tuple(v) if k_ == "stop" else v) for k_, v in c.items()}})
        return cls(name, k, ev.get("few_shot_path"), int(ev.get("few_shot_seed") or 0), cot)


def reasoning_of(answer: str, cot: CoTFormat) -> str:
    """An exemplar's reasoning: the answer field before ``cot.reasoning_before`` (GSM8K's ``####``;
    its lines joined, calculator annotations ``<<…>>`` removed), else the whole field."""
    marker = cot.reasoning_before
    if not marker:
        return answer.strip()
    text = answer.split(marker)[0]
    if cot.strip_pattern:
        text = re.sub(cot.strip_pattern, "", text)
    return " ".join(text.split())


def draw_exemplars(spec: ProtocolSpec, query_field: str, answer_field: str, extractor: Any,
                   avoid: set[str]) -> list[tuple[str, str]]:
    """(question, solution) of ``spec.k`` pool problems drawn by ``spec.seed``, none of them in ``avoid``."""
    pool = [r for r in load_records(spec.pool_path, query_field, answer_field) if r.query not in avoid]
    if len(pool) < spec.k:
        raise ConfigError("eval.few_shot_path", f"{spec.pool_path} has {len(pool)} problems that are not evaluated; "
                          f"few_shot={spec.k} needs that many")
    shots = random.Random(spec.seed).sample(pool, spec.k)
    out = []
    for r in shots:
        answer = str(get_field(r.raw, answer_field))
        reasoning = reasoning_of(answer, spec.cot)
        out.append((r.query, spec.cot.solution.format(reasoning=reasoning, gold=extractor.gold(answer))))
    return out


def build_prompts(spec: ProtocolSpec, records: Sequence[Record], template: Template, tokenizer: Any,
                  exemplars: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The prompt of every record under the protocol."""
    if spec.name == "zero_shot":
        return [generation_prompt(template, r.query, r.input, tokenizer) for r in records]
    cot = spec.cot
    prefix = "".join(cot.question.format(query=q) + sol + cot.separator for q, sol in exemplars)
    return [prefix + cot.question.format(query=r.query) for r in records]


def stop_strings(spec: ProtocolSpec, base: Sequence[str], template: Template | None = None) -> list[str]:
    """Where generations stop: the eval set's strings, the next exemplar (few_shot_cot) or the end of the
    training template's turn (zero_shot: its labelled suffix, ``<end_of_turn>``)."""
    extra = list(spec.cot.stop) if spec.name == "few_shot_cot" else generation_stops(template) if template else []
    return list(base) + [s for s in extra if s not in base]
