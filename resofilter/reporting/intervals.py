"""Paired bootstrap intervals over seeds and test problems.

An accuracy in the table is a mean over two random factors: the training seed (which
subset order, which initial noise) and the test problem (which of many possible problems
the test set happened to hold). :func:`two_way_bootstrap` resamples both — seeds with
replacement and, independently, problems with replacement — so an interval reflects the
seed-to-seed spread and the finite test set together. A difference between two rows is
paired: both rows' runs of the same seed, on the same problems, give one value per
(seed, problem), and that matrix is resampled as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z_80_POWER = 0.8416  # Φ⁻¹(0.80)
Z_95 = 1.9600  # Φ⁻¹(0.975)


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    se: float  # the bootstrap standard deviation of the mean
    n_seeds: int
    n_problems: int

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def detectable(self) -> float:
        """The smallest true difference this design detects at 80 % power (two-sided 5 %): (1.96 + 0.84) × se."""
        return (Z_95 + Z_80_POWER) * self.se


def resampled_means(values: np.ndarray, seed_idx: np.ndarray, problem_idx: np.ndarray) -> np.ndarray:
    """The mean of ``values[seed_idx[b]][:, problem_idx[b]]`` for every resample b, without forming it.

    ``values``: (S, P); ``seed_idx``: (B, S); ``problem_idx``: (B, P). A resample's mean is
    ``c_sᵀ · values · c_p / (S·P)`` with c the counts of each seed / problem in the resample.
    """
    n_b, n_s = seed_idx.shape
    n_p = problem_idx.shape[1]
    seed_counts = np.zeros((n_b, values.shape[0]))
    np.add.at(seed_counts, (np.arange(n_b)[:, None], seed_idx), 1.0)
    problem_counts = np.zeros((n_b, values.shape[1]))
    np.add.at(problem_counts, (np.arange(n_b)[:, None], problem_idx), 1.0)
    return np.einsum("bp,bp->b", seed_counts @ values, problem_counts) / (n_s * n_p)


def two_way_bootstrap(values: np.ndarray, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                      chunk: int = 1000) -> Interval:
    """Percentile interval of the mean of ``values`` (seeds × problems), resampling both factors.

    Draw order (part of the contract, so a literal loop can replay it): per chunk of up to
    ``chunk`` resamples, ``rng.integers(0, S, (b, S))`` then ``rng.integers(0, P, (b, P))``
    from ``numpy.random.default_rng(seed)``.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"values must be a non-empty (seeds, problems) matrix, got shape {values.shape}")
    n_s, n_p = values.shape
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        means.append(resampled_means(values, rng.integers(0, n_s, (b, n_s)), rng.integers(0, n_p, (b, n_p))))
    boot = np.concatenate(means)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(float(values.mean()), float(lo), float(hi), float(boot.std(ddof=1)), n_s, n_p)


def paired_matrix(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> np.ndarray | None:
    """(seed, problem) differences a − b over the seeds and problem ids both have; None if they share none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    problems = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not problems:
        return None
    return np.array([[a[s][p] - b[s][p] for p in problems] for s in seeds], dtype=float)


def row_matrix(a: dict[int, dict[str, float]]) -> np.ndarray:
    """(seed, problem) correctness over the problems every seed has."""
    seeds = sorted(a)
    problems = sorted(set.intersection(*(set(a[s]) for s in seeds)))
    return np.array([[a[s][p] for p in problems] for s in seeds], dtype=float)
