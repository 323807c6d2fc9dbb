"""The select stage: features + records → kept subset, selection table, diagnostics, plots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from resofilter._io import file_hash, write_json_atomic, write_jsonl_atomic, write_parquet_atomic
from resofilter.data.records import Record, get_field
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.selection.diagnostics import auprc, auroc, drop_report, plot_histogram, plot_roc, roc_curve
from resofilter.selection.scorers import (
    BASELINE_COLUMNS,
    ColumnScorer,
    RandomScorer,
    ResoFilterScorer,
    Scorer,
    badness,
    build_scorer,
    weight_columns,
)
from resofilter.selection.select import select

log = logging.getLogger(__name__)

LAYER_SETS = {"last3": [-3, -2, -1], "first3": [0, 1, 2], "all": "all", "last": [-1]}


def align(features: pd.DataFrame, records: list[Record]) -> tuple[pd.DataFrame, list[Record], int]:
    """Records in features order; records the scorer skipped (prompt overflow) are counted, not kept."""
    by_id = {r.sample_id: r for r in records}
    unknown = [s for s in features["sample_id"] if s not in by_id]
    if unknown:
        raise ResoFilterError(f"features hold {len(unknown)} sample_ids absent from the data (e.g. {unknown[:3]}): "
                              "were they scored on another data file or config?")
    scored = set(features["sample_id"])
    ordered = [r for r in records if r.sample_id in scored]
    features = features.set_index("sample_id").loc[[r.sample_id for r in ordered]].reset_index()
    return features, ordered, len(records) - len(ordered)


def labels_of(records: list[Record], field: str) -> np.ndarray | None:
    try:
        return np.array([bool(get_field(r.raw, field)) for r in records])
    except KeyError:
        return None


def panel(features: pd.DataFrame, n_layers: int, modules: list[str], seed: int) -> dict[str, Scorer]:
    """Every scorer the diagnostics compare: statistics × layer sets, and the baselines."""
    out: dict[str, Scorer] = {}
    stats = sorted({s for *_, s in weight_columns(features)})
    for stat in stats:
        for set_name, idx in LAYER_SETS.items():
            try:
                s = ResoFilterScorer(modules, idx, stat, n_layers)
                s.scores(features)
            except (ConfigError, IndexError):
                continue
            out[f"{stat}/{set_name}"] = s
    for name, col in BASELINE_COLUMNS.items():
        if col in features.columns:
            out[name] = ColumnScorer(name, col)
    out["random"] = RandomScorer(seed)
    return out


def run_selection(cfg: DictConfig, features_dir: str | Path, records: list[Record],
                  out_dir: str | Path) -> dict[str, Any]:
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    fpath = features_dir / "features.parquet"
    if not fpath.exists():
        raise ResoFilterError(f"{fpath} not found (features_dir must be a `resofilter score` output dir)")
    features, recs, n_unscored = align(pd.read_parquet(fpath), records)
    out_dir.mkdir(parents=True, exist_ok=True)
    sel_cfg = cfg.selection
    n_layers = cfg.model.num_hidden_layers
    scorer = build_scorer(OmegaConf.to_container(cfg.scorer, resolve=True),
                          OmegaConf.to_container(cfg.layers, resolve=True), cfg.statistic.name, n_layers, cfg.seed)
    bad = badness(scorer, features)
    raw_scores = np.asarray(scorer.scores(features), dtype=np.float64)
    sel = select(bad, sel_cfg.keep_ratio, sel_cfg.direction, [r.query for r in recs], sel_cfg.get("dedup"))

    diag = None
    label_field = cfg.data.get("label_field")
    want = sel_cfg.get("diagnostics", "auto")
    if want is True or want == "true":
        if not label_field:
            raise ConfigError("data.label_field", "selection.diagnostics=true needs a noise label field")
    y = labels_of(recs, label_field) if label_field and want not in (False, "false") else None
    if y is None and (want is True or want == "true"):
        raise ConfigError("data.label_field", f"records have no field {label_field!r} (needed by diagnostics)")
    if y is not None:
        kinds = None
        if cfg.data.get("kind_field"):
            try:
                kinds = [str(get_field(r.raw, cfg.data.kind_field)) for r in recs]
            except KeyError:
                kinds = None
        scorers = panel(features, n_layers, list(cfg.layers.modules), cfg.seed)
        table = {}
        curves = {}
        for name, s in scorers.items():
            b = badness(s, features)
            table[name] = {"auroc": auroc(b, y), "auprc": auprc(b, y)}
            fp, tp = roc_curve(b, y)
            curves[name] = (fp, tp, table[name]["auroc"])
        diag = {"selected_scorer": {"auroc": auroc(bad, y), "auprc": auprc(bad, y), **drop_report(sel.kept, y, kinds)},
                "noise_rate": float(y.mean()), "scorers": table}
        keep_main = {k: v for k, v in curves.items() if "/" not in k or k.split("/")[1] == "last3"}
        plot_roc(out_dir / "roc.png", keep_main)
        plot_histogram(out_dir / "score_hist.png", bad, sel.kept, y,
                       f"{scorer.name} ({cfg.statistic.name}) keep {sel_cfg.keep_ratio:g}")
    else:
        plot_histogram(out_dir / "score_hist.png", bad, sel.kept, None, f"{scorer.name} keep {sel_cfg.keep_ratio:g}")

    kept_records = [r for r, k in zip(recs, sel.kept, strict=True) if k]
    table = pd.DataFrame({"sample_id": features["sample_id"], "score": raw_scores, "badness": bad,
                          "rank": sel.rank, "kept": sel.kept})
    write_jsonl_atomic(out_dir / "subset.jsonl", (r.raw for r in kept_records))
    write_parquet_atomic(out_dir / "selection.parquet", table)
    manifest = {
        "scorer": OmegaConf.to_container(cfg.scorer, resolve=True),
        "layers": OmegaConf.to_container(cfg.layers, resolve=True), "statistic": cfg.statistic.name,
        "selection": OmegaConf.to_container(sel_cfg, resolve=True),
        "features": str(fpath), "features_hash": file_hash(fpath),
        "n_in": len(records), "n_unscored": n_unscored, "n_ranked": len(recs),
        "n_keep_before_dedup": sel.n_keep_before_dedup, "dedup_removed": sel.dedup_removed,
        "n_out": sel.n_kept,
    }
    if diag is not None:
        write_json_atomic(out_dir / "diagnostics.json", diag)
        manifest["diagnostics"] = diag["selected_scorer"]
    write_json_atomic(out_dir / "manifest.json", manifest)
    log.info("kept %d of %d (keep_ratio %g, %s, dedup removed %d) → %s", sel.n_kept, len(recs),
             sel_cfg.keep_ratio, sel_cfg.direction, sel.dedup_removed, out_dir / "subset.jsonl")
    if diag is not None:
        log.info("noise AUROC of %s: %.3f; dropped-set precision %.3f recall %.3f", scorer.name,
                 diag["selected_scorer"]["auroc"], diag["selected_scorer"]["precision"],
                 diag["selected_scorer"]["recall"])
    return manifest
