"""Weights & Biases for sweeps: one multirun is one W&B group; a run's selection diagnostics and
final metrics go to the run the fine-tuning logged to; ``resofilter table --wandb`` logs the table.

W&B is optional at run time (``logger=wandb``; offline by default, ``wandb sync`` later).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def is_wandb(logger_cfg: dict[str, Any] | None) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


def _init_kwargs(logger_cfg: dict[str, Any], save_dir: Path) -> dict[str, Any]:
    """wandb.init's arguments from the logger config (the WandbLogger's own names mapped)."""
    keys = ("project", "entity", "group", "name", "tags", "config", "job_type", "notes")
    kw = {k: logger_cfg[k] for k in keys if logger_cfg.get(k) is not None}
    kw["mode"] = "offline" if logger_cfg.get("offline", True) else "online"
    kw["dir"] = str(save_dir)
    return kw


def flat_diagnostics(diag: dict[str, Any] | None, prefix: str = "select") -> dict[str, float]:
    """The numbers of a selection's diagnostics as flat ``select/...`` keys (summary-friendly)."""
    out: dict[str, float] = {}
    if not diag:
        return out
    sel = diag.get("selected_scorer") or {}
    for k in ("auroc", "auprc", "precision", "recall", "noise_rate_kept"):
        if isinstance(sel.get(k), (int, float)):
            out[f"{prefix}/{k}"] = float(sel[k])
    for kind, share in (sel.get("dropped_share_by_kind") or {}).items():
        out[f"{prefix}/dropped/{kind}"] = float(share)
    for cov, rho in (diag.get("selected_confounds") or {}).items():
        if rho is not None:
            out[f"{prefix}/rho/{cov}"] = float(rho)
    for name, v in (diag.get("scorers") or {}).items():
        out[f"{prefix}/panel_auroc/{name}"] = float(v["auroc"])
    return out


def log_run_summary(logger_cfg: dict[str, Any], save_dir: Path, results: dict[str, Any],
                    diag: dict[str, Any] | None, run_id: str | None = None) -> str | None:
    """Final accuracies, the selection's diagnostics and the setting into the fine-tuning's W&B run:
    still open after ``fit``, or reopened by its id (``run_id``, from ``finetune.json``) when the
    fine-tuning was reused. Finishes the run; returns its directory."""
    import wandb

    resume = {"id": run_id, "resume": "allow"} if run_id else {}
    run = wandb.run or wandb.init(**_init_kwargs(logger_cfg, save_dir), **resume)
    for name, acc in results["eval"].items():
        run.summary[f"eval/{name}/accuracy"] = acc
    for k, v in flat_diagnostics(diag).items():
        run.summary[k] = v
    run.summary["select/n_kept"] = results["stages"]["select"]["n_out"]
    run.config.update({"variant": results["variant"], "seed": results["seed"], "keep_ratio": results["keep_ratio"],
                       "budget": results.get("budget"), "scorer": results.get("scorer"),
                       "eval_protocols": results.get("eval_protocols")}, allow_val_change=True)
    where = getattr(run, "dir", None)
    run.finish()
    return where


def log_table(rows: list[dict[str, Any]], columns: list[str], project: str, name: str, save_dir: Path,
              offline: bool = True) -> str | None:
    """``resofilter table --wandb``: the summary as a ``wandb.Table`` in its own run."""
    import wandb

    run = wandb.init(project=project, name=name, job_type="table", dir=str(save_dir),
                     mode="offline" if offline else "online")
    data = [[json.dumps(r.get(c)) if isinstance(r.get(c), (dict, list)) else r.get(c) for c in columns] for r in rows]
    run.log({"table": wandb.Table(columns=columns, data=data)})
    where = getattr(run, "dir", None)
    run.finish()
    log.info("table logged to W&B (%s) in %s", "offline" if offline else "online", where)
    return where
