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

import functools
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resofilter._io import read_json, read_jsonl, stable_hash, write_text_atomic
from resofilter.environment import differences, environment_label
from resofilter.errors import ResoFilterError
from resofilter.reporting.html import table_report
from resofilter.reporting.intervals import Unit, detectable, paired_matrix, row_matrix, t_interval
from resofilter.reporting.results import RunResult, canonical_setting

log = logging.getLogger(__name__)

Roots = str | Path | Sequence[str | Path]


def _roots(roots: Roots) -> list[Path]:
    return [Path(roots)] if isinstance(roots, (str, Path)) else [Path(r) for r in roots]


def collect(roots: Roots) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished run under the directory (or directories: e.g. a headline sweep and a budget sweep
    kept apart, read as one table); and the run dirs that have no results.json. A run is named by its path
    under its directory, prefixed by the directory's name when there are several."""
    dirs = _roots(roots)
    if not dirs:
        raise ResoFilterError("no directory to read runs from")
    for root in dirs:
        if not root.is_dir():
            raise ResoFilterError(f"{root} is not a directory")
    rows, incomplete = [], []
    run_dirs = sorted({(root, p.parent) for root in dirs
                       for p in [*root.rglob(".hydra"), *root.rglob("results.json")]})
    for root, d in run_dirs:
        name = str(d.relative_to(root)) if len(dirs) == 1 else str(Path(root.name) / d.relative_to(root))
        f = d / "results.json"
        if not f.exists():
            incomplete.append(name)
            continue
        r = RunResult.read(f)
        setting = canonical_setting(r.setting)
        row: dict[str, Any] = {
            "run": name, "variant": r.variant, "keep_ratio": r.keep_ratio,
            "direction": r.direction, "layers": str(r.layers["indices"]), "statistic": r.statistic,
            "step": r.step, "seed": r.seed, "build": _build(r.build), "n_kept": r.n_kept,
            "noise_rate_kept": r.noise_rate_kept, "noise_auroc": r.noise_auroc, "rho_length": r.rho_length,
            "score_cached": r.features_cached, "time_s": r.run_time_s, "scorer": r.scorer, "budget": r.budget,
            "train_steps": (r.stages.get("finetune") or {}).get("steps"),
            "curve_key": stable_hash({k: v for k, v in setting.items() if k not in BUDGET_KEYS}),
            "protocols": json.dumps(r.eval_protocols, sort_keys=True),
            "scored_by": _model_name(r.model, r.setting, "model"),
            "trained": _model_name(r.train_model, r.setting, "train_model"),
            "trained_weights": (r.weights or {}).get("train_model"),  # its content (runs.csv): None before recorded
            "base_accuracy": (r.stages.get("base_eval") or {}).get("accuracy"),
            "_dir": str(d), "_environment": r.environment,
            "setting_key": stable_hash(setting), "_setting": setting,
            # Hydra names a group placed at another package "group@package" (model@train_model): keyed here by
            # the package, the prefix of the setting's keys it chose
            "_choices": {k.split("@", 1)[-1]: v for k, v in (r.choices or {}).items()},
        }
        for name, acc in r.eval.items():
            row[f"acc/{name}"] = acc
        rows.append(row)
    if not rows and not incomplete:
        raise ResoFilterError(f"no run directories (results.json or .hydra/) under {', '.join(map(str, dirs))}")
    return pd.DataFrame(rows), incomplete


# Setting keys that say how a subset was chosen; the rest (model, data, fine-tuning, evaluation)
# is the context a row is compared within: its `full` and `random` references share it.
_SELECTION_KEYS = ("selection.", "scorer.", "layers.", "statistic.", "step.", "score.", "variant_name",
                   "data.answer_pattern")  # the answer span is a scoring input (answer_loss), not the data


def context_key(setting: dict[str, Any]) -> str:
    """What a row is compared within: the setting minus how the subset was chosen, with the model and
    template that were *fine-tuned*. With ``train_model`` set, the scoring model is a selection choice:
    a 4-layer model's subset fine-tuned into the 8-layer model shares its ``full`` reference with the
    8-layer model scoring itself (``model=tiny_llama_8l``)."""
    ctx = {k: v for k, v in setting.items() if not k.startswith(_SELECTION_KEYS)}
    for name in ("model", "template"):
        trained = {k[len("train_"):]: v for k, v in ctx.items() if k.startswith(f"train_{name}.")}
        ctx = {k: v for k, v in ctx.items() if not k.startswith(f"train_{name}") and
               not (trained and k.startswith(f"{name}."))} | trained
    return stable_hash(ctx)


NO_BUILD = -1  # the build of a run whose models come from a path


def _build(build: int | None) -> int:
    return NO_BUILD if build is None else int(build)


def _n_builds(builds: pd.Series) -> int:
    """How many embedded builds a row's runs span (0: its models come from a path)."""
    return int(builds[builds != NO_BUILD].nunique())


def _embedded_name(arch: Any, layers: Any, hidden: Any) -> str:
    return f"embedded {arch} {layers}L d{hidden}"


