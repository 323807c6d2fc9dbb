"""Variance components of a sweep over embedded builds, seeds and test problems (issue 22).

Reads a sweep whose rows were run on several builds (``resofilter run -m experiment=builds``), and
prints, for every row's accuracy and every paired difference the table reports (a half against the
full pool and against the random half of the same keep ratio):

1. the variance components — build, seed within build, problem, build × problem, residual — as the
   standard deviation of one run (points), and each one's share of the variance of the row's mean;
2. each build's mean of the difference and its sign, and on how many builds the sign of the
   overall difference holds.

    python experiments/build_variance.py multirun/run/<time>                # eval: the runs' main one
    python experiments/build_variance.py multirun/run/<time> --eval math_synth_2000 --out /tmp/vc.md

Needs a balanced design (every row: the same builds × seeds, ≥ 2 of each; problems: those every run
of the row has).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

COMPONENTS = ("build", "seed", "problem", "build_problem", "residual")


def unit_array(by_unit: dict[tuple[int, int], dict[str, float]]) -> tuple[np.ndarray, list[int]]:
    """(builds, seeds, problems) correctness of one row (or difference), over the seeds every build has."""
    builds = sorted({b for b, _ in by_unit})
    seeds = sorted(set.intersection(*({s for b2, s in by_unit if b2 == b} for b in builds)))
    problems = sorted(set.intersection(*(set(v) for v in by_unit.values())))
    if len(builds) < 2 or len(seeds) < 2 or not problems:
        raise SystemExit(f"needs ≥ 2 builds × ≥ 2 seeds with shared problems; got builds {builds}, seeds {seeds}")
    x = np.array([[[by_unit[(b, s)][p] for p in problems] for s in seeds] for b in builds], dtype=float)
    return x, builds


def rows_and_differences(root: Path, eval_name: str | None) -> tuple[str, list[tuple[str, dict]]]:
    """Every row's per-unit correctness and every table difference's, labelled like the table."""
    from resofilter.reporting.table import collect, context_key, unit_correctness

    runs, _ = collect(root)
    acc = [c[4:] for c in runs.columns if c.startswith("acc/")]
    name = eval_name or acc[0]
    runs = runs.assign(context=runs["_setting"].map(context_key))
    per_row: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    for key, g in runs.groupby("setting_key"):
        per_row[key] = unit_correctness(g, name)
        first = g.iloc[0]
        meta[key] = {"label": f"{first['variant']} {first['keep_ratio']:g}", "keep": first["keep_ratio"],
                     "scorer": first["scorer"], "context": first["context"]}
    out = [(m["label"], per_row[k]) for k, m in meta.items()]
    for k, m in meta.items():
        if m["keep"] >= 1:
            continue
        refs = ([r for r, n in meta.items() if n["context"] == m["context"] and n["keep"] >= 1],  # the full pool
                [r for r, n in meta.items() if n["context"] == m["context"] and r != k  # the random half
                 and n["scorer"] == "random" and n["keep"] == m["keep"]])
        for cand in refs:
            if len(cand) != 1:
                continue
            theirs = per_row[cand[0]]
            shared = set(per_row[k]) & set(theirs)
            diff = {u: {p: per_row[k][u][p] - theirs[u][p] for p in set(per_row[k][u]) & set(theirs[u])}
                    for u in shared}
            out.append((f"{m['label']} − {meta[cand[0]]['label']}", diff))
    return name, out


def report(root: Path, eval_name: str | None) -> str:
    from scipy import stats

    from resofilter.reporting.intervals import t_interval, variance_components

    name, items = rows_and_differences(root, eval_name)
    head = ["", "mean", *(f"σ {c.replace('_', '×')}" for c in COMPONENTS), "SE of the mean",
            *(f"{c.replace('_', '×')} share" for c in COMPONENTS)]
    lines = [f"Eval set {name}. σ (points): each component's standard deviation at its own level — build and "
             "seed: of a run's accuracy; problem, build×problem and residual: of one problem's correctness. "
             "Shares: of the variance of the row's mean in this design (builds × seeds × problems).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    signs = ["", "| " + " | ".join(["", "overall", "builds with its sign", "sign test p (two-sided)",
                                     "per build (points)", "95 % CI (builds, problems)"]) + " |",
             "|---|---|---|---|---|---|"]
    for label, units in items:
        x, builds = unit_array(units)
        vc = variance_components(x)
        parts = vc.of_mean()
        total = sum(parts.values())
        sds = [100 * np.sqrt(getattr(vc, c)) for c in COMPONENTS]
        shares = [parts[c] / total if total else float("nan") for c in COMPONENTS]
        lines.append(f"| {label} | {100 * x.mean():+.1f} | " + " | ".join(f"{v:.1f}" for v in sds)
                     + f" | {100 * np.sqrt(total):.2f} | " + " | ".join(f"{v:.0%}" for v in shares) + " |")
        if "−" in label:
            per_build = 100 * x.mean(axis=(1, 2))
            overall = np.sign(x.mean())
            same = int((np.sign(per_build) == overall).sum())
            nonzero = int((per_build != 0).sum())
            # H0: a build's difference is as likely positive as negative; ties (0) carry no sign
            p_sign = stats.binomtest(same, nonzero, 0.5).pvalue if nonzero else float("nan")
            iv = t_interval(x.reshape(-1, x.shape[2]), np.repeat(np.arange(x.shape[0]), x.shape[1]))
            signs.append(f"| {label} | {100 * x.mean():+.1f} | {same}/{len(builds)} | {p_sign:.3g} | "
                         + ", ".join(f"b{b}: {v:+.1f}" for b, v in zip(builds, per_build, strict=True))
                         + f" | [{100 * iv.lo:+.1f}, {100 * iv.hi:+.1f}] |")
    return "\n".join(lines + signs) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="a sweep directory (its runs' results.json and predictions)")
    ap.add_argument("--eval", default=None, help="eval set name (default: the first the runs report)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    md = report(args.root, args.eval)
    sys.stdout.write(md)
    if args.out:
        from resofilter._io import write_text_atomic

        write_text_atomic(args.out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
