"""Intervals of accuracies and paired differences over builds, seeds and test problems.

An accuracy in the table is a mean over random factors: the training seed (which subset
order, which initial noise), the test problem (which of many possible problems the test set
happened to hold) and, for the embedded models, the base model's **build** (its init and
base-training seed: another build is another base model, and every fine-tuned accuracy
follows it).

The table's intervals are :func:`t_interval`'s: the units (runs) are averaged within their build,
builds (or, for one build, the runs themselves) and problems are crossed random factors, the variance
of the mean comes from the two-way mean squares — each factor counted once — and the interval is the
generalized confidence interval of that mean, which keeps its coverage with few builds or seeds.

The bootstraps — :func:`two_way_bootstrap` (seeds and problems) and :func:`nested_bootstrap`
(builds, then seeds within each drawn build, then problems) — were the table's intervals before. With
few builds they fall short of 95 % on levels (the percentile interval of five resampled builds) and
count within-build variance twice on differences (``experiments/interval_coverage.py`` measures it).

A difference between two rows is paired: both rows' runs of the same (build, seed), on the
same problems, give one value per (unit, problem), and that matrix is what an interval is taken of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, special, stats


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    se: float  # the standard error of the mean (bootstrap: the resampled means' standard deviation)
    n_seeds: int  # units below the build: (build, seed) runs
    n_problems: int
    n_builds: int = 1  # > 1: builds were a factor of the interval
    df: float = math.inf  # degrees of freedom of a t interval (inf: a bootstrap's percentile interval)

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def detectable(self) -> float:
        """The smallest true difference this design detects at 80 % power (two-sided 5 %):
        (t₀.₉₇₅ + t₀.₈₀) × se on the interval's degrees of freedom ((1.96 + 0.84) × se when they are infinite)."""
        return detectable(self.se, self.df)


def detectable(se: float, df: float = math.inf, level: float = 0.95, power: float = 0.80) -> float:
    """(q_{1−α/2} + q_{power}) × se, q the t quantile on ``df`` degrees of freedom (normal when infinite): the
    true difference a two-sided test at 1 − ``level`` detects with probability ``power``."""
    dist = stats.norm if math.isinf(df) else stats.t(df)
    return float((dist.ppf(0.5 + level / 2) + dist.ppf(power)) * se)


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


def two_way_mean_squares(y: np.ndarray) -> tuple[float, float, float]:
    """Mean squares of a (G, P) two-way layout without replication: rows (G − 1 df), columns (P − 1 df) and
    residual ((G − 1)(P − 1) df)."""
    n_g, n_p = y.shape
    m, m_g, m_p = y.mean(), y.mean(axis=1), y.mean(axis=0)
    ms_g = n_p * ((m_g - m) ** 2).sum() / (n_g - 1)
    ms_p = n_g * ((m_p - m) ** 2).sum() / (n_p - 1)
    ms_e = ((y - m_g[:, None] - m_p[None, :] + m) ** 2).sum() / ((n_g - 1) * (n_p - 1))
    return float(ms_g), float(ms_p), float(ms_e)


