"""Collect ``results.json`` files of a (multi)run directory into the paper's table.

Rows: one per distinct setting — runs are grouped by their resolved config minus the seed
(``results.json`` → ``setting``), so two settings are never merged; a row is labelled by its
variant, keep ratio and whatever else differs between rows (group choices such as
``layers=last3_mlp`` where Hydra recorded them). Columns:
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

from resofilter._io import stable_hash, write_text_atomic
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
        if r.get("setting") is not None:
            row["setting_key"] = stable_hash(r["setting"])
            row["_setting"], row["_choices"] = r["setting"], r.get("choices") or {}
        else:  # results.json from before settings were recorded: the fields it has, layers in full
            row["layers"] = json.dumps(r["layers"], sort_keys=True)
            row["setting_key"] = stable_hash([row[k] for k in GROUP_KEYS])
            row["_setting"], row["_choices"] = {k: row[k] for k in GROUP_KEYS}, {}
        for name, acc in r["eval"].items():
            row[f"acc/{name}"] = acc
        rows.append(row)
    if not rows and not incomplete:
        raise ResoFilterError(f"no run directories (results.json or .hydra/) under {root}")
    return pd.DataFrame(rows), incomplete


def setting_labels(runs: pd.DataFrame) -> pd.Series:
    """What distinguishes each run's setting beyond variant and keep ratio, as ``key=value`` text.

    Keys that vary between settings but are fixed within each (variant, keep ratio) pair are
    what the variant means and are not repeated; a config group whose option differs is shown
    by its option name (``layers=last3_mlp``) rather than its keys.
    """
    settings = runs.drop_duplicates("setting_key")
    keys = sorted({k for s in settings["_setting"] for k in s})
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings["_setting"]}) > 1]
    pair = settings["variant"].astype(str) + "|" + settings["keep_ratio"].astype(str)
    shown = []
    for k in varying:
        per_pair = {}
        for p, s in zip(pair, settings["_setting"], strict=True):
            per_pair.setdefault(p, set()).add(json.dumps(s.get(k), sort_keys=True))
        if any(len(v) > 1 for v in per_pair.values()):
            shown.append(k)
    labels = {}
    for key, s, choices in zip(settings["setting_key"], settings["_setting"], settings["_choices"], strict=True):
        parts, groups = [], set()
        for k in shown:
            group = k.split(".")[0]
            if group in choices:
                if group not in groups:
                    groups.add(group)
                    parts.append(f"{group}={choices[group]}")
            else:
                v = s.get(k)
                parts.append(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v)}")
        labels[key] = ", ".join(parts)
    return runs["setting_key"].map(labels)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.assign(setting=setting_labels(runs))
    varying = ["variant", "keep_ratio", "setting", "setting_key"]
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
    out = out.reset_index().sort_values(["keep_ratio", "variant", "setting"], ascending=[False, True, True])
    out = out.drop(columns="setting_key")
    return out if out["setting"].astype(bool).any() else out.drop(columns="setting")


def to_markdown(summary: pd.DataFrame, incomplete: list[str]) -> str:
    acc_cols = sorted({c.rsplit(" ", 1)[0] for c in summary.columns if c.startswith("acc/")})
    keys = [c for c in summary.columns if c in ("variant", "keep_ratio", "setting")]
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
    write_text_atomic(out / "runs.csv", runs.drop(columns=["_setting", "_choices"]).to_csv(index=False))
    plot(summary, out / "table.png")
    log.info("table of %d runs (%d rows) → %s\n%s", len(runs), len(summary), out / "table.md", md)
    return {"n_runs": len(runs), "incomplete": incomplete, "rows": summary.to_dict("records"), "markdown": md}