def _model_name(path: str | None, setting: dict[str, Any] | None = None, prefix: str = "model") -> str | None:
    """A model directory as the table names it: an embedded build by its architecture (the build is a
    column of its own, so every build of one recipe has one name; from the run's setting when the build's
    cache is not here), others by path."""
    if path is None:
        return None
    provenance = Path(path) / "provenance.json"  # a packaged pretrained model (stages/packaged.py)
    if provenance.exists():
        p = read_json(provenance)
        return f"{Path(p['file']['path_in_package']).stem} ({p['package']['name']} {p['package']['version']})"
    if label := _packaged_label(Path(path).name):  # its cache is gone (another machine, a cleared cache)
        return label
    if "/models/base-" not in str(path):
        return str(path)
    build = Path(path) / "build.json"
    if not build.exists():  # the cache was cleared since (or is on another machine): the setting says what it was
        s = setting or {}
        if f"{prefix}.embedded.arch" not in s:  # no model of its own under this prefix: the scoring model
            prefix = "model"
        arch = s.get(f"{prefix}.embedded.arch")
        if arch is None:
            return Path(path).name
        return _embedded_name(arch, s.get(f"{prefix}.embedded.architecture.num_hidden_layers"),
                              s.get(f"{prefix}.embedded.architecture.hidden_size"))
    e = read_json(build)["embedded"]
    a = e["architecture"]
    return _embedded_name(e["arch"], a["num_hidden_layers"], a["hidden_size"])


def _packaged_label(dirname: str) -> str | None:
    """A packaged model's name from its cache directory's name alone: ``gguf-<first 16 of the file's
    SHA-256>`` is content-addressed, so the shipped model config pinning that hash names it."""
    if not dirname.startswith("gguf-"):
        return None
    import yaml

    from resofilter.configs import config_dir

    for f in sorted((config_dir() / "model").glob("*.yaml")):
        pkg = (yaml.safe_load(f.read_text()) or {}).get("package") or {}
        if str(pkg.get("sha256", "")).startswith(dirname[len("gguf-"):]):
            return f"{Path(pkg['file']).stem} ({pkg['name']} {pkg['version']})"
    return None


def correctness(run_dir: str | Path, eval_name: str, problems: str | None = None) -> dict[str, float] | None:
    """Per-problem correctness of one run on one eval set (``predictions.jsonl``), if it kept them; with
    ``problems`` (a regular expression), only the problem ids it matches from the start. Read once per
    process while its files are unchanged (a table reads each run's predictions for its accuracy and again for
    its intervals); the result is shared: do not change it."""
    d = Path(run_dir).resolve() / "eval"
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None
                  for cand in (d / eval_name, d) for p in (cand / "metrics.json", cand / "predictions.jsonl"))
    return _correctness(str(d.parent), eval_name, problems, stamp)


@functools.lru_cache(maxsize=4096)
def _correctness(run_dir: str, eval_name: str, problems: str | None, _stamp: tuple) -> dict[str, float] | None:
    d = Path(run_dir) / "eval"
    keep = re.compile(problems).match if problems else (lambda _: True)
    for cand in (d / eval_name, d):
        metrics, preds = cand / "metrics.json", cand / "predictions.jsonl"
        if metrics.exists() and preds.exists() and read_json(metrics).get("eval") == eval_name:
            return {p["sample_id"]: float(p["correct"]) for p in read_jsonl(preds) if keep(p["sample_id"])}
    return None


def restrict_problems(runs: pd.DataFrame, problems: str) -> pd.DataFrame:
    """The runs with every accuracy recomputed over the problems whose ids ``problems`` matches (from the
    start), from the runs' predictions: e.g. the 500 test problems of a 2,000-problem evaluation. A run
    without predictions for an eval set has no accuracy on it (NaN); an eval set where none match is an error."""
    runs = runs.copy()
    runs["_problems"] = problems
    for col in [c for c in runs.columns if c.startswith("acc/")]:
        for i, d in runs["_dir"].items():
            found = correctness(d, col[4:], problems)
            runs.loc[i, col] = sum(found.values()) / len(found) if found else float("nan")
        if runs[col].isna().all():
            raise ResoFilterError(f"no problem id of {col[4:]} matches {problems!r} (or no run kept predictions)")
    return runs


def unit_correctness(row_runs: pd.DataFrame, eval_name: str) -> dict[Unit, dict[str, float]]:
    """Per-problem correctness of one row's runs by (build, seed) unit; a unit run twice (e.g. in two
    sweeps) gives the mean correctness of its runs, per problem. Units without predictions are left out."""
    by_unit: dict[Unit, dict[str, float]] = {}
    problems = row_runs["_problems"].iloc[0] if "_problems" in row_runs.columns else None
    for (b, s), gs in row_runs.groupby(["build", "seed"]):
        found = [x for x in (correctness(d, eval_name, problems) for d in gs["_dir"]) if x]
        if found:
            by_unit[(int(b), int(s))] = {p: sum(x[p] for x in found) / len(found)
                                        for p in set.intersection(*map(set, found))}
    return by_unit


_OWN_COLUMNS = {"finetune.budget"}  # shown in a column of its own
# How long a run trains: rows that differ only in these are one variant at several budgets (a curve). The kind
# of budget (finetune.budget: steps or epochs) is not one of them: under epochs the full pool trains twice a
# half's steps, so its rows are a curve of their own
BUDGET_KEYS = ("finetune.max_steps", "finetune.epochs")


