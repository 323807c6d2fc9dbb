"""``results.json`` as a typed record: what a finished run was and what it gave.

The run writes a :class:`RunResult` (its last write: the run is complete when it exists) and
``resofilter table``, the notebook and the experiments' scripts read one back with
:meth:`RunResult.read`, which checks the schema version and every field: a file of another
version, or one missing a field, is an error naming the file and the field, never a silent
``None`` deep in a table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from resofilter._io import read_json, write_json_atomic
from resofilter.errors import ResoFilterError

RESULTS_SCHEMA = 1  # bump when a field changes meaning or name; readers refuse other versions
STAGES = ("score", "reference", "select", "base_eval", "finetune", "evaluate")  # stage summaries, in run order


def canonical_setting(setting: dict[str, Any]) -> dict[str, Any]:
    """A setting as runs are compared by (resume, ``table``'s rows): keys whose value is null are left out, so a
    config key added in a later version with a null default leaves earlier runs the same setting; so is the
    length of the budget kind not in force (``finetune.epochs`` under ``budget=steps``, ``finetune.max_steps``
    under ``budget=epochs``: fine-tuning never reads it)."""
    unused = _UNUSED_BUDGET_KEY.get(setting.get("finetune.budget"))
    return {k: v for k, v in setting.items() if v is not None and k != unused}


_UNUSED_BUDGET_KEY = {"steps": "finetune.epochs", "epochs": "finetune.max_steps"}


@dataclass(frozen=True)
class RunResult:
    """One finished run. ``stages`` holds each stage's summary (``score``: ``cached``, ``features_dir``,
    ``key``, ``time_s``; ``select``: ``n_in``, ``n_out``, ``dedup_removed``, ``confounds`` and, with noise
    labels, ``noise_auroc``/``noise_rate_kept``; ``base_eval``: the model before fine-tuning on the main eval
    set (``run.evaluate_base``); ``finetune``; ``evaluate``; ``reference`` for a target scorer whose reference
    the run scored)."""

    variant: str
    scorer: str
    keep_ratio: float
    budget: str  # steps (compute-matched) | epochs (the paper's)
    direction: str
    layers: dict[str, Any]
    statistic: str
    step: str
    seed: int
    build: int | None  # the embedded base model's build; None: the models come from a path
    model: str  # the scoring model's directory
    train_model: str  # the fine-tuned model's directory (the scoring model unless train_model is set)
    data: dict[str, Any]  # path, n_records, dedup_removed
    eval: dict[str, float]  # accuracy per eval set, the main one first
    eval_protocols: dict[str, str]
    stages: dict[str, dict[str, Any]]
    total_time_s: float
    base_model: dict[str, float] | None  # the embedded build's own accuracies (build.json)
    setting: dict[str, Any]  # the flattened resolved config minus replicates and locations: the table's row key
    choices: dict[str, Any] | None  # Hydra's config group options
    environment: dict[str, Any]  # packages, torch's CPU code path and threads
    wandb_dir: str | None = None
    # content fingerprints (``model_fingerprint``: its weights, not its path) of the scoring and the fine-tuned
    # model, ``{"model": …, "train_model": …}``: two runs of one ``build`` on two machine kinds show whether they
    # fine-tuned the same bits. None in a result written before it was recorded.
    weights: dict[str, str] | None = None
    schema: int = RESULTS_SCHEMA

    def __post_init__(self) -> None:
        for stage in ("score", "select", "finetune", "evaluate"):
            if stage not in self.stages:
                raise ResoFilterError(f"a run result needs the {stage} stage's summary (stages.{stage})")

    # what the table reads
    @property
    def n_kept(self) -> int:
        return int(self.stages["select"]["n_out"])

    @property
    def noise_auroc(self) -> float | None:
        return self.stages["select"].get("noise_auroc")  # only with noise labels

    @property
    def noise_rate_kept(self) -> float | None:
        return self.stages["select"].get("noise_rate_kept")

    @property
    def rho_length(self) -> float | None:
        """Spearman ρ of the score's badness with response length (1: the score is length itself)."""
        return (self.stages["select"].get("confounds") or {}).get("response_tokens")

    @property
    def features_cached(self) -> bool:
        return bool(self.stages["score"]["cached"])

    @property
    def run_time_s(self) -> float:
        """The run's own stages, without a base-model build that the first run of a sweep pays for every other."""
        return float(sum(float(self.stages[s]["time_s"]) for s in STAGES if s in self.stages))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        write_json_atomic(path, self.as_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | Path = "results.json") -> RunResult:
        if d.get("schema") != RESULTS_SCHEMA:
            raise ResoFilterError(f"{where} is a results.json of schema {d.get('schema')!r}, this resofilter reads "
                                  f"schema {RESULTS_SCHEMA}: rerun the run (its features are cached), or read it "
                                  "with the version that wrote it")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ResoFilterError(f"{where} is not a run result of schema {RESULTS_SCHEMA}: "
                                  + "; ".join(x for x in (f"missing {missing}" if missing else "",
                                                          f"unknown {unknown}" if unknown else "") if x))
        try:
            return cls(**d)
        except ResoFilterError as e:
            raise ResoFilterError(f"{where}: {e}") from None

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        return cls.from_dict(read_json(path), path)
