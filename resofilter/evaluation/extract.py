"""Answer extraction and checking behind one protocol.

* :class:`SyntheticExtractor` — the benchmark's own ``The answer is: N``.
* :class:`GSM8KExtractor` — gold after ``####``; predictions by ``The answer is: N``, else
  the last number; commas, ``$``, units and trailing periods normalised.
* :class:`MathExtractor` — ``\\boxed{…}`` (last one), equivalence via ``math-verify``.

An eval config names its extractor by ``_target_`` (``conf/eval/*.yaml``); a new one is a
class with ``extract``/``gold``/``equal`` and a config line, nothing else.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"The answer is:?\s*(.+)", re.IGNORECASE)


@runtime_checkable
class AnswerExtractor(Protocol):
    name: str

    def extract(self, text: str) -> str | None:
        """The answer a generation commits to, or ``None`` if it gives none."""

    def gold(self, text: str) -> str:
        """The gold answer from a reference answer/solution field."""

    def equal(self, pred: str | None, gold: str) -> bool: ...


def normalize_number(text: str) -> str | None:
    """``"$1,234.50."`` → ``"1234.5"``; ``None`` if no number is in ``text``."""
    m = _NUMBER.search(text)
    if not m:
        return None
    s = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = float(s)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


class SyntheticExtractor:
    """Only ``The answer is: N`` counts: a generation without it has extracted ``None``."""

    name = "synthetic"

    def extract(self, text: str) -> str | None:
        m = _ANSWER_IS.search(text)
        return normalize_number(m.group(1)) if m else None

    def gold(self, text: str) -> str:
        g = normalize_number(text)
        if g is None:
            raise ValueError(f"gold answer has no number: {text!r}")
        return g

    def equal(self, pred: str | None, gold: str) -> bool:
        return pred is not None and pred == gold


class GSM8KExtractor(SyntheticExtractor):
    name = "gsm8k"

    def extract(self, text: str) -> str | None:
        m = _ANSWER_IS.search(text)
        if m and (n := normalize_number(m.group(1))) is not None:
            return n
        return last_number(text)

    def gold(self, text: str) -> str:
        tail = text.split("####")[-1]
        return super().gold(tail)

    def equal(self, pred: str | None, gold: str) -> bool:
        if pred is None:
            return False
        try:
            return abs(float(pred) - float(gold)) < 1e-6
        except ValueError:
            return pred == gold


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), braces balanced."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    start = text.find("{", idx)
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


class MathExtractor:
    name = "math"

    def extract(self, text: str) -> str | None:
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed.strip()
        m = _ANSWER_IS.search(text)
        return m.group(1).strip().rstrip(".") if m else None

    def gold(self, text: str) -> str:
        boxed = last_boxed(text)
        return (boxed if boxed is not None else text).strip()

    def equal(self, pred: str | None, gold: str) -> bool:
        if pred is None:
            return False
        if pred.strip() == gold.strip():
            return True
        from math_verify import parse, verify

        def _parse(s: str):  # noqa: ANN202
            return parse(f"${s}$")

        try:
            return bool(verify(_parse(gold), _parse(pred)))
        except Exception:  # math-verify raises on unparsable LaTeX: not equal
            return False

