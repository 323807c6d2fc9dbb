"""Resolving a composed config into concrete things: output dir, model dir, data files.

Shared by every command, so that `score`, `finetune` and `run` agree on where the
embedded base model and the synthetic data live.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from resofilter.configs import load_group_option
from resofilter.data.records import Record, dedup_records, load_hf_records, load_records
from resofilter.data.templates import Template
from resofilter.errors import ConfigError

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """A config node as plain Python values (dicts, lists), resolved, for the stages (which never read a
    DictConfig); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir`` or Hydra's run dir for this job."""
    if cfg.get("output_dir"):
        out = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ConfigError("output_dir", "must be set when not running under Hydra")
        out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def template(cfg: DictConfig) -> Template:
    """The scoring template (``template``)."""
    return instantiate(cfg.template)


def trained_model_cfg(cfg: DictConfig) -> DictConfig:
    """What is fine-tuned and evaluated: ``train_model`` (a model config: ``model@train_model=<option>``),
    else the scoring model itself. The authors score gemma-2-2b and fine-tune gemma-2-2b-it."""
    return cfg.get("train_model") or cfg.model


def trained_template_cfg(cfg: DictConfig) -> DictConfig:
    """The template fine-tuning and evaluation use: ``train_template`` (``template@train_template=<option>``),
    else the scoring template. It must fit the trained model's tokenizer (selection hands over records,
    so the two tokenizers may differ)."""
    return cfg.get("train_template") or cfg.template


def train_template(cfg: DictConfig) -> Template:
    return instantiate(trained_template_cfg(cfg))


def is_embedded(cfg: DictConfig) -> bool:
    """Whether the scoring or the trained model is an embedded one (built from its recipe), not a user's checkpoint."""
    return any(not m.get("name_or_path") and m.get("embedded") is not None for m in (cfg.model, trained_model_cfg(cfg)))


def benchmark_recipe(cfg: DictConfig, *, of_model: bool = False) -> DictConfig | None:
    """The synthetic benchmark's recipe a config reads, or ``None``.

    ``data.synthetic`` when the data is the benchmark. With ``of_model`` (the eval sets, the
    embedded model's build), own data on the embedded model falls back to the default benchmark:
    the embedded model is trained on it whatever the data, so its test split is the natural
    evaluation unless ``eval.path`` names another.
    """
    synth = cfg.data.get("synthetic")
    if synth is None and of_model and is_embedded(cfg):
        synth = load_group_option("data", "math_synth").synthetic
    return synth


def benchmark_dir(cfg: DictConfig, *, of_model: bool = False) -> Path | None:
    """The synthetic benchmark's directory (generated on first use) when the config uses it, else ``None``."""
    synth = benchmark_recipe(cfg, of_model=of_model)
    if synth is None:
        return None
    from resofilter.stages.embedded import ensure_benchmark

    return ensure_benchmark(plain(synth), cfg.paths.cache_dir)


def build_of(cfg: DictConfig) -> int:
    """The embedded build (top-level ``build``; 0 where a config predates it)."""
    return cfg.get("build", 0)


def build_id(cfg: DictConfig) -> int | None:
    """The build the run's embedded model(s) come from, None when no model is embedded (a model from a
    path has no build: a ``build`` other than 0 is then a config error, see ``config_check``)."""
    return build_of(cfg) if is_embedded(cfg) else None


def ensure_model(cfg: DictConfig) -> str:
    """The scoring model's directory: ``model.name_or_path``, the packaged pretrained model (``model.package``:
    fetched and converted once), or the embedded base model — **trained** here (minutes) when the cache does
    not hold this build yet; both then reused from the cache."""
    return _model_dir(cfg, cfg.model, "model", template(cfg))


def ensure_train_model(cfg: DictConfig) -> str:
    """The model fine-tuning starts from (:func:`trained_model_cfg`), built like the scoring model."""
    if not cfg.get("train_model"):
        return ensure_model(cfg)
    return _model_dir(cfg, cfg.train_model, "train_model", train_template(cfg))