def t_interval(values: np.ndarray, groups: np.ndarray | None = None, level: float = 0.95, n_draws: int = 20_000,
               seed: int = 0) -> Interval:
    """The mean of ``values`` (units × problems) and its interval, every factor's variance counted once.

    The top factor is the build when the units (runs) span several builds (``groups[u]``: unit u's build),
    else the run itself (its seed). Units are averaged within their build, giving ``Y`` (G × P), whose
    factors — build and problem — are crossed random effects. The variance of the grand mean is
    ``(E[MS_build] + E[MS_problem] − E[MS_residual]) / (G·P)`` (two-way mean squares of ``Y``): within-build
    spread (seeds) enters once, through the build means, and the residual once — where a bootstrap
    resampling builds, then seeds, then problems counts them two or three times.

    The interval is the generalized confidence interval of that mean (Weerahandi's generalized pivotal
    quantity): ``m − Z·√V`` with each mean square replaced by its pivot ``MS·df/χ²_df`` (the problem part
    truncated at 0), ``n_draws`` Monte Carlo draws from ``numpy.random.default_rng(seed)`` in the order Z,
    χ²_build, χ²_problem, χ²_residual. With few builds it keeps the coverage that a normal or percentile
    interval loses, where Satterthwaite's t (the plug-in) falls to ~92 % (``experiments/interval_coverage.py``
    measures all three; ``tests/test_intervals.py`` checks the coverage by simulation). ``se`` is the
    point estimate of √V; ``df`` the degrees of freedom of the t quantile the interval's half-width
    equals (∞ when it is at most the normal one), so :attr:`Interval.detectable` uses the same spread.
    One build with one run: problems are the only factor (t on P − 1 df); one problem: builds (G − 1).

    The estimate is the mean of the build means (the mean of the units when builds are balanced).
    """
    values = _checked(values)
    groups = np.zeros(values.shape[0], dtype=int) if groups is None else np.asarray(groups)
    if groups.shape != (values.shape[0],):
        raise ValueError(f"groups must give each of the {values.shape[0]} units a build, got {groups}")
    labels, inverse = np.unique(groups, return_inverse=True)
    n_builds = len(labels)
    if n_builds == 1 and values.shape[0] > 1:
        labels, inverse = np.arange(values.shape[0]), np.arange(values.shape[0])  # one build: runs are the factor
    n_g, n_p = len(labels), values.shape[1]
    y = np.stack([values[inverse == g].mean(axis=0) for g in range(n_g)])  # (G, P)
    m = float(y.mean())
    q = 0.5 + level / 2
    if n_g == 1 or n_p == 1:
        n, dev = (n_p, y[0] - m) if n_g == 1 else (n_g, y[:, 0] - m)
        if n < 2:
            return Interval(m, math.nan, math.nan, math.nan, values.shape[0], n_p, n_builds, math.nan)
        se = math.sqrt((dev ** 2).sum() / (n - 1) / n)
        half, df = float(stats.t.ppf(q, n - 1)) * se, float(n - 1)
    else:
        ms_g, ms_p, ms_e = two_way_mean_squares(y)
        df_g, df_p, df_e = n_g - 1, n_p - 1, (n_g - 1) * (n_p - 1)
        se = math.sqrt((ms_g + max(ms_p - ms_e, 0.0)) / (n_g * n_p))
        z, chi_g, chi_p, chi_e = _pivot_draws(df_g, df_p, df_e, n_draws, seed)
        v = (ms_g * df_g / chi_g + np.maximum(ms_p * df_p / chi_p - ms_e * df_e / chi_e, 0.0)) / (n_g * n_p)
        half = float(np.quantile(z * np.sqrt(v), level))
        df = _t_df(half / se, q) if se > 0 else math.inf
    return Interval(m, m - half, m + half, se, values.shape[0], n_p, n_builds, df)


@lru_cache(maxsize=64)
def _pivot_draws(df_g: int, df_p: int, df_e: int, n_draws: int, seed: int) -> tuple[np.ndarray, ...]:
    """|Z|, χ²_build, χ²_problem, χ²_residual: the draws of :func:`t_interval`'s pivot (the same for every
    matrix of one shape, so kept)."""
    rng = np.random.default_rng(seed)
    draws = (np.abs(rng.standard_normal(n_draws)), rng.chisquare(df_g, n_draws), rng.chisquare(df_p, n_draws),
             rng.chisquare(df_e, n_draws))
    for d in draws:
        d.flags.writeable = False
    return draws


def _t_df(ratio: float, q: float) -> float:
    """The degrees of freedom whose t quantile ``q`` equals ``ratio`` (∞ when ``ratio`` ≤ the normal one)."""
    if ratio <= special.ndtri(q):
        return math.inf
    if ratio >= special.stdtrit(1e-3, q):
        return 1e-3
    return float(optimize.brentq(lambda d: special.stdtrit(d, q) - ratio, 1e-3, 1e7))


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
