"""Keep-ratio selection, as the authors' reso_filter.py does it, with its rounding and ties.

1. Rank by badness (higher = worse). Ties: of equal scores the later sample is the better one,
   as reso_filter.py's ``sorted(key=(score, -idx), reverse=True)`` drops the lower index first.
2. Drop ``⌊N × (1 − keep_ratio)⌋`` samples (their ``int(N × p)`` for the dropped share p, the
   ratio taken exactly as written) and keep the other ``n_keep`` (at least 1): with ``drop_high``
   (the paper) the least bad, with ``drop_low`` the most bad. N is what was scored: with the
   authors' dedup (``data.dedup``) the unique queries.
3. Optionally deduplicate the kept set by query (``selection.dedup``: ``exact`` or
   ``normalized``; the first in original order stays) — a dedup after the cut, not the authors'.
4. Restore the original order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from resofilter.data.records import normalize_query
from resofilter.errors import ConfigError


@dataclass(frozen=True)
class Selection:
    kept: np.ndarray  # (N,) bool, in original order
    rank: np.ndarray  # (N,) 0 = least bad
    n_keep_before_dedup: int
    dedup_removed: int

    @property
    def n_kept(self) -> int:
        return int(self.kept.sum())


def check_keep_ratio(value: Any, key: str = "selection.keep_ratio") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(key, f"must be a number in (0, 1], got {value!r}")
    return float(value)


def n_to_keep(n: int, keep_ratio: float) -> int:
    """``n − ⌊n × (1 − keep_ratio)⌋``, at least 1: the authors drop ``int(n × p)`` for p = 1 − keep_ratio.

    The ratio is taken exactly as written (``Fraction("0.7")``), so ``0.7 × 10`` keeps 7, not a
    float's 6.999….
    """
    check_keep_ratio(keep_ratio)
    drop = math.floor(n * (1 - Fraction(repr(float(keep_ratio)))))
    return max(1, min(n, n - drop))


def select(badness: np.ndarray, keep_ratio: float, direction: str = "drop_high",
           queries: Sequence[str] | None = None, dedup: str | None = None) -> Selection:
    n = len(badness)
    if n == 0:
        raise ConfigError("data", "nothing to select from")
    if direction not in ("drop_high", "drop_low"):
        raise ConfigError("selection.direction", f"expected drop_high|drop_low, got {direction!r}")
    pos = np.arange(n)
    order = np.lexsort((-pos, badness))  # ascending badness; of equal ones the later is better (kept first)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = pos
    k = n_to_keep(n, keep_ratio)
    chosen = order[:k] if direction == "drop_high" else np.lexsort((pos, -badness))[:k]
    kept = np.zeros(n, dtype=bool)
    kept[chosen] = True
    removed = 0
    if dedup not in (None, "none"):
        if queries is None:
            raise ConfigError("selection.dedup", "needs the records' queries")
        if dedup not in ("exact", "normalized"):
            raise ConfigError("selection.dedup", f"expected null|exact|normalized, got {dedup!r}")
        seen: set[str] = set()
        for i in np.flatnonzero(kept):  # original order: the first occurrence stays
            key = queries[i] if dedup == "exact" else normalize_query(queries[i])
            if key in seen:
                kept[i] = False
                removed += 1
            seen.add(key)
    return Selection(kept, rank, k, removed)
