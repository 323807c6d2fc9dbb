"""Keep-ratio selection, as the authors do it, with documented rounding and ties.

1. Rank by badness (higher = worse), ties broken by original position (earlier = better,
   so results never depend on sort stability).
2. Keep ``n_keep = max(1, floor(keep_ratio × N + 0.5))`` samples: with ``drop_high`` (the
   paper) the ``n_keep`` least bad, with ``drop_low`` the ``n_keep`` most bad.
3. Optionally deduplicate the kept set by query (``exact`` or ``normalized``; the first in
   original order stays), as the authors do after cutting.
4. Restore the original order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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
    check_keep_ratio(keep_ratio)
    return max(1, min(n, math.floor(keep_ratio * n + 0.5)))


def select(badness: np.ndarray, keep_ratio: float, direction: str = "drop_high",
           queries: Sequence[str] | None = None, dedup: str | None = None) -> Selection:
    n = len(badness)
    if n == 0:
        raise ConfigError("data", "nothing to select from")
    if direction not in ("drop_high", "drop_low"):
        raise ConfigError("selection.direction", f"expected drop_high|drop_low, got {direction!r}")
    pos = np.arange(n)
    order = np.lexsort((pos, badness))  # ascending badness, ties by position
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
