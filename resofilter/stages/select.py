"""The select stage: features + records → kept subset, selection table, diagnostics, plots."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resofilter._io import (
    file_hash,
    read_json,
    stable_hash,
    write_json_atomic,
    write_jsonl_atomic,
    write_parquet_atomic,
)
from resofilter.data.records import Record, get_field, record_hashes
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.features.sketch import load_sketches
from resofilter.reporting.html import selection_report
from resofilter.selection.diagnostics import (
    auprc,
    auroc,
    auroc_by_kind,
    confounds,
    drop_report,
    group_retention,
    plot_confounds,
    plot_histogram,
    plot_roc,
    roc_curve,
)
from resofilter.selection.scorers import (
    BASELINE_COLUMNS,
    ColumnScorer,
    ConsensusScorer,
    RandomScorer,
    ResoFilterScorer,
    ScoredPool,
    Scorer,
    TargetScorer,
    badness,
    build_scorer,
    has_layer_columns,
    layer_columns,
    oriented,
    weight_columns,
)
from resofilter.selection.select import Selection, select
from resofilter.stages.config_check import check_depth

log = logging.getLogger(__name__)

def features_manifest(features_dir: Path) -> dict[str, Any]:
    """The features' manifest: what they know about the model and records they came from."""
    mpath = features_dir / "manifest.json"
    if not (features_dir / "features.parquet").exists() or not mpath.exists():
        raise ResoFilterError(f"{features_dir} holds no finished features (features.parquet + manifest.json, "
                              "the manifest written last): features_dir must be a finished `resofilter score` dir")
    manifest = read_json(mpath)
    if "structure" not in manifest or "records" not in manifest:
        raise ResoFilterError(f"{mpath} does not record the model structure and records it covers "
                              "(it is not a `resofilter score` manifest): score again")
    return manifest


def verify_records(features: pd.DataFrame, records: list[Record], manifest: dict[str, Any], where: Path,
                   allow_unscored: bool = False) -> None:
    """The features were computed on exactly these records (by content), or a named error.

    Records tokenization skipped (prompt overflow, listed in the manifest) are allowed to be
    unscored; any other unscored record is an error unless ``allow_unscored``.
    """
    hashes = record_hashes(records)
    if stable_hash(sorted(hashes.items())) == manifest["records"]["hash"]:
        return  # the very records that were scored
    ids = features["sample_id"].tolist()
    unknown = [s for s in ids if s not in hashes]
    if unknown:
        raise ResoFilterError(
            f"the features in {where} hold {len(unknown)} of their {len(ids)} sample_ids absent from the data "
            f"({len(records)} records; e.g. {unknown[:3]}): they were scored on another data file or config")
    changed = [s for s, h in zip(ids, features["record_hash"], strict=True) if hashes[s] != h]
    if changed:
        raise ResoFilterError(
            f"{len(changed)} of the {len(ids)} records scored in {where} differ in content from the data's records "
            f"with the same sample_id (e.g. {changed[:3]}): the features belong to other data "
            "(data.path, data.id_field)")
    scored, skipped = set(ids), set(manifest["records"]["skipped_ids"])
    unscored = [r.sample_id for r in records if r.sample_id not in scored and r.sample_id not in skipped]
    if unscored:
        msg = (f"the data has {len(records)} records; the features in {where} cover {len(ids)} "
               f"(+{len(skipped)} skipped by tokenization): {len(unscored)} were never scored (e.g. {unscored[:3]})")
        if not allow_unscored:
            raise ResoFilterError(f"{msg}. Score this data, or set selection.allow_unscored=true to select among "
                                  "the scored records only (the unscored ones are then dropped)")
        log.warning("%s; selection.allow_unscored=true: they are dropped", msg)


@dataclass(frozen=True)
class SelectSpec:
    """What the select stage is asked, built from the config once (:func:`~resofilter.stages.specs.select_spec`).

    Everything the features know (depth, records) comes from their manifest instead.
    """

    scorer: dict[str, Any]
    layers: dict[str, Any]
    statistic: str
    keep_ratio: float
    panel_layer_sets: dict[str, Any]  # diagnostics: the layer sets (of the selected modules) compared, by name
    direction: str = "drop_high"
    dedup: str | None = None
    diagnostics: Any = "auto"  # auto | true | false
    allow_unscored: bool = False
    label_field: str | None = None
    kind_field: str | None = None
    group_fields: tuple[str, ...] = ()
    seed: int = 0
    declared_depth: int | None = None  # model.num_hidden_layers, if the config states it
    report_k: int = 10  # report.html: the k highest- and k lowest-scored samples
    report_excerpt_chars: int = 300

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def diagnostics_on(self) -> bool:
        return self.diagnostics not in (False, "false")