def setting_labels(runs: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.Series:
    """What distinguishes each run's setting beyond variant and keep ratio, as ``key=value`` text.

    Keys that vary between settings but are fixed within each (variant, keep ratio) pair are
    what the variant means and are not repeated; a config group whose option differs is shown
    by its option name (``layers=last3_mlp``) rather than its keys. Keys in ``exclude`` are left out
    (e.g. the budget, for the label of a curve drawn against it).
    """
    settings = runs.drop_duplicates("setting_key")
    keys = sorted({k for s in settings["_setting"] for k in s})
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings["_setting"]}) > 1]
    pair = settings["variant"].astype(str) + "|" + settings["keep_ratio"].astype(str)
    shown = []
    for k in varying:
        if k in _OWN_COLUMNS or k in exclude:
            continue
        per_pair = {}
        for p, s in zip(pair, settings["_setting"], strict=True):
            per_pair.setdefault(p, set()).add(json.dumps(s.get(k), sort_keys=True))
        if any(len(v) > 1 for v in per_pair.values()):
            shown.append(k)
    # a group is named by its option only where the options differ; else the key that does
    chosen = {g for g in {k.split(".")[0] for k in shown}
              if len({json.dumps(c.get(g)) for c in settings["_choices"]}) > 1}
    labels = {}
    for key, s, choices in zip(settings["setting_key"], settings["_setting"], settings["_choices"], strict=True):
        parts, groups = [], set()
        for k in shown:
            group = k.split(".")[0]
            if group in choices and group in chosen:
                if group not in groups:  # an unset optional group (train_model: the scoring model) says nothing
                    groups.add(group)
                    if choices[group] is not None:
                        parts.append(f"{group}={choices[group]}")
            elif k in s:  # a key a setting lacks (null, or a budget length not in force) says nothing
                v = s[k]
                parts.append(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v)}")
        labels[key] = ", ".join(parts)
    return runs["setting_key"].map(labels)


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    # each run's environment by the fields that differ between the runs ("" when none do): a row says which
    # it ran in, a paired difference whether its two sides ran in the same
    differ = list(differences(list(runs["_environment"]))) if "_environment" in runs.columns else []
    env = runs["_environment"].map(lambda e: environment_label(e, differ)) if differ else ""
    runs = runs.assign(setting=setting_labels(runs), context=runs["_setting"].map(context_key),
                       curve_setting=setting_labels(runs, exclude=BUDGET_KEYS), _env=env)
    varying = ["variant", "keep_ratio", "setting", "setting_key"]
    acc_cols = [c for c in runs.columns if c.startswith("acc/")]
    # the same setting and seed run twice (e.g. in two sweeps) is one seed, not two samples
    numeric = ["n_kept", "noise_rate_kept", "noise_auroc", "rho_length", "time_s", *acc_cols]
    # a row's replicates: one (build, seed) unit each; the embedded base model's build is a factor like the seed
    per_seed = runs.groupby([*varying, "build", "seed"], dropna=False)[numeric].mean().reset_index()
    agg: dict[str, Any] = {"seed": "nunique", "build": _n_builds,
                           "n_kept": "mean", "noise_rate_kept": "mean", "noise_auroc": "mean",
                           "rho_length": "mean", "time_s": "mean"}
    out = per_seed.groupby(varying, dropna=False).agg(agg).rename(columns={"seed": "seeds", "build": "builds"})
    out["units"] = per_seed.groupby(varying, dropna=False).size()
    for c in acc_cols:
        g = per_seed.groupby(varying, dropna=False)[c]
        out[f"{c} mean"] = g.mean()
        out[f"{c} std"] = g.std(ddof=1).fillna(0.0)
    out = out.reset_index()
    first = runs.groupby("setting_key")[["scorer", "budget", "context", "protocols", "scored_by", "trained",
                                         "base_accuracy", "train_steps", "curve_key", "curve_setting"]].first()
    out = out.join(first, on="setting_key")
    out["environments"] = out["setting_key"].map(runs.groupby("setting_key")["_env"].agg(
        lambda e: "; ".join(sorted(set(e) - {""}))))
    for c in acc_cols:
        _intervals(out, runs, c)
    out = out.sort_values(["budget", "keep_ratio", "variant", "train_steps", "setting"],
                          ascending=[True, False, True, True, True], na_position="first")  # budgets in step order
    out["curve"] = _curve_labels(out)
    out = out.drop(columns=["setting_key", "context"])
    if out["budget"].isna().all():
        out = out.drop(columns="budget")
    else:
        out = out[["budget", *[c for c in out.columns if c != "budget"]]]
    return out if out["setting"].astype(bool).any() else out.drop(columns="setting")


def _curve_labels(out: pd.DataFrame) -> pd.Series:
    """Each row's curve on the budget axis: its variant and keep ratio and whatever else (not the budget)
    distinguishes its setting (``curve_setting``: :func:`setting_labels` without the budget keys)."""
    def label(r: pd.Series) -> str:
        kind = [] if _steps_budget(r) else [f"budget={r['budget']}"]
        return ", ".join([f"{r['variant']} {r['keep_ratio']:g}", *kind, *filter(None, [r.get("curve_setting")])])
    return out.apply(label, axis=1) if len(out) else pd.Series(dtype=str)


