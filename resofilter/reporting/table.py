"""Collect ``results.json`` files of a (multi)run directory into the paper's table.

Rows: method × keep ratio (× direction/layers/statistic/step when those vary); columns:
accuracy mean ± std over seeds per eval set, seeds, samples kept, noise left and the
score's noise AUROC (labeled data only), time. A run
directory without ``results.json`` (killed, failed) is listed as incomplete, never dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from resofilter._io import write_text_atomic
from resofilter.errors import ResoFilterError

log = logging.getLogger(__name__)

GROUP_KEYS = ["variant", "keep_ratio", "direction", "layers", "statistic", "step"]


def collect(root: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run; and the run dirs that have no results.json."""
    root = Path(root)
    if not root.is_dir():
        raise ResoFilterError(f"{root} is not a directory")
    rows, incomplete = [], []
    run_dirs = sorted({p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob("results.json")})
    for d in run_dirs:
        f = d / "results.json"
        if not f.exists():
            incomplete.append(str(d.relative_to(root)))
            continue
        r = json.loads(f.read_text())
        row: dict[str, Any] = {
            "run": str(d.relative_to(root)), "variant": r["variant"], "keep_ratio": r["keep_ratio"],
            "direction": r["direction"], "layers": str(r["layers"]["indices"]), "statistic": r["statistic"],
            "step": r["step"], "seed": r["seed"], "n_kept": r["stages"]["select"]["n_out"],
            "noise_rate_kept": r["stages"]["select"].get("noise_rate_kept"),
            "noise_auroc": r["stages"]["select"].get("noise_auroc"),
            "score_cached": r["stages"]["score"]["cached"], "time_s": r["total_time_s"],
        }
        for name, acc in r["eval"].items():
            row[f"acc/{name}"] = acc
        rows.append(row)
    if not rows and not incomplete:
        raise ResoFilterError(f"no run directories (results.json or .hydra/) under {root}")
    return pd.DataFrame(rows), incomplete


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    varying = [k for k in GROUP_KEYS if k in ("variant", "keep_ratio") or runs[k].nunique() > 1]
    acc_cols = [c for c in runs.columns if c.startswith("acc/")]
    # the same setting and seed run twice (e.g. in two sweeps) is one seed, not two samples
    numeric = ["n_kept", "noise_rate_kept", "noise_auroc", "time_s", *acc_cols]
    runs = runs.groupby([*varying, "seed"], dropna=False)[numeric].mean().reset_index()
    agg: dict[str, Any] = {"seed": "nunique", "n_kept": "mean", "noise_rate_kept": "mean", "noise_auroc": "mean",
                           "time_s": "mean"}
    out = runs.groupby(varying, dropna=False).agg(agg).rename(columns={"seed": "seeds"})
    for c in acc_cols:
        g = runs.groupby(varying, dropna=False)[c]
        out[f"{c} mean"] = g.mean()
        out[f"{c} std"] = g.std(ddof=1).fillna(0.0)
    return out.reset_index().sort_values(["keep_ratio", "variant"], ascending=[False, True])


def to_markdown(summary: pd.DataFrame, incomplete: list[str]) -> str:
    acc_cols = sorted({c.rsplit(" ", 1)[0] for c in summary.columns if c.startswith("acc/")})
    keys = [c for c in summary.columns if c in GROUP_KEYS]
    header = keys + [f"{c[4:]} (%)" for c in acc_cols] + ["seeds", "kept", "noise kept (%)", "noise AUROC",
                                                          "time/run (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in summary.iterrows():
        cells = [f"{r[k]:g}" if k == "keep_ratio" else str(r[k]) for k in keys]
        cells += [f"{100 * r[f'{c} mean']:.1f} ± {100 * r[f'{c} std']:.1f}" for c in acc_cols]
        nr, auc = r["noise_rate_kept"], r["noise_auroc"]
        if r["keep_ratio"] >= 1:
            auc = float("nan")  # nothing is dropped: the (placeholder) scorer's AUROC says nothing
        cells += [str(int(r["seeds"])), f"{r['n_kept']:.0f}", "–" if pd.isna(nr) else f"{100 * nr:.1f}",
                  "–" if pd.isna(auc) else f"{auc:.3f}", f"{r['time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if incomplete:
        lines += ["", f"Incomplete runs (no results.json): {', '.join(incomplete)}"]
    return "\n".join(lines) + "\n"


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_cols = sorted({c.rsplit(" ", 1)[0] for c in summary.columns if c.startswith("acc/")})
    fig, axes = plt.subplots(1, len(acc_cols), figsize=(6 * len(acc_cols), 4), squeeze=False)
    for ax, c in zip(axes[0], acc_cols, strict=True):
        full = summary[summary["keep_ratio"] == 1.0]
        for name, g in summary[summary["keep_ratio"] < 1.0].groupby("variant"):
            g = g.sort_values("keep_ratio")
            ax.errorbar(g["keep_ratio"], 100 * g[f"{c} mean"], yerr=100 * g[f"{c} std"], marker="o",
                        capsize=3, label=name)
        if len(full):
            ax.axhline(100 * full[f"{c} mean"].iloc[0], color="k", ls="--", label="full data")
        ax.set_xlabel("keep ratio")
        ax.set_ylabel(f"{c[4:]} accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(root: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    runs, incomplete = collect(root)
    out = Path(out) if out else Path(root)
    if incomplete:
        log.warning("%d run(s) without results.json: %s", len(incomplete), incomplete)
    if runs.empty:
        raise ResoFilterError(f"no finished runs under {root} (incomplete: {incomplete})")
    summary = summarize(runs)
    md = to_markdown(summary, incomplete)
    write_text_atomic(out / "table.md", md)
    write_text_atomic(out / "table.csv", summary.to_csv(index=False))
    write_text_atomic(out / "runs.csv", runs.to_csv(index=False))
    plot(summary, out / "table.png")
    log.info("table of %d runs (%d rows) → %s\n%s", len(runs), len(summary), out / "table.md", md)
    return {"n_runs": len(runs), "incomplete": incomplete, "rows": summary.to_dict("records"), "markdown": md}