def _model_dir(cfg: DictConfig, model: DictConfig, key: str, tpl: Template) -> str:
    if model.get("name_or_path"):
        from resofilter.models.hub import is_hub_id, resolve_hub_model

        name = str(model.name_or_path)
        if is_hub_id(name):  # the snapshot of one commit (model.revision; null: main), its identity
            snapshot = resolve_hub_model(name, model.get("revision"))
            log.info("%s: %s resolved to %s", key, name, snapshot)
            return str(snapshot)
        return name
    if model.get("package") is not None:  # a pretrained model from the registry, converted once into the cache
        from resofilter.stages.packaged import ensure_packaged_model

        return str(ensure_packaged_model(plain(model.package), cfg.paths.cache_dir))
    if model.get("embedded") is None:
        raise ConfigError(f"{key}.name_or_path", "is null and the model has neither a `package` nor an `embedded` "
                          "recipe")
    from resofilter.stages.embedded import ensure_base_model

    # own data: the embedded model is still the one trained on the default benchmark
    bench = benchmark_dir(cfg, of_model=True)
    built = str(ensure_base_model(plain(model.embedded), bench, tpl, cfg.paths.cache_dir, build_of(cfg)))
    if cfg.data.get("synthetic") is None:
        log.warning("%s.name_or_path is null: using the embedded base model (%s), a 1 M-parameter toy trained on "
                    "synthetic one-step arithmetic, on data=%s. The pipeline runs, but its scores say little about "
                    "other text: set %s.name_or_path to a real model", key, built, cfg.data.get("path"), key)
    return built


def input_source(cfg: DictConfig, key: str) -> Path | str:
    """Where ``<key>`` (``data``, ``eval``, ``evals.<name>``) reads its records, decided from the config
    alone: the file ``<key>.path`` (which must exist), ``"hf://…"`` for ``data.hf_name``, or
    ``"benchmark"`` (the synthetic benchmark's split, generated on first use). Nothing is built
    or read, so every command checks its inputs at start-up (:func:`~resofilter.stages.config_check.check_inputs`).
    """
    node = OmegaConf.select(cfg, key)
    if node.get("path"):
        path = Path(str(node.path))
        if not path.exists():
            raise ConfigError(f"{key}.path", f"{path} does not exist" + (f" (relative to {Path.cwd()})"
                                                                          if not path.is_absolute() else ""))
        return path
    if key == "data" and node.get("hf_name"):
        return f"hf://{node.hf_name}"
    if benchmark_recipe(cfg, of_model=key != "data") is not None:
        return "benchmark"
    if key == "data":
        raise ConfigError("data.path", "is required (no synthetic benchmark in this config): a records file, "
                          "or data.hf_name (a datasets name)")
    raise ConfigError(f"{key}.path", "is required: this model has no synthetic benchmark to evaluate on (a "
                      "model.name_or_path of your own); give the eval set's file, or pick a real one (eval=gsm8k, "
                      "eval=math)")


def _path_or_benchmark(cfg: DictConfig, key: str, split: str) -> Path:
    """``cfg.<key>.path``, else the synthetic benchmark's ``<split>.jsonl``."""
    source = input_source(cfg, key)
    if isinstance(source, Path):
        return source
    bench = benchmark_dir(cfg, of_model=key != "data")
    assert bench is not None  # input_source said "benchmark"
    return bench / f"{split}.jsonl"


def data_path(cfg: DictConfig) -> Path:
    """The records file of ``data``: its ``path``, else the benchmark's split — or, with ``data.pool``, the
    benchmark's other pool of that recipe (generated on first use)."""
    source = input_source(cfg, "data")
    if cfg.data.get("pool") and source == "benchmark":
        from resofilter.stages.embedded import ensure_pool

        return ensure_pool(plain(benchmark_recipe(cfg)), benchmark_dir(cfg), plain(cfg.data.pool))
    return _path_or_benchmark(cfg, "data", cfg.data.get("split") or "pool")