def layer_count(manifest: dict[str, Any], declared: int | None, where: Path) -> int:
    """The scored model's depth, from the features' manifest; a config that restates it must agree."""
    depth = int(manifest["structure"]["num_hidden_layers"])
    check_depth(declared, depth, f"the features in {where} were scored on a {depth}-layer model")
    return depth


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


def kinds_of(records: list[Record], field: str | None) -> list[str] | None:
    """Each record's noise kind (``data.kind_field``); ``None`` without the field."""
    if not field:
        return None
    try:
        return [str(get_field(r.raw, field)) for r in records]
    except KeyError:
        return None


def labels_of(records: list[Record], field: str) -> np.ndarray | None:
    try:
        return np.array([bool(get_field(r.raw, field)) for r in records])
    except KeyError:
        return None


def panel(pool: ScoredPool, modules: list[str], layer_sets: dict[str, Any], seed: int) -> dict[str, Scorer]:
    """Every scorer the diagnostics compare: statistics × layer sets the features hold, and the baselines."""
    out: dict[str, Scorer] = {}
    features, n_layers = pool.features, pool.n_layers
    stats = sorted({s for *_, s in weight_columns(features)})
    for stat in stats:
        for set_name, idx in layer_sets.items():
            if has_layer_columns(features, modules, idx, stat, n_layers):
                out[f"{stat}/{set_name}"] = ResoFilterScorer(modules, idx, stat, n_layers)
    for name, col in BASELINE_COLUMNS.items():
        if col in features.columns:
            out[name] = ColumnScorer(name, col)
    if pool.sketches is not None:
        out["consensus"] = ConsensusScorer()
    out["random"] = RandomScorer(seed)
    return out


def diagnose(spec: SelectSpec, pool: ScoredPool, recs: list[Record], chosen: Scorer,
             bad: np.ndarray, kept: np.ndarray, y: np.ndarray | None, out_dir: Path) -> dict[str, Any]:
    """What every scorer of the panel ranks by and whom the selection keeps; with noise labels, how
    well each flags noise overall and per kind. Writes ``confounds.png`` (and ``roc.png`` with labels).

    - ``confounds``: Spearman ρ of each scorer's badness with response tokens, response
      characters and the loss (``selected_confounds``: the selection's own scorer);
    - ``groups``: per value of every ``data.group_fields`` field, its count and kept fraction;
    - labels only: ``scorers`` (AUROC, AUPRC and, with ``data.kind_field``, AUROC per noise
      kind against the clean samples), ``selected_scorer`` (precision/recall of the dropped set).
    """
    selected, features = chosen.name, pool.features
    compared = panel(pool, list(spec.layers["modules"]), spec.panel_layer_sets, spec.seed)
    bads = {name: badness(s, pool) for name, s in compared.items()}
    if isinstance(chosen, TargetScorer):  # its reference exists for this selection only (computed once, above)
        bads["target"] = bad
    covariates = {"response_tokens": features["n_tokens"].to_numpy(dtype=float),
                  "response_chars": np.array([len(r.response) for r in recs], dtype=float),
                  "loss": features["loss"].to_numpy(dtype=float)}
    groups: dict[str, list[Any]] = {field: [] for field in spec.group_fields}
    for field, values in groups.items():
        for r in recs:
            try:
                values.append(get_field(r.raw, field))
            except KeyError:
                raise ConfigError("data.group_fields", f"record {r.sample_id!r} has no field {field!r}") from None
    diag: dict[str, Any] = {
        "selected_confounds": confounds({selected: bad}, covariates)[selected],
        "confounds": confounds(bads, covariates), "groups": group_retention(kept, groups)}
    plot_confounds(out_dir / "confounds.png", {f"selected: {selected}": diag["selected_confounds"],
                                               **diag["confounds"]})
    if y is None:
        return diag
    kinds = kinds_of(recs, spec.kind_field)
    table, curves = {}, {}
    for name, b in bads.items():
        table[name] = {"auroc": auroc(b, y), "auprc": auprc(b, y)}
        if kinds is not None:
            table[name]["auroc_by_kind"] = auroc_by_kind(b, y, kinds)
        fp, tp = roc_curve(b, y)
        curves[name] = (fp, tp, table[name]["auroc"])
    diag["selected_scorer"] = {"auroc": auroc(bad, y), "auprc": auprc(bad, y), **drop_report(kept, y, kinds),
                               **({"auroc_by_kind": auroc_by_kind(bad, y, kinds)} if kinds is not None else {})}
    diag["noise_rate"] = float(y.mean())
    diag["scorers"] = table
    keep_main = {k: v for k, v in curves.items() if "/" not in k or k.split("/")[1] == "last3"}
    plot_roc(out_dir / "roc.png", keep_main)
    return diag