def _steps_budget(r: pd.Series) -> bool:
    return pd.isna(r.get("budget")) or r.get("budget") == "steps"


def _curve_families(summary: pd.DataFrame) -> pd.Series:
    """Each row's curve family: its variant, keep ratio and setting but for the budget, whatever the kind of
    budget (a variant's compute-matched curve and its one-epoch point are one family)."""
    setting = summary.get("curve_setting", pd.Series("", index=summary.index)).fillna("")
    return pd.Series(list(zip(summary["variant"], summary["keep_ratio"], setting, strict=True)),
                     index=summary.index, dtype=object)


def _curve_colors(summary: pd.DataFrame) -> dict[str, str]:
    """One colour per curve family (:func:`_curve_families`), so a variant's compute-matched and epoch curves
    share a colour (and differ in marker); the full pool black."""
    import matplotlib.pyplot as plt

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors: dict[str, str] = {}
    families: dict[tuple, str] = {}
    summary = summary.dropna(subset=["train_steps"])
    for (_, r), fam in zip(summary.iterrows(), _curve_families(summary), strict=True):
        if r["keep_ratio"] >= 1:
            families.setdefault(fam, "k")
        else:
            families.setdefault(fam, palette[sum(c != "k" for c in families.values()) % len(palette)])
        colors[r["curve"]] = families[fam]
    return colors


def _intervals(out: pd.DataFrame, runs: pd.DataFrame, col: str) -> None:
    """Add ``{col} lo/hi`` (the row's 95 % interval, :func:`t_interval` over its runs and problems) and
    the paired differences from the row's ``full`` reference (keep ratio 1, same context) and ``random``
    reference (random scorer, same keep ratio and context): ``{col} Δfull``/``Δrandom`` with ``lo``,
    ``hi``, ``se`` and ``df``.

    Rows whose runs kept no predictions get no interval (NaN).
    """
    name = col[4:]
    per_row = {key: unit_correctness(g, name) for key, g in runs.groupby("setting_key")}
    envs = {key: {(int(b), int(s)): frozenset(u["_env"]) for (b, s), u in g.groupby(["build", "seed"])}
            for key, g in runs.groupby("setting_key")}
    for c in (f"{col} lo", f"{col} hi", f"{col} problems"):
        out[c] = float("nan")
    for ref in ("full", "random"):
        for c in ("", " lo", " hi", " se", " df"):
            out[f"{col} Δ{ref}{c}"] = float("nan")
        out[f"{col} Δ{ref} envs differ"] = False
    for i, row in out.iterrows():
        mine = per_row.get(row["setting_key"])
        if not mine:
            continue
        iv = t_interval(row_matrix(mine), np.array([b for b, _ in sorted(mine)]))
        # an accuracy lies in [0, 1] and a difference of two in [−1, 1]: a t interval of few seeds can reach
        # past them, and cutting it there loses no coverage
        out.loc[i, [f"{col} lo", f"{col} hi", f"{col} problems"]] = [max(iv.lo, 0.0), min(iv.hi, 1.0), iv.n_problems]
        same = (out["context"] == row["context"]) & (out["setting_key"] != row["setting_key"])
        refs = {"full": out[same & (out["keep_ratio"] >= 1)],
                "random": out[same & (out["scorer"] == "random") & (out["keep_ratio"] == row["keep_ratio"])]}
        for ref, cand in refs.items():
            if len(cand) != 1 or row["keep_ratio"] >= 1 and ref == "full":
                continue
            theirs = _by_my_units(mine, per_row.get(cand["setting_key"].iloc[0], {}))
            diff = paired_matrix(mine, theirs)
            if diff is None:
                continue
            shared = sorted(set(mine) & set(theirs))
            d = t_interval(diff, np.array([b for b, _ in shared]))
            out.loc[i, [f"{col} Δ{ref}{c}" for c in ("", " lo", " hi", " se", " df")]] = \
                [d.mean, max(d.lo, -1.0), min(d.hi, 1.0), d.se, d.df]
            their_envs = _by_my_units(mine, envs[cand["setting_key"].iloc[0]])
            out.loc[i, f"{col} Δ{ref} envs differ"] = any(
                envs[row["setting_key"]][u] != their_envs[u] for u in shared)


