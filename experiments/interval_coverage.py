"""How often does each interval method hold the truth? Simulated designs with known components.

Designs (``resofilter.reporting.coverage``: binary correctness from a probit model with crossed builds,
seeds and problems, its population accuracy known in closed form):

- ``five builds``: the embedded tier's five-build sweep — 5 builds × 2 seeds × 400 problems, the build most
  of a level's variance, seeds most of a difference's (components near the measured ones in
  experiments/README.md, "Five builds", on the probit scale);
- ``three builds``: the same with 3 builds;
- ``one model``: the pretrained model's headline sweep — one model × 3 seeds × 500 problems, a seed σ of
  ~3 points of accuracy;
- ``one model, steady seeds``: the same with a seed σ of ~0.5 points (where a method that fears the few
  seeds is most conservative).

Methods: the generalized confidence interval the table uses (``t_interval``), Satterthwaite's plug-in t on
the same mean squares, and the bootstrap the table used before (builds, seeds within builds and problems,
or seeds and problems for one build). Prints a markdown table of coverage (nominal 95 %) and mean half-width.

    python experiments/interval_coverage.py [--designs 2000] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
from scipy import stats

from resofilter.reporting.coverage import Components, Design, coverage
from resofilter.reporting.intervals import Interval, bootstrap, t_interval, two_way_mean_squares

DESIGNS = {
    "five builds": Design(5, 2, 400, Components(build=0.27, row_build=0.05, seed=0.09, problem=0.9,
                                                build_problem=0.8, residual=0.6), (1.16, 1.14)),
    "three builds": Design(3, 2, 400, Components(build=0.27, row_build=0.05, seed=0.09, problem=0.9,
                                                 build_problem=0.8, residual=0.6), (1.16, 1.14)),
    "one model": Design(1, 3, 500, Components(seed=0.12, problem=1.0, residual=0.5), (-0.76, -0.70)),
    "one model, steady seeds": Design(1, 3, 500, Components(seed=0.02, problem=1.0, residual=0.5),
                                      (-0.76, -0.70)),
}


def satterthwaite(values: np.ndarray, groups: np.ndarray | None) -> Interval:
    """Plug-in t: the same mean and variance as ``t_interval``, Satterthwaite's degrees of freedom."""
    y = values if groups is None else np.stack([values[groups == k].mean(0) for k in np.unique(groups)])
    n_g, n_p = y.shape
    ms_g, ms_p, ms_e = two_way_mean_squares(y)
    terms = [(ms_g, n_g - 1)] + ([(ms_p, n_p - 1), (-ms_e, (n_g - 1) * (n_p - 1))] if ms_p > ms_e else [])
    total = sum(t for t, _ in terms)
    df = total ** 2 / sum(t ** 2 / d for t, d in terms) if total > 0 else n_g - 1
    m, se = float(y.mean()), math.sqrt(total / (n_g * n_p))
    half = float(stats.t.ppf(0.975, df)) * se
    return Interval(m, m - half, m + half, se, len(values), n_p, n_g if groups is not None else 1, df)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--designs", type=int, default=2000, help="simulated designs per row")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per interval")
    p.add_argument("--bootstrap-designs", type=int, default=500, help="designs for the (slow) bootstrap rows")
    args = p.parse_args(argv)
    methods = {
        "generalized CI (table)": (lambda v, g: t_interval(v, g), args.designs),
        "Satterthwaite t": (satterthwaite, args.designs),
        "bootstrap (before)": (lambda v, g: bootstrap(v, np.zeros(len(v)) if g is None else g, args.resamples),
                               args.bootstrap_designs),
    }
    lines = ["| design | method | designs | level coverage | difference coverage | level ± | difference ± |",
             "|---|---|---|---|---|---|---|"]
    for name, design in DESIGNS.items():
        for label, (method, n) in methods.items():
            c = coverage(method, design, n)
            se = [math.sqrt(x * (1 - x) / n) for x in (c["level"], c["difference"])]
            lines.append(f"| {name} ({design.builds}×{design.seeds}×{design.problems}) | {label} | {n} | "
                         f"{100 * c['level']:.1f} ± {100 * se[0]:.1f} | {100 * c['difference']:.1f} ± "
                         f"{100 * se[1]:.1f} | {100 * c['level_half_width']:.2f} | "
                         f"{100 * c['difference_half_width']:.2f} |")
            sys.stdout.write(lines[-1] + "\n")
    sys.stdout.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