@dataclass(frozen=True)
class RankedPool:
    """The scored pool a selection ranks: the features aligned with the records, and the scorer's scores."""

    features_dir: Path
    manifest: dict[str, Any]  # the features' manifest
    features: pd.DataFrame  # aligned with ``records``
    records: list[Record]  # the ranked ones (scored)
    n_unscored: int
    pool: ScoredPool
    scorer: Scorer
    scores: np.ndarray  # the scorer's raw scores
    bad: np.ndarray  # oriented: larger = worse

    @property
    def n_in(self) -> int:
        """Records given to the selection: the ranked ones and those never scored."""
        return len(self.records) + self.n_unscored


def rank_pool(spec: SelectSpec, features_dir: Path, records: list[Record]) -> RankedPool:
    """Read and check the features, align them with ``records`` and score them once with ``spec.scorer``."""
    fpath = features_dir / "features.parquet"
    fman = features_manifest(features_dir)
    n_layers = layer_count(fman, spec.declared_depth, features_dir)  # from the artifact, never from the config
    features = pd.read_parquet(fpath)
    verify_records(features, records, fman, features_dir, spec.allow_unscored)
    features, recs, n_unscored = align(features, records)
    # what the artifact knows (depth, sketches) travels with the features to every scorer
    pool = ScoredPool(features, n_layers, load_sketches(features_dir) if "sketch" in fman else None)
    scorer = build_scorer(spec.scorer, spec.layers, spec.statistic, n_layers, spec.seed)
    raw_scores = np.asarray(scorer.scores(pool), dtype=np.float64)  # once per selection
    bad = oriented(raw_scores, scorer.bad_end)
    if not np.isfinite(bad).all():
        nonfinite = features["sample_id"][~np.isfinite(bad)].tolist()
        raise ResoFilterError(f"{scorer.name} gives {len(nonfinite)} non-finite scores (e.g. {nonfinite[:3]}) "
                              f"from {fpath}: the features are broken; nothing selected")
    return RankedPool(features_dir, fman, features, recs, n_unscored, pool, scorer, raw_scores, bad)


def noise_labels(spec: SelectSpec, records: list[Record]) -> np.ndarray | None:
    """The records' noise labels when diagnostics are on (``true``: required, ``auto``: if present)."""
    label_field, want = spec.label_field, spec.diagnostics
    required = want is True or want == "true"
    if required and not label_field:
        raise ConfigError("data.label_field", "selection.diagnostics=true needs a noise label field")
    y = labels_of(records, label_field) if label_field and spec.diagnostics_on else None
    if y is None and required:
        raise ConfigError("data.label_field", f"records have no field {label_field!r} (needed by diagnostics)")
    return y


def report_selection(spec: SelectSpec, ranked: RankedPool, sel: Selection, diag: dict[str, Any] | None,
                     y: np.ndarray | None, out_dir: Path) -> None:
    """The histogram and the HTML report: the k dropped first and the k kept first, with the counts."""
    recs, bad, raw_scores, features = ranked.records, ranked.bad, ranked.scores, ranked.features
    what = f"{ranked.scorer.name} ({spec.statistic})" if isinstance(ranked.scorer, ResoFilterScorer) \
        else ranked.scorer.name
    plot_histogram(out_dir / "score_hist.png", bad, sel.kept, y, f"{what}: keep {spec.keep_ratio:g}")
    kinds = kinds_of(recs, spec.kind_field) if y is not None else None
    order = np.argsort(-bad, kind="stable")  # only the k dropped first and k kept first are shown
    shown = sorted(set(order[:spec.report_k].tolist()) | set(order[-spec.report_k:].tolist()))
    selection_report(out_dir, scorer=ranked.scorer.name, diag=diag, k=spec.report_k,
                     excerpt_chars=spec.report_excerpt_chars,
                     summary={"scorer": what, "keep ratio": spec.keep_ratio,
                              "direction": spec.direction, "records in": ranked.n_in, "ranked": len(recs),
                              "never scored (dropped)": ranked.n_unscored, "kept before dedup": sel.n_keep_before_dedup,
                              "removed by dedup": sel.dedup_removed, "kept": sel.n_kept,
                              "features": str(ranked.features_dir)},
                     n_ranked=len(recs), score_median=float(np.nanmedian(raw_scores)), samples=[
                         {"sample_id": recs[i].sample_id, "query": recs[i].query, "response": recs[i].response,
                          "score": float(raw_scores[i]), "badness": float(bad[i]),
                          "loss": float(features["loss"].iat[i]), "n_tokens": int(features["n_tokens"].iat[i]),
                          "label": None if y is None else bool(y[i]), "kind": None if kinds is None else kinds[i],
                          "kept": bool(sel.kept[i])}
                         for i in shown])


