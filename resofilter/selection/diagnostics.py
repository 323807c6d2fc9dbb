"""How well a score flags labeled noise: AUROC, AUPRC, precision/recall of the dropped set."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


def auroc_interval(badness: np.ndarray, is_noise: np.ndarray, n_resamples: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of :func:`auroc` under a stratified bootstrap: the noisy and the clean samples
    are each resampled with replacement (so every resample has both, in the pool's proportions).

    A resample's AUROC is computed from counts: with the samples grouped by distinct badness, it is
    Σ_pos w (clean weight strictly below + ½ clean weight tied) / (n_pos · n_neg) — the Mann–Whitney
    statistic of the resampled multiset. Draw order: ``rng.integers(0, n_pos, (B, n_pos))`` then
    ``rng.integers(0, n_neg, (B, n_neg))`` from ``numpy.random.default_rng(seed)``.
    """
    y = np.asarray(is_noise, dtype=bool)
    b = np.asarray(badness, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    values, group = np.unique(b, return_inverse=True)
    n_g = len(values)
    rng = np.random.default_rng(seed)
    offsets = (np.arange(n_resamples) * n_g)[:, None]

    def weights(members: np.ndarray, n: int) -> np.ndarray:  # (B, G): how often each badness value is drawn
        drawn = group[members][rng.integers(0, n, (n_resamples, n))]
        return np.bincount((drawn + offsets).ravel(), minlength=n_resamples * n_g).reshape(n_resamples, n_g)

    pos = weights(np.flatnonzero(y), n_pos).astype(float)
    neg = weights(np.flatnonzero(~y), n_neg).astype(float)
    below = np.cumsum(neg, axis=1) - neg
    aucs = (pos * (below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(aucs, [alpha, 1 - alpha])
    return float(lo), float(hi)


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


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's ρ (Pearson correlation of the average ranks); None when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def confounds(badness: dict[str, np.ndarray], covariates: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """For every scorer, Spearman's ρ of its badness with each covariate (response length, loss…).

    A score that mostly tracks length or loss shows it here: |ρ| near 1 means ranking by it is
    nearly ranking by the covariate.
    """
    return {name: {cov: spearman(b, v) for cov, v in covariates.items()} for name, b in badness.items()}


def group_retention(kept: np.ndarray, groups: dict[str, Sequence[Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """For every metadata field, each value's sample count and the fraction of them kept."""
    kept = np.asarray(kept, dtype=bool)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for field, values in groups.items():
        arr = np.asarray([str(v) for v in values])
        out[field] = {v: {"n": int((arr == v).sum()), "kept": float(kept[arr == v].mean())}
                      for v in sorted(set(arr.tolist()))}
    return out


def _by_kind(badness: np.ndarray, is_noise: np.ndarray, kinds: Sequence[str]
             ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(kind, its samples' and the clean samples' badness, which of them are that kind) per noise kind."""
    y = np.asarray(is_noise, dtype=bool)
    k = np.asarray(kinds)
    b = np.asarray(badness)
    for kind in sorted(set(k[y].tolist())):
        among = (k == kind) | ~y
        yield str(kind), b[among], (k == kind)[among]


def auroc_by_kind(badness: np.ndarray, is_noise: np.ndarray, kinds: Sequence[str]) -> dict[str, float]:
    """AUROC of each noise kind against the clean samples alone (other kinds left out)."""
    return {kind: auroc(b, y) for kind, b, y in _by_kind(badness, is_noise, kinds)}


def auroc_by_kind_interval(badness: np.ndarray, is_noise: np.ndarray, kinds: Sequence[str], n_resamples: int = 2000,
                           seed: int = 0) -> dict[str, tuple[float, float]]:
    """:func:`auroc_interval` of each noise kind against the clean samples alone, as :func:`auroc_by_kind`."""
    return {kind: auroc_interval(b, y, n_resamples, seed) for kind, b, y in _by_kind(badness, is_noise, kinds)}


def plot_confounds(path: Path, table: dict[str, dict[str, float | None]]) -> None:
    """Heatmap of Spearman's ρ, scorers × covariates (diverging, −1…1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    covs = list(next(iter(table.values()))) if table else []
    m = np.array([[np.nan if table[n][c] is None else table[n][c] for c in covs] for n in names], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(covs) + 3, 0.32 * len(names) + 1.2))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(covs)), covs)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(covs)):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:+.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="Spearman ρ with the score's badness")
    ax.set_title("What each score ranks by", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histogram(path: Path, badness: np.ndarray, kept: np.ndarray, is_noise: np.ndarray | None,
                   title: str) -> None:
    """The oriented score's histogram (clean/noisy stacked with labels) and the cut.

    The x-range is the 0.5–99.5 % quantiles: a long tail would squeeze the data into a few bins,
    so values beyond are counted in the edge bins (the axis label says how many). Plain tick
    labels, no offset notation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    badness = np.asarray(badness, dtype=float)
    lo, hi = np.quantile(badness, [0.005, 0.995])
    if not hi > lo:
        lo, hi = badness.min(), badness.max() + (1.0 if badness.max() == badness.min() else 0.0)
    clipped = np.clip(badness, lo, hi)
    beyond = int(((badness < lo) | (badness > hi)).sum())
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(lo, hi, 61)
    if is_noise is not None:
        y = np.asarray(is_noise, dtype=bool)
        ax.hist([clipped[~y], clipped[y]], bins=bins, stacked=True, label=["clean", "noisy"],
                color=["tab:blue", "tab:red"])
    else:
        ax.hist(clipped, bins=bins, color="tab:blue", label="samples")
    if (~kept).any() and kept.any():
        cut = badness[kept].max() if badness[kept].max() < badness[~kept].min() else badness[kept].min()
        ax.axvline(float(np.clip(cut, lo, hi)), color="k", ls="--",
                   label=f"cut: {int(kept.sum())} kept left, {int((~kept).sum())} dropped right")
    fmt = ScalarFormatter(useOffset=False, useMathText=True)
    fmt.set_powerlimits((-3, 4))
    ax.xaxis.set_major_formatter(fmt)
    ax.set_xlabel("score, oriented: higher = dropped first"
                  + (f" ({beyond} beyond the range, in the edge bins)" if beyond else ""))
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 6))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours, then line styles tell apart the rest
    styles = ["-", "--", "-.", ":"]
    for i, (name, (fp, tp, a)) in enumerate(sorted(curves.items(), key=lambda kv: -kv[1][2])):
        ax.plot(fp, tp, color=colours[i % len(colours)], ls=styles[(i // len(colours)) % len(styles)],
                label=f"{name} (AUROC {a:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="chance")
    ax.set_xlabel("false positive rate (clean flagged)")
    ax.set_ylabel("true positive rate (noise flagged)")
    ax.set_title("Which score flags the labeled noise")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the curves, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
