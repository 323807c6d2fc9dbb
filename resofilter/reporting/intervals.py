"""Paired bootstrap intervals over builds, seeds and test problems.

An accuracy in the table is a mean over random factors: the training seed (which subset
order, which initial noise), the test problem (which of many possible problems the test set
happened to hold) and, for the embedded models, the base model's **build** (its init and
base-training seed: another build is another base model, and every fine-tuned accuracy
follows it). :func:`two_way_bootstrap` resamples seeds with replacement and, independently,
problems with replacement, so an interval reflects the seed-to-seed spread and the finite
test set together — of one build. When the runs span several builds, :func:`nested_bootstrap`
resamples builds, then seeds within each drawn build, then problems: the interval then
covers what another build would give, not only another seed of the same base model.

A difference between two rows is paired: both rows' runs of the same (build, seed), on the
same problems, give one value per (unit, problem), and that matrix is resampled as a whole.
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
    n_seeds: int  # units resampled below the build: (build, seed) runs
    n_problems: int
    n_builds: int = 1  # > 1: builds were resampled too (nested_bootstrap)

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


def _interval(values: np.ndarray, boot: np.ndarray, level: float, n_units: int, n_builds: int) -> Interval:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(float(values.mean()), float(lo), float(hi), float(boot.std(ddof=1)), n_units, values.shape[1],
                    n_builds)


def _checked(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"values must be a non-empty (units, problems) matrix, got shape {values.shape}")
    return values


def two_way_bootstrap(values: np.ndarray, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                      chunk: int = 1000) -> Interval:
    """Percentile interval of the mean of ``values`` (seeds × problems), resampling both factors.

    Draw order (part of the contract, so a literal loop can replay it): per chunk of up to
    ``chunk`` resamples, ``rng.integers(0, S, (b, S))`` then ``rng.integers(0, P, (b, P))``
    from ``numpy.random.default_rng(seed)``.
    """
    values = _checked(values)
    n_s, n_p = values.shape
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        means.append(resampled_means(values, rng.integers(0, n_s, (b, n_s)), rng.integers(0, n_p, (b, n_p))))
    return _interval(values, np.concatenate(means), level, n_s, 1)


def nested_draws(rng: np.random.Generator, groups: np.ndarray, b: int) -> np.ndarray:
    """(b, U) counts of each unit in b resamples: builds drawn with replacement, then within each drawn
    build as many of its units as it has, with replacement. ``groups[u]``: unit u's build, 0..G−1.

    Draw order (the contract a literal loop replays): ``rng.integers(0, G, (b, G))`` for the builds,
    then ``rng.random((b, G, K))`` (K: the largest build's unit count) for the units: slot k of a drawn
    build g with n_g units is used when k < n_g and picks its unit ``floor(r × n_g)``, in unit order.
    """
    n_g = int(groups.max()) + 1
    members = [np.flatnonzero(groups == g) for g in range(n_g)]
    sizes = np.array([len(m) for m in members])
    k_max = int(sizes.max())
    table = np.full((n_g, k_max), -1)
    for g, m in enumerate(members):
        table[g, :len(m)] = m
    drawn = rng.integers(0, n_g, (b, n_g))
    r = rng.random((b, n_g, k_max))
    n = sizes[drawn][..., None]  # (b, G, 1)
    used = np.arange(k_max)[None, None, :] < n
    pick = np.minimum((r * n).astype(int), n - 1)  # floor(r × n_g), r < 1
    units = table[drawn[..., None], pick]
    counts = np.zeros((b, len(groups)))
    rows = np.broadcast_to(np.arange(b)[:, None, None], units.shape)
    np.add.at(counts, (rows[used], units[used]), 1.0)
    return counts


def nested_bootstrap(values: np.ndarray, groups: np.ndarray, n_resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95, chunk: int = 1000) -> Interval:
    """Percentile interval of the mean of ``values`` (units × problems) whose units (runs: one build and
    seed each) are nested in builds (``groups``, one build index 0..G−1 per unit): builds, then units within
    the drawn builds (:func:`nested_draws`), then problems — ``rng.integers(0, P, (b, P))`` after them, per
    chunk — all with replacement. A resample's mean weighs every drawn unit alike, as the point estimate does.
    """
    values = _checked(values)
    groups = np.asarray(groups)
    if groups.shape != (values.shape[0],) or groups.min() < 0 or set(np.unique(groups)) != set(range(groups.max() + 1)):
        raise ValueError(f"groups must give each of the {values.shape[0]} units a build index 0..G−1, got {groups}")
    n_p = values.shape[1]
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        unit_counts = nested_draws(rng, groups, b)
        problem_counts = np.zeros((b, n_p))
        np.add.at(problem_counts, (np.arange(b)[:, None], rng.integers(0, n_p, (b, n_p))), 1.0)
        means.append(np.einsum("bp,bp->b", unit_counts @ values, problem_counts) / (unit_counts.sum(1) * n_p))
    return _interval(values, np.concatenate(means), level, values.shape[0], int(groups.max()) + 1)


def bootstrap(values: np.ndarray, builds: np.ndarray, n_resamples: int = 10_000, seed: int = 0) -> Interval:
    """:func:`nested_bootstrap` when the units span several builds, else :func:`two_way_bootstrap`."""
    builds = np.asarray(builds)
    if len(np.unique(builds)) > 1:
        return nested_bootstrap(values, np.unique(builds, return_inverse=True)[1], n_resamples, seed)
    return two_way_bootstrap(values, n_resamples, seed)


Unit = tuple[int, int]  # (build, seed); build −1: a model from a path (no build)


def paired_matrix(a: dict[Unit, dict[str, float]], b: dict[Unit, dict[str, float]]) -> np.ndarray | None:
    """(unit, problem) differences a − b over the units and problem ids both have, units in sorted order;
    None if they share none."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    problems = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not problems:
        return None
    return np.array([[a[s][p] - b[s][p] for p in problems] for s in seeds], dtype=float)


def row_matrix(a: dict[Unit, dict[str, float]]) -> np.ndarray:
    """(unit, problem) correctness over the problems every unit has, units in sorted order."""
    seeds = sorted(a)
    problems = sorted(set.intersection(*(set(a[s]) for s in seeds)))
    return np.array([[a[s][p] for p in problems] for s in seeds], dtype=float)


@dataclass(frozen=True)
class VarianceComponents:
    """Method-of-moments variance components of a balanced (builds × seeds × problems) array.

    ``x[b, s, p] = μ + build_b + seed_bs + problem_p + (build × problem)_bp + residual_bsp``: seeds are
    nested in builds, problems crossed with both. Each σ² is the ANOVA estimate (mean squares solved for
    their expectations), truncated at 0.
    """

    build: float
    seed: float  # within a build
    problem: float
    build_problem: float
    residual: float
    shape: tuple[int, int, int]

    def of_mean(self, builds: int | None = None, seeds: int | None = None, problems: int | None = None
                ) -> dict[str, float]:
        """Each component's part of the variance of the grand mean over ``builds × seeds × problems``
        (default: the measured design)."""
        b, s, p = (builds or self.shape[0], seeds or self.shape[1], problems or self.shape[2])
        return {"build": self.build / b, "seed": self.seed / (b * s), "problem": self.problem / p,
                "build_problem": self.build_problem / (b * p), "residual": self.residual / (b * s * p)}


def variance_components(x: np.ndarray) -> VarianceComponents:
    """:class:`VarianceComponents` of ``x`` (builds, seeds, problems); needs ≥ 2 of each."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 3 or min(x.shape) < 2:
        raise ValueError(f"x must be (builds, seeds, problems) with ≥ 2 of each, got shape {x.shape}")
    n_b, n_s, n_p = x.shape
    m = x.mean()
    m_b = x.mean(axis=(1, 2))  # build means
    m_bs = x.mean(axis=2)  # run means
    m_p = x.mean(axis=(0, 1))  # problem means
    m_bp = x.mean(axis=1)  # build × problem means
    ms_b = n_s * n_p * ((m_b - m) ** 2).sum() / (n_b - 1)
    ms_s = n_p * ((m_bs - m_b[:, None]) ** 2).sum() / (n_b * (n_s - 1))
    ms_p = n_b * n_s * ((m_p - m) ** 2).sum() / (n_p - 1)
    ms_bp = n_s * ((m_bp - m_b[:, None] - m_p[None, :] + m) ** 2).sum() / ((n_b - 1) * (n_p - 1))
    resid = x - m_bs[:, :, None] - m_bp[:, None, :] + m_b[:, None, None]
    ms_e = (resid ** 2).sum() / (n_b * (n_s - 1) * (n_p - 1))
    return VarianceComponents(
        build=max(0.0, (ms_b - ms_bp - ms_s + ms_e) / (n_s * n_p)),
        seed=max(0.0, (ms_s - ms_e) / n_p),
        problem=max(0.0, (ms_p - ms_bp) / (n_b * n_s)),
        build_problem=max(0.0, (ms_bp - ms_e) / n_s),
        residual=float(ms_e), shape=(n_b, n_s, n_p))