def _by_my_units(mine: dict[Unit, Any], theirs: dict[Unit, Any]) -> dict[Unit, Any]:
    """A reference's per-unit correctness keyed by this row's units. Units are (build, seed); a reference whose
    models come from a path has no build, and a row of the same context (the same fine-tuned model) can still
    have one: its *scoring* model is an embedded build (weak to strong: the tiny model scores, SmolLM2 is
    fine-tuned). The build is then part of how the subset was chosen, not of the model trained, so the two
    pair by seed."""
    if set(mine) & set(theirs) or any(b != NO_BUILD for b, _ in theirs):
        return theirs
    return {(b, s): theirs[(NO_BUILD, s)] for b, s in mine if (NO_BUILD, s) in theirs}


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def to_markdown(summary: pd.DataFrame, incomplete: list[str]) -> str:
    acc_cols = sorted({c.split(" ", 1)[0] for c in summary.columns if c.startswith("acc/")})
    keys = [c for c in ("budget", "variant", "keep_ratio", "setting") if c in summary.columns]
    # the scoring and the fine-tuned model, as columns where some row's differ from another's or each other
    models = [c for c in ("scored_by", "trained") if c in summary.columns]
    if models and ((summary[models].nunique(dropna=False) > 1).any() or (
            models == ["scored_by", "trained"] and (summary["scored_by"].fillna("") != summary["trained"].fillna(""))
            .any())):
        keys += models
    header = [{"scored_by": "scored by", "trained": "fine-tuned"}.get(k, k) for k in keys]
    for c in acc_cols:
        header += [f"{c[4:]} % [95 % CI]", "Δ full", "Δ random"]
    by_build = "builds" in summary.columns and (summary["builds"] > 1).any()
    by_env = "environments" in summary.columns and summary["environments"].astype(bool).any()
    header += [*(["builds"] if by_build else []), "seeds", *(["environment"] if by_env else []), "kept",
               "noise kept (%)", "noise AUROC", "ρ length", "time/run (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in summary.iterrows():
        cells = [f"{r[k]:g}" if k == "keep_ratio" else ("" if pd.isna(r[k]) else str(r[k])) for k in keys]
        for c in acc_cols:
            if pd.isna(r[f"{c} lo"]):
                cells.append(f"{100 * r[f'{c} mean']:.1f} ± {100 * r[f'{c} std']:.1f} (sd)")
            else:
                cells.append(f"{100 * r[f'{c} mean']:.1f} [{100 * r[f'{c} lo']:.1f}, {100 * r[f'{c} hi']:.1f}]")
            for ref in ("full", "random"):
                m = r[f"{c} Δ{ref}"]
                if pd.isna(m):
                    cells.append("–")
                    continue
                lo, hi = r[f"{c} Δ{ref} lo"], r[f"{c} Δ{ref} hi"]
                star = " \\*" if lo > 0 or hi < 0 else ""
                dagger = " †" if r.get(f"{c} Δ{ref} envs differ") else ""
                cells.append(f"{_pct(m)} [{_pct(lo)}, {_pct(hi)}]{star}{dagger}")
        nr, auc = r["noise_rate_kept"], r["noise_auroc"]
        if r["keep_ratio"] >= 1:
            auc = float("nan")  # nothing is dropped: the (placeholder) scorer's AUROC says nothing
        rho = float("nan") if r["keep_ratio"] >= 1 or pd.isna(r["rho_length"]) else r["rho_length"]
        cells += [*([str(int(r["builds"]))] if by_build else []), str(int(r["seeds"])),
                  *([r["environments"]] if by_env else []), f"{r['n_kept']:.0f}",
                  "–" if pd.isna(nr) else f"{100 * nr:.1f}", "–" if pd.isna(auc) else f"{auc:.3f}",
                  "–" if pd.isna(rho) else f"{rho:+.2f}", f"{r['time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for c in acc_cols:
        diffs = pd.concat([summary[[f"{c} Δ{ref} se", f"{c} Δ{ref} df"]].set_axis(["se", "df"], axis=1)
                           for ref in ("full", "random")]).dropna()
        if len(diffs):
            mde = 100 * float(np.median([detectable(r.se, r.df) for r in diffs.itertuples()]))
            if by_build:
                design = (f"{_units(summary, c)}; 95 % generalized confidence intervals with builds and problems as "
                          "crossed random factors "
                          "(seeds averaged within their build; rows of one build: seeds and problems), differences "
                          "paired by build, seed and problem")
            else:
                one = _one_build(summary)
                factors = ("seeds and problems as crossed random factors" if summary["seeds"].max() > 1 else
                           "the problems as the only factor (one seed: another seed's spread is not in them)")
                if summary["seeds"].max() > 1 and summary["seeds"].min() == 1:
                    factors += " (rows of one seed: the problems alone, another seed's spread not in them)"
                design = (f"{_units(summary, c)}{one}; 95 % generalized confidence "
                          f"intervals with {factors}, differences paired by seed and problem")
            notes.append(f"{c[4:]}: {design} (\\*: the interval excludes 0; coverage checked by simulation: "
                         f"experiments/interval_coverage.py); a difference of ≥ {mde:.1f} points is detectable at "
                         "80 % power (the median over the differences of (t₀.₉₇₅ + t₀.₈₀) × SE on the interval's "
                         "degrees of freedom).")
    if any(summary.get(f"{c} Δ{ref} envs differ", pd.Series(dtype=bool)).any()
           for c in acc_cols for ref in ("full", "random")):
        notes.append("†: the two sides of the difference ran (for some seed) in different environments (column "
                     "environment): float32 kernels differ between CPU kinds, so part of it may be the machine.")
    protocols = {k: v for p in summary.get("protocols", pd.Series(dtype=object)).dropna()
                 for k, v in json.loads(p).items()}
    if models and keys[-len(models):] != models and summary[models].notna().all().all():
        notes.append(f"Scored by and fine-tuned: {summary['trained'].iloc[0]}.")
    if "base_accuracy" in summary.columns and summary["base_accuracy"].notna().any():
        base = summary.dropna(subset=["base_accuracy"]).drop_duplicates(["trained", "base_accuracy"])
        notes.append("Before fine-tuning (run.evaluate_base), on " + acc_cols[0][4:] + ": " + "; ".join(
            f"{r['trained'] or 'the model'} {100 * r['base_accuracy']:.1f} %" for _, r in base.iterrows()) + ".")
    if protocols:
        notes.append("Evaluation protocols: " + "; ".join(f"{k} {v}" for k, v in sorted(protocols.items()))
                     + " (zero_shot: the training template; few_shot_cot: k exemplars, chain of thought).")
    if notes:
        lines += ["", *notes]
    if incomplete:
        lines += ["", f"Incomplete runs (no results.json): {', '.join(incomplete)}"]
    return "\n".join(lines) + "\n"


def _n(count: float, noun: str) -> str:
    return f"{int(count)} {noun}{'' if int(count) == 1 else 's'}"


def _one_build(summary: pd.DataFrame) -> str:
    """The note's caveat for tables of one embedded build: its intervals leave the build's variance out."""
    if "builds" not in summary.columns or not (summary["builds"] == 1).any():
        return ""
    if (summary["builds"] == 1).all():
        return (" of one embedded build (intervals leave out the spread between builds; sweep `build=` to include "
                "it)")
    return ("; the rows with an embedded model are of one build (their intervals leave out the spread between "
            "builds; sweep `build=` to include it)")


def _builds_seeds(summary: pd.DataFrame) -> tuple[int, int]:
    builds = int(summary["builds"].max()) if "builds" in summary.columns and summary["builds"].notna().any() else 1
    return builds, int(summary["seeds"].max()) if summary["seeds"].notna().any() else 1


def _count(summary: pd.DataFrame, col: str, noun: str) -> str:
    """How many ``noun`` the rows' means are over: "3 seeds", or "1–3 seeds" where rows differ."""
    values = summary[col].dropna() if col in summary.columns else pd.Series(dtype=float)
    lo, hi = (int(values.min()), int(values.max())) if len(values) else (1, 1)
    return _n(hi, noun) if lo == hi else f"{lo}–{hi} {noun}s"


def _units(summary: pd.DataFrame, col: str) -> str:
    """What a table's (or figure's) means are over, e.g. "3 builds × 2 seeds × 2000 problems", "1–3 seeds × 500
    problems" where rows differ (builds only when some row spans several; problems when the runs kept
    predictions)."""
    builds, _ = _builds_seeds(summary)
    n_p = summary[f"{col} problems"].max() if f"{col} problems" in summary.columns else float("nan")
    problems = "" if pd.isna(n_p) else f" × {int(n_p)} problems"
    seeds = _count(summary, "seeds", "seed")
    return (f"{_count(summary, 'builds', 'build')} × {seeds}" if builds > 1 else seeds) + problems


def _design(summary: pd.DataFrame, col: str) -> str:
    """A figure's account of what its means and intervals are over, e.g. "mean of 3 builds × 2 seeds × 2000
    problems\\n95 % interval (builds and problems as factors)"."""
    builds, seeds = _builds_seeds(summary)
    factors = ("builds and problems as factors" if builds > 1 else "seeds and problems as factors" if seeds > 1
               else "problems as the factor")
    if seeds > 1 and builds <= 1 and int(summary["seeds"].min()) == 1:
        factors += "; problems alone for a row of 1 seed"
    return f"mean of {_units(summary, col)}\n95 % interval ({factors})"


def plot(summary: pd.DataFrame, path: Path) -> None:
    """Accuracy against keep ratio per scorer, error bars the 95 % intervals (± sd where none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_cols = sorted({c.split(" ", 1)[0] for c in summary.columns if c.startswith("acc/")})
    budgets = sorted(summary["budget"].dropna().unique()) if "budget" in summary.columns else []
    panels = [(c, b) for c in acc_cols for b in (budgets or [None])]  # one panel per eval set and budget
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (c, budget) in zip(axes[0], panels, strict=True):
        rows = summary if budget is None else summary[summary["budget"] == budget]
        full = rows[rows["keep_ratio"] == 1.0]
        halves = rows[rows["keep_ratio"] < 1.0]
        # variants sharing a keep ratio sit side by side around it, so their error bars do not hide each other
        at = {r: sorted(g["variant"].unique()) for r, g in halves.groupby("keep_ratio")}
        for name, g in halves.groupby("variant"):
            g = g.sort_values("keep_ratio")
            mean = 100 * g[f"{c} mean"]
            lo = (mean - 100 * g[f"{c} lo"]).fillna(100 * g[f"{c} std"])
            hi = (100 * g[f"{c} hi"] - mean).fillna(100 * g[f"{c} std"])
            x = [r + 0.012 * (at[r].index(name) - (len(at[r]) - 1) / 2) for r in g["keep_ratio"]]
            ax.errorbar(x, mean, yerr=[lo, hi], marker="o", capsize=3, label=name)
        if len(full):
            m = 100 * full[f"{c} mean"].iloc[0]
            ax.axhline(m, color="k", ls="--", label="full data")
            if not pd.isna(full[f"{c} lo"].iloc[0]):
                ax.axhspan(100 * full[f"{c} lo"].iloc[0], 100 * full[f"{c} hi"].iloc[0], color="k", alpha=0.08)
        ax.set_xlabel("keep ratio")
        ax.set_ylabel(f"{c[4:]} accuracy (%)")
        where = "" if budget is None else f", budget={budget}"
        ax.set_title(f"{c[4:]}{where}: {_design(rows, c)}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("Accuracy by subset: every row's mean with its 95 % interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def has_budget_axis(summary: pd.DataFrame) -> bool:
    """True when some curve (a variant's rows differing only in the budget) was trained at ≥ 2 step counts."""
    if "curve_key" not in summary.columns or summary["train_steps"].isna().all():
        return False
    return bool((summary.groupby("curve_key")["train_steps"].nunique() >= 2).any())


Bar = tuple[float, float, float, float, str]  # x, mean, lo, hi, colour: one error bar as drawn


def fit_axis(ax: Any, bars: Sequence[Bar], reach: float = 3.0, stretch: float = 3.0, floor: float = 1.0) -> list[Bar]:
    """Fit the y range so that an interval many times wider than the rest (a row of two seeds: a t with 1 degree
    of freedom, ±50 points) does not flatten every other one. The ordinary bars are those whose half-width is at
    most ``reach`` times the larger of the means' spread and the lower quartile of the half-widths (at least
    ``floor``): an interval far wider than the differences drawn says little about them. When showing every
    interval whole would take more than ``stretch`` times the range the means and the ordinary intervals need,
    the range is theirs and each wider interval is cut at the axis, with an arrow in its colour at each end it
    loses. Returns the bars cut."""
    bars = [b for b in bars if np.isfinite(b[1])]
    if not bars:
        return []
    half = np.array([(b[3] - b[2]) / 2 for b in bars], dtype=float)
    means = [b[1] for b in bars]
    quartile = float(np.nanpercentile(half, 25)) if np.isfinite(half).any() else 0.0
    limit = reach * max(max(means) - min(means), quartile, floor)
    whole = means + [e for b in bars for e in b[2:4] if np.isfinite(e)]
    core = means + [e for b, h in zip(bars, half, strict=True) if h <= limit for e in b[2:4]]

    def span(values: list[float]) -> float:
        return max(max(values) - min(values), 2 * floor)

    if span(whole) <= stretch * span(core):
        core = whole
    lo, hi = min(core) - 0.05 * span(core), max(core) + 0.05 * span(core)
    ax.set_ylim(lo, hi)
    cut = [b for b in bars if b[2] < lo or b[3] > hi]
    for x, _, b_lo, b_hi, color in cut:
        for end, edge, marker in ((b_lo, lo, "v"), (b_hi, hi, "^")):
            if end < lo or end > hi:
                ax.plot([x], [edge], marker=marker, color=color, ms=7, clip_on=False, zorder=5)
    return cut


def plot_budget(summary: pd.DataFrame, path: Path) -> dict[tuple[str, str, str], list[tuple[float, ...]]]:
    """The data-efficiency curve: accuracy (top) and the paired difference from the full pool at the same
    budget (bottom) against the optimizer steps trained, one line per curve, error bars the 95 % intervals.

    The x axis is the steps a run took: under budget=steps every subset of a budget takes the same, under
    budget=epochs the full pool takes twice a half's — its points then sit where it trained. Returns what it
    drew: ``(eval column, "acc" | "Δfull", curve) → [(steps, mean, lo, hi), …]``.

    Only variants with a curve are drawn: a row trained at one budget whose variant (keep ratio and setting) has
    no curve at any kind of budget is a point of ``table.png``, and is named under the figure; a variant's one
    point under another kind of budget (the paper's one epoch beside the compute-matched curve) is drawn. Each
    panel's y range is :func:`fit_axis`'s: an interval many times wider than the rest is cut at the axis, marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc_cols = sorted({c.split(" ", 1)[0] for c in summary.columns if c.startswith("acc/")})
    summary = summary.dropna(subset=["train_steps"])
    family = _curve_families(summary)
    has_curve = summary.groupby("curve_key")["train_steps"].transform("nunique") >= 2
    drawn_family = family.isin(set(family[has_curve]))
    left_out, summary = summary[~drawn_family], summary[drawn_family]
    fig, axes = plt.subplots(2, len(acc_cols), figsize=(7 * len(acc_cols), 8), squeeze=False, sharex=True)
    curves = summary.groupby("curve_key", sort=False)
    colors = _curve_colors(summary)
    steps = sorted(summary["train_steps"].dropna().unique())
    drawn: dict[tuple[str, str, str], list[tuple[float, ...]]] = {}
    cut = 0
    for j, c in enumerate(acc_cols):
        top, bottom = axes[0, j], axes[1, j]
        bars: tuple[list[Bar], list[Bar]] = ([], [])  # each panel's, as drawn, for fit_axis
        for k, (_, g) in enumerate(curves):
            g, name = g.sort_values("train_steps"), g["curve"].iloc[0]
            x = g["train_steps"].to_numpy(dtype=float)
            shift = 1 + 0.025 * (k - (curves.ngroups - 1) / 2)  # side by side, so the error bars do not hide
            # each other (the points' steps are the ticks)
            mean = 100 * g[f"{c} mean"]
            err = [(mean - 100 * g[f"{c} lo"]).fillna(100 * g[f"{c} std"]),
                   (100 * g[f"{c} hi"] - mean).fillna(100 * g[f"{c} std"])]
            full = (g["keep_ratio"] >= 1).all()
            # compute-matched steps: filled circles; another kind of budget (the paper's epochs): open squares
            style = ({"marker": "o"} if _steps_budget(g.iloc[0]) else {"marker": "s", "mfc": "white"})
            line = top.errorbar(x * shift, mean, yerr=err, capsize=3, label=name, color=colors[name],
                                ls="--" if full else "-", **style)
            drawn[(c, "acc", name)] = list(zip(x, mean, mean - err[0], mean + err[1], strict=True))
            bars[0].extend((xs * shift, m, lo, hi, colors[name]) for xs, m, lo, hi in drawn[(c, "acc", name)])
            d = g.dropna(subset=[f"{c} Δfull"])
            if not full and len(d):
                dm = 100 * d[f"{c} Δfull"]
                bottom.errorbar(d["train_steps"].to_numpy(dtype=float) * shift, dm,
                                yerr=[dm - 100 * d[f"{c} Δfull lo"], 100 * d[f"{c} Δfull hi"] - dm],
                                capsize=3, color=line[0].get_color(), label=name, **style)
                drawn[(c, "Δfull", name)] = list(zip(d["train_steps"].astype(float), dm, 100 * d[f"{c} Δfull lo"],
                                                     100 * d[f"{c} Δfull hi"], strict=True))
                bars[1].extend((xs * shift, m, lo, hi, colors[name]) for xs, m, lo, hi in drawn[(c, "Δfull", name)])
        bottom.axhline(0, color="k", ls="--", lw=1)
        cut += sum(len(fit_axis(ax, b)) for ax, b in zip((top, bottom), bars, strict=True))
        top.set_ylabel(f"{c[4:]} accuracy (%)")
        bottom.set_ylabel("Δ full at the same budget (points)")
        bottom.set_xlabel("optimizer steps trained (log scale)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(steps, [f"{v:g}" for v in steps])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        top.legend(fontsize=8)
        top.set_title(f"{c[4:]}: {_design(summary, c)}", fontsize=9)
    models = summary["trained"].dropna().unique() if "trained" in summary.columns else []
    fig.suptitle("Accuracy against the training budget" + (f" — {', '.join(models)}" if len(models) else ""),
                 fontsize=10)
    notes = [*(["▲▼ an interval many times wider than the rest, cut at the axis (its ends: table.md)"] if cut else []),
             *(["At one budget only, so in table.png: " + ", ".join(left_out["curve"].unique())]
               if len(left_out) else [])]
    if notes:
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.015 * len(notes) + 0.005 * bool(notes), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def write_table(root: Roots, out: str | Path | None = None, problems: str | None = None) -> dict[str, Any]:
    """The table of every finished run under ``root`` (a directory, or several read as one) → ``out`` (default:
    the one directory; required with several); with ``problems`` (a regular expression on problem ids),
    accuracies and intervals over the matching problems only."""
    dirs = _roots(root)
    if out is None and len(dirs) != 1:
        raise ResoFilterError(f"a table of {len(dirs)} directories needs --out (where to write it)")
    runs, incomplete = collect(dirs)
    if problems and not runs.empty:
        runs = restrict_problems(runs, problems)
    out = Path(out) if out else dirs[0]
    if incomplete:
        log.warning("%d run(s) without results.json: %s", len(incomplete), incomplete)
    if runs.empty:
        raise ResoFilterError(f"no finished runs under {', '.join(map(str, dirs))} (incomplete: {incomplete})")
    summary = summarize(runs)
    md = to_markdown(summary, incomplete)
    if differ := differences(list(runs["_environment"])):
        what = "; ".join(f"{k}: {', '.join(v)}" for k, v in differ.items())
        log.warning("the merged runs come from different environments (%s): their numbers may differ for that "
                    "reason alone", what)
        md += (f"\nEnvironments differ between these runs ({what}): float32 kernels and library versions can "
               "change the numbers, so rows of different environments are not like for like.\n")
    write_text_atomic(out / "table.md", md)
    write_text_atomic(out / "table.csv", summary.to_csv(index=False))
    write_text_atomic(out / "runs.csv", runs.drop(columns=["_setting", "_choices", "_environment", "_problems"],
                                                  errors="ignore").to_csv(index=False))
    plot(summary, out / "table.png")
    if has_budget_axis(summary):
        plot_budget(summary, out / "budget.png")
    else:
        (out / "budget.png").unlink(missing_ok=True)  # an earlier table's curve of runs no longer all here
    shown = [c for c in summary.columns if not c.startswith("_") and c != "setting_key"]
    table_report(out, md, summary[shown].to_dict("records"), shown, ", ".join(map(str, dirs)))
    log.info("table of %d runs (%d rows) → %s\n%s", len(runs), len(summary), out / "table.md", md)
    return {"n_runs": len(runs), "incomplete": incomplete, "rows": summary.to_dict("records"), "markdown": md}


