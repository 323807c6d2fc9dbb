"""How well a score flags labeled noise: AUROC, AUPRC, precision/recall of the dropped set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata


def auroc(badness: np.ndarray, is_noise: np.ndarray) -> float:
    """P(a noisy sample is scored worse than a clean one), ties counting ½ (Mann–Whitney U)."""
    y = np.asarray(is_noise, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(badness)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(badness: np.ndarray, is_noise: np.ndarray) -> float:
    """Average precision of ranking by badness (ties: worst position first is not favoured)."""
    y = np.asarray(is_noise, dtype=bool)
    if y.sum() == 0:
        return float("nan")
    order = np.lexsort((np.arange(len(y)), -np.asarray(badness)))
    hits = y[order]
    precision = np.cumsum(hits) / np.arange(1, len(y) + 1)
    return float(precision[hits].mean())


def roc_curve(badness: np.ndarray, is_noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(is_noise, dtype=bool)
    order = np.argsort(-np.asarray(badness), kind="stable")
    tp = np.concatenate([[0], np.cumsum(y[order])]) / max(1, y.sum())
    fp = np.concatenate([[0], np.cumsum(~y[order])]) / max(1, (~y).sum())
    return fp, tp


def drop_report(kept: np.ndarray, is_noise: np.ndarray, kinds: Sequence[str] | None) -> dict[str, Any]:
    """Precision/recall of the dropped set as a noise detector, and the share of each kind dropped."""
    y = np.asarray(is_noise, dtype=bool)
    dropped = ~np.asarray(kept, dtype=bool)
    tp = int((dropped & y).sum())
    out: dict[str, Any] = {
        "n_dropped": int(dropped.sum()), "n_noisy": int(y.sum()),
        "precision": tp / dropped.sum() if dropped.sum() else float("nan"),
        "recall": tp / y.sum() if y.sum() else float("nan"),
        "noise_rate_kept": float(y[~dropped].mean()) if (~dropped).any() else float("nan"),
    }
    if kinds is not None:
        kinds_arr = np.asarray(kinds)
        out["dropped_share_by_kind"] = {
            str(k): float(dropped[kinds_arr == k].mean()) for k in sorted(set(kinds_arr.tolist()))}
    return out


def plot_histogram(path: Path, badness: np.ndarray, kept: np.ndarray, is_noise: np.ndarray | None,
                   title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.histogram_bin_edges(badness, bins=60)
    if is_noise is not None:
        y = np.asarray(is_noise, dtype=bool)
        ax.hist([badness[~y], badness[y]], bins=bins, stacked=True, label=["clean", "noisy"],
                color=["tab:blue", "tab:red"])
        ax.legend()
    else:
        ax.hist(badness, bins=bins, color="tab:blue")
    if (~kept).any() and kept.any():
        ax.axvline(badness[kept].max() if badness[kept].max() < badness[~kept].min() else badness[kept].min(),
                   color="k", ls="--", label="cut")
    ax.set_xlabel("score (oriented: higher = dropped first)")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, (fp, tp, a) in sorted(curves.items(), key=lambda kv: -kv[1][2]):
        ax.plot(fp, tp, label=f"{name} (AUROC {a:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (noise flagged)")
    ax.set_title("Which score flags the labeled noise")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