def selection_manifest(spec: SelectSpec, ranked: RankedPool, sel: Selection,
                       diag: dict[str, Any] | None) -> dict[str, Any]:
    """What the selection was asked and did, and what it was made from (the features by content)."""
    fpath, fman, n_layers = ranked.features_dir / "features.parquet", ranked.manifest, ranked.pool.n_layers
    manifest = {
        "spec": spec.as_dict(), "scorer": spec.scorer, "layers": spec.layers, "statistic": spec.statistic,
        "selection": {"keep_ratio": spec.keep_ratio, "direction": spec.direction, "dedup": spec.dedup},
        "features": str(fpath), "features_hash": file_hash(fpath), "features_model": fman["model"],
        "data": (fman.get("config") or {}).get("data"),  # how subset.jsonl's records are read (finetune takes it)
        "num_hidden_layers": n_layers,
        "columns": (layer_columns(ranked.features, list(spec.layers["modules"]), spec.layers["indices"],
                                  spec.statistic, n_layers)
                    if isinstance(ranked.scorer, ResoFilterScorer) else None),
        "n_in": ranked.n_in, "n_unscored": ranked.n_unscored, "n_ranked": len(ranked.records),
        "n_keep_before_dedup": sel.n_keep_before_dedup, "dedup_removed": sel.dedup_removed,
        "n_out": sel.n_kept,
    }
    if diag is not None:
        manifest["confounds"] = diag["selected_confounds"]
        if "selected_scorer" in diag:
            manifest["diagnostics"] = diag["selected_scorer"]
    return manifest


def run_selection(spec: SelectSpec, features_dir: str | Path, records: list[Record],
                  out_dir: str | Path) -> dict[str, Any]:
    """Rank ``records`` by ``spec.scorer`` on the features in ``features_dir``; keep ``spec.keep_ratio``.

    Writes ``subset.jsonl``, ``selection.parquet``, diagnostics and plots, then ``manifest.json``.
    """
    features_dir, out_dir = Path(features_dir), Path(out_dir)
    ranked = rank_pool(spec, features_dir, records)
    recs = ranked.records
    out_dir.mkdir(parents=True, exist_ok=True)
    sel = select(ranked.bad, spec.keep_ratio, spec.direction, [r.query for r in recs], spec.dedup)
    y = noise_labels(spec, recs)
    diag = None if not spec.diagnostics_on else diagnose(
        spec, ranked.pool, recs, ranked.scorer, ranked.bad, sel.kept, y, out_dir)
    write_jsonl_atomic(out_dir / "subset.jsonl", (r.raw for r, k in zip(recs, sel.kept, strict=True) if k))
    write_parquet_atomic(out_dir / "selection.parquet", pd.DataFrame({
        "sample_id": ranked.features["sample_id"], "score": ranked.scores, "badness": ranked.bad,
        "rank": sel.rank, "kept": sel.kept}))
    report_selection(spec, ranked, sel, diag, y, out_dir)
    if diag is not None:
        write_json_atomic(out_dir / "diagnostics.json", diag)
    manifest = selection_manifest(spec, ranked, sel, diag)
    write_json_atomic(out_dir / "manifest.json", manifest)  # the last write: the stage is complete
    log.info("kept %d of %d (keep_ratio %g, %s, dedup removed %d) → %s", sel.n_kept, len(recs),
             spec.keep_ratio, spec.direction, sel.dedup_removed, out_dir / "subset.jsonl")
    if diag is not None and "selected_scorer" in diag:
        d = diag["selected_scorer"]
        log.info("noise AUROC of %s: %.3f; dropped-set precision %.3f recall %.3f", ranked.scorer.name,
                 d["auroc"], d["precision"], d["recall"])
    return manifest
