"""Coverage of an interval method, measured on simulated designs whose truth is known.

A design is what a sweep produces: two rows (a variant and its reference) run on G builds × S seeds and
scored on P problems, one 0/1 correctness per (build, seed, problem). Correctness is drawn from a probit
model with crossed random effects, so it is binary like the real thing and its population accuracy is
known in closed form:

    correct_r[b, s, p] = 1[ U_b + A_rb + S_rbs + Q_p + BQ_bp + E_rbsp > c_r ]

``U`` (build) and ``Q`` (problem) and ``BQ`` (build × problem) are shared by both rows, as the builds and
the test problems are; ``A`` (a row's own build effect), ``S`` (seed) and ``E`` (residual) are each row's
own. Every term is a centred normal with the standard deviation in :class:`Components`; the accuracy of
row r over the populations of builds, seeds and problems is ``Φ(−c_r / σ)``, σ the root of the summed
variances. A method covers when its interval holds that accuracy (a level) or the difference of the two
(a paired difference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from resofilter.reporting.intervals import Interval


@dataclass(frozen=True)
class Components:
    """Standard deviations of the latent terms (probit scale)."""

    build: float = 0.0  # U, shared by the rows
    row_build: float = 0.0  # A, each row's own
    seed: float = 0.0  # S
    problem: float = 1.0  # Q
    build_problem: float = 0.0  # BQ
    residual: float = 0.8  # E

    @property
    def total(self) -> float:
        return float(np.sqrt(self.build ** 2 + self.row_build ** 2 + self.seed ** 2 + self.problem ** 2
                             + self.build_problem ** 2 + self.residual ** 2))


@dataclass(frozen=True)
class Design:
    builds: int
    seeds: int
    problems: int
    components: Components
    thresholds: tuple[float, float] = (-0.7, -0.6)  # row a, row b: accuracies Φ(0.7/σ), Φ(0.6/σ)

    @property
    def truth(self) -> tuple[float, float]:
        """(accuracy of a, accuracy of a − b) over the populations."""
        acc = [float(stats.norm.cdf(-c / self.components.total)) for c in self.thresholds]
        return acc[0], acc[0] - acc[1]


def simulate(design: Design, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` draws of the design: rows a and b, each (n, builds × seeds, problems), units build-major."""
    g, s, p, c = design.builds, design.seeds, design.problems, design.components
    shared = (rng.normal(0, c.build, (n, g, 1, 1)) + rng.normal(0, c.problem, (n, 1, 1, p))
              + rng.normal(0, c.build_problem, (n, g, 1, p)))
    rows = []
    for threshold in design.thresholds:
        z = (shared + rng.normal(0, c.row_build, (n, g, 1, 1)) + rng.normal(0, c.seed, (n, g, s, 1))
             + rng.normal(0, c.residual, (n, g, s, p)))
        rows.append((z > threshold).reshape(n, g * s, p).astype(float))
    return rows[0], rows[1]


Method = Callable[[np.ndarray, np.ndarray | None], Interval]


def coverage(method: Method, design: Design, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """The share of ``n`` simulated designs whose level interval (row a) and paired-difference interval
    (a − b, by unit and problem) hold the truth, and the mean half-widths. ``method(values, groups)``
    gets (units × problems) values and each unit's build (None for one build)."""
    a, b = simulate(design, n, np.random.default_rng(seed))
    groups = np.repeat(np.arange(design.builds), design.seeds) if design.builds > 1 else None
    level_truth, diff_truth = design.truth
    hits = {"level": 0, "difference": 0}
    widths = {"level": 0.0, "difference": 0.0}
    for i in range(n):
        for name, values, truth in (("level", a[i], level_truth), ("difference", a[i] - b[i], diff_truth)):
            iv = method(values, groups)
            hits[name] += iv.lo <= truth <= iv.hi
            widths[name] += (iv.hi - iv.lo) / 2
    return {"level": hits["level"] / n, "difference": hits["difference"] / n,
            "level_half_width": widths["level"] / n, "difference_half_width": widths["difference"] / n}