def eval_sets(cfg: DictConfig) -> dict[str, tuple[DictConfig, str]]:
    """Every eval set a command evaluates, by name: ``eval`` first, then each entry of ``evals``.

    Values are (eval config, its config key). Names must be unique: they name the output
    directories and the table's columns.
    """
    sets = {cfg.eval.name: (cfg.eval, "eval")}
    for k, ev in (cfg.get("evals") or {}).items():
        if ev.name in sets:
            raise ConfigError(f"evals.{k}.name", f"eval set name {ev.name!r} is used twice")
        sets[ev.name] = (ev, f"evals.{k}")
    return sets


def eval_path(cfg: DictConfig, key: str = "eval") -> Path:
    """The eval set's file; the synthetic test split, extended by ``extra_problems`` held-out problems if set."""
    node = OmegaConf.select(cfg, key)
    extra = node.get("extra_problems")
    if extra and not node.get("path") and (bench := benchmark_dir(cfg, of_model=True)) is not None:
        from resofilter.stages.embedded import ensure_extended_test

        return ensure_extended_test(plain(benchmark_recipe(cfg, of_model=True)), bench, int(extra))
    return _path_or_benchmark(cfg, key, "test")


def load_data(cfg: DictConfig, path: str | Path | None = None) -> tuple[list[Record], dict[str, Any]]:
    """Records of ``cfg.data`` (or ``path`` read with the same field mapping), deduplicated per config.

    ``data.hf_name`` reads a ``datasets.load_dataset`` split (hub name, local cache or local
    dataset dir; ``data.hf_config``, ``data.split`` default ``train``, ``data.revision``) instead
    of a file.
    """
    d = cfg.data
    fields = (d.query_field, d.response_field, d.get("input_field"), d.get("id_field"))
    if path is None and d.get("hf_name"):
        if d.get("path"):
            raise ConfigError("data.hf_name", f"is set together with data.path={d.path}: name one source")
        split = d.get("split") or "train"
        records = load_hf_records(d.hf_name, d.get("hf_config"), split, d.get("revision"), *fields,
                                  max_samples=d.get("max_samples"))
        where = f"hf://{d.hf_name}" + (f"/{d.hf_config}" if d.get("hf_config") else "") + f"[{split}]" + (
            f"@{d.revision}" if d.get("revision") else "")
    else:
        src = Path(path) if path is not None else data_path(cfg)
        records = load_records(src, *fields, d.get("format", "auto"), d.get("max_samples"))
        where = str(src.resolve())  # absolute: a manifest or results.json read elsewhere still names the file
    records, removed = dedup_records(records, d.get("dedup"))
    if removed:
        log.info("dedup=%s removed %d records with repeated queries", d.dedup, removed)
    return records, {"path": where, "n_records": len(records) + removed, "dedup_removed": removed}


def task_overrides() -> list[str] | None:
    """The command line's overrides under Hydra (``[]``: none), ``None`` outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def overridden_on_command_line(group: str) -> bool | None:
    """Whether the command line set ``group`` or any of its keys; ``None`` outside a Hydra app."""
    task = task_overrides()
    if task is None:
        return None
    return any(o.lstrip("+~").startswith((f"{group}=", f"{group}.", f"{group}@")) for o in task)


def adopt_recorded_data(cfg: DictConfig, recorded: dict[str, Any] | None, path: str | None,
                        where: Path) -> DictConfig:
    """``cfg`` with the data config an artifact was made from (``recorded``, reading ``path``).

    A ``select`` pointed at features (or a ``finetune`` at a subset) reads the records the way
    they were scored — field names, ids, labels, the very file — unless the command line sets
    ``data`` itself, which then wins (and a mismatch with the artifact is a named error later).
    """
    if recorded is None or overridden_on_command_line("data") in (True, None):
        return cfg
    data = dict(recorded)
    if path:
        data["path"] = path
    if OmegaConf.to_container(cfg.data, resolve=True) == data:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data = OmegaConf.create(data)
    log.info("data config as recorded in %s (reading %s); set data.* on the command line to change it", where,
             data.get("path"))
    return cfg
