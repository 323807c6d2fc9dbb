"""Cheap validation of a composed config, without loading any weights.

Every command calls :func:`validate` first, so a typo in a config value fails in a second
with the key named, not after an hour of scoring. Tests run it on every shipped config,
gemma-2-2b included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from resofilter.errors import ConfigError
from resofilter.features.closed_form import STEP_OPTIMIZERS
from resofilter.features.extract import EXTRACTORS
from resofilter.features.sketch import SketchSpec
from resofilter.features.statistics import NEEDS, statistic_columns
from resofilter.features.targets import resolve_indices
from resofilter.features.tokens import TokenSignalSpec
from resofilter.models.loading import resolve_dtype
from resofilter.selection.scorers import SCORERS
from resofilter.selection.select import check_keep_ratio
from resofilter.stages import context

LOW_PRECISION = (torch.bfloat16, torch.float16)

DIRECTIONS = ("drop_high", "drop_low")
FINETUNE_PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed")


def _one_of(value: Any, allowed: Sequence[str], key: str) -> None:
    if value not in allowed:
        raise ConfigError(key, f"unknown value {value!r}; expected one of {list(allowed)}")


def statistic_names(cfg: DictConfig) -> list[str]:
    """Column-level statistic names the score stage produces for ``cfg.score``."""
    return statistic_columns(list(cfg.score.statistics), list(cfg.score.quantiles), count_above_bounds(cfg))


def scoring_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype the model scores in: ``score.dtype`` (float32 when null), whatever ``model.dtype`` says.

    The per-sample statistics differ by ~1e-5 relative; in bf16 a 1e-5 step is below the
    weights' resolution and the ranking scrambles (Spearman 0.38 against float64 on a tiny
    Llama, 0.9995 in fp32). bf16/fp16 need ``score.allow_low_precision=true`` and are then
    always precision-checked (:func:`precision_check_samples`).
    """
    dtype = resolve_dtype(cfg.score.dtype or "float32", "score.dtype")
    if cfg.score.mode == "literal":
        dtype_key, dtype = "score.literal_dtype", resolve_dtype(cfg.score.literal_dtype, "score.literal_dtype")
    else:
        dtype_key = "score.dtype"
    if dtype in LOW_PRECISION and not cfg.score.get("allow_low_precision", False):
        raise ConfigError(dtype_key, f"{dtype} scrambles the ranking (a 1e-5 step is below its resolution); "
                          "score in float32/float64, or opt in with score.allow_low_precision=true "
                          "(the precision check then runs and is enforced)")
    return dtype


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' named placements


def _check_device_map(cfg: DictConfig) -> None:
    """``score.device_map``: a named placement or {module: device}; one process, fast mode."""
    dm = cfg.score.device_map
    if dm is None:
        return
    if isinstance(dm, str):
        _one_of(dm, DEVICE_MAPS, "score.device_map")
    elif not isinstance(dm, DictConfig) or not all(isinstance(v, int | str) for v in dm.values()):
        raise ConfigError("score.device_map", f"must be one of {list(DEVICE_MAPS)}, a mapping of module names to "
                          f"devices (0, 'cuda:1', 'cpu'), or null; got {dm!r}")
    if cfg.score.mode != "fast":
        raise ConfigError("score.device_map", f"splits the model for score.mode=fast; got mode {cfg.score.mode!r}")
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if devices != 1 or nodes != 1:
        raise ConfigError("score.device_map", f"places one model over this machine's devices from one process; "
                          f"trainer.devices={devices!r}, trainer.num_nodes={nodes!r} would start several (use "
                          "trainer.devices=1, or score.device_map=null to score a whole model per rank)")


def precision_check_samples(cfg: DictConfig, dtype: torch.dtype) -> int:
    """How many samples the float64 precision check re-scores (0: none)."""
    pc = cfg.score.precision_check
    n = int(pc.n_samples)
    if dtype in LOW_PRECISION:
        n = max(n, int(pc.low_precision_n_samples))
    return n


def count_above_bounds(cfg: DictConfig) -> list[float]:
    """``score.count_above`` (units of ``step.lr``) as absolute bounds on |ΔW|."""
    return [float(f"{b * cfg.step.lr:.6g}") for b in cfg.score.count_above]


def check_depth(declared: int | None, depth: int, source: str) -> None:
    """``model.num_hidden_layers``, when stated, must equal the depth the model (or its artifact) has."""
    if declared is not None and declared != depth:
        raise ConfigError("model.num_hidden_layers", f"says {declared}, but {source}; "
                          "set it to the model's depth or to null (read from the model)")


def model_depth(cfg: DictConfig) -> int | None:
    """The model's number of decoder layers as far as it is known before loading, or ``None``.

    Read from the model itself where possible (a local directory's ``config.json``, or the
    embedded recipe's architecture); ``model.num_hidden_layers`` may restate it, and a value
    that disagrees with the model is an error naming both.
    """
    import json
    from pathlib import Path

    m = cfg.model
    declared = m.get("num_hidden_layers")
    if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool) or declared < 1):
        raise ConfigError("model.num_hidden_layers", f"must be a positive integer or null, got {declared!r}")
    known: list[tuple[str, int]] = []
    if m.get("name_or_path"):
        config_json = Path(str(m.name_or_path)) / "config.json"
        if config_json.is_file():
            raw = json.loads(config_json.read_text())
            depth = raw.get("num_hidden_layers", (raw.get("text_config") or {}).get("num_hidden_layers"))
            if isinstance(depth, int):
                known.append((str(config_json), depth))
    elif m.get("package") is not None:  # once converted, the cached model says (nothing is fetched here)
        from resofilter.models.packaged import PackagedModel
        from resofilter.stages.packaged import PROVENANCE, packaged_model_dir

        converted = packaged_model_dir(PackagedModel.from_cfg(OmegaConf.to_container(m.package, resolve=True)),
                                       cfg.paths.cache_dir)
        config_json = converted / "config.json"
        if (converted / PROVENANCE).is_file() and config_json.is_file():
            depth = json.loads(config_json.read_text()).get("num_hidden_layers")
            if isinstance(depth, int):
                known.append((str(config_json), depth))
    elif m.get("embedded") is not None:
        known.append(("model.embedded.architecture.num_hidden_layers", m.embedded.architecture.num_hidden_layers))
    for source, depth in known:
        check_depth(declared, depth, f"{source} says {depth}")
    return known[0][1] if known else declared


def check_build(cfg: DictConfig) -> None:
    """``build`` seeds the embedded base model(s); a run with no embedded model has no build to choose."""
    from resofilter.stages.embedded import build_recipe, check_build_seed

    b = context.build_of(cfg)
    check_build_seed(b)
    for key in ("model", "train_model"):
        if (m := cfg.get(key)) is not None and m.get("embedded") is not None and not m.get("name_or_path"):
            build_recipe(OmegaConf.to_container(m.embedded, resolve=True), b)  # a recipe still setting seeds: error
    if b != 0 and not context.is_embedded(cfg):
        raise ConfigError("build", f"={b} picks a build of the embedded base model, but every model here is loaded "
                          "from a path (model.name_or_path): it would change nothing; drop it")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first invalid key: each group of checks in turn, each
    knowing the model's depth where the config alone gives it (else checked against the loaded model)."""
    for check in (_check_models, _check_data):  # the sources first: the depth is read from them
        check(cfg)
    n_layers = model_depth(cfg)
    for stage_check in STAGE_CHECKS:
        stage_check(cfg, n_layers)


def _check_models(cfg: DictConfig) -> None:
    """The scoring model, and the fine-tuned one when it is another: a dtype and a source."""
    for key in ("model", "train_model"):  # the scoring model, and the fine-tuned one when it is another
        if (m := cfg.get(key)) is not None:
            resolve_dtype(m.dtype, f"{key}.dtype")
            if m.get("package") is not None and m.get("embedded") is not None:
                raise ConfigError(f"{key}.package", "and an `embedded` recipe are both set: a model has one source")
            if m.get("package") is not None:
                from resofilter.models.packaged import PackagedModel

                PackagedModel.from_cfg(OmegaConf.to_container(m.package, resolve=True), f"{key}.package")
            elif m.get("name_or_path") is None and m.get("embedded") is None:
                raise ConfigError(f"{key}.name_or_path", "is null and there is neither a `package` nor an `embedded` "
                                  "recipe")
            _check_revision(m, key)


def _check_revision(m: DictConfig, key: str) -> None:
    """``<key>.revision`` picks a hub commit, tag or branch: only for a hub id."""
    from resofilter.models.hub import is_hub_id

    rev = m.get("revision")
    if rev is None:
        return
    if not isinstance(rev, str) or not rev:
        raise ConfigError(f"{key}.revision", f"must be a commit, tag or branch name, or null; got {rev!r}")
    if not (m.get("name_or_path") and is_hub_id(str(m.name_or_path))):
        raise ConfigError(f"{key}.revision", f"={rev} picks a revision of a hub model, but {key}.name_or_path "
                          f"({m.get('name_or_path')!r}) is not a hub id: a local directory or packaged model "
                          "is identified by its content")


def _check_data(cfg: DictConfig) -> None:
    """The embedded build and the synthetic pool."""
    check_build(cfg)
    if pool := cfg.data.get("pool"):
        from resofilter.data.synthetic import check_pool

        if cfg.data.get("synthetic") is None:
            raise ConfigError("data.pool", "is another pool of the synthetic benchmark: this data has none")
        check_pool(OmegaConf.to_container(pool, resolve=True))


def _check_layers(cfg: DictConfig, n_layers: int | None) -> None:
    """The templates, and the layer sets against the model's depth."""
    for key in ("template", "train_template"):
        if cfg.get(key) is not None and not hasattr(instantiate(cfg[key]), "render_prompt"):
            raise ConfigError(f"{key}._target_", "does not build a Template")
    if n_layers is not None:  # else checked against the loaded model
        resolve_indices(cfg.layers.indices, n_layers, "layers.indices")
        resolve_indices(cfg.score.candidates.indices, n_layers, "score.candidates.indices")
    if not cfg.layers.modules:
        raise ConfigError("layers.modules", "needs at least one module name")
    _one_of(cfg.layers.get("aggregate", "mean"), ("mean", "sum", "max"), "layers.aggregate")


def check_scorer_needs(cfg: DictConfig, sketches: bool) -> None:
    """What the scorer declares it reads (``selection/scorers.py``: ``register_scorer(..., needs=...)``, a
    combined scorer's indicators included) against what this config scores: a run that would stop after the
    scoring pass for a missing column is refused before it starts."""
    from resofilter.selection.scorers import scorer_needs

    name = cfg.scorer.get("name") or cfg.scorer.get("_target_")
    needs = scorer_needs(OmegaConf.to_container(cfg.scorer, resolve=True))
    if "sketches" in needs and not sketches:
        raise ConfigError("score.sketch.enabled", f"scorer={name} ranks by gradient sketches: set it true")
    if "answer_pattern" in needs and not cfg.data.get("answer_pattern"):
        raise ConfigError("data.answer_pattern", f"scorer={name} needs the answer's regex (its first group): the "
                          "answer_loss column is the loss of that span")
    # `select` reads features scored elsewhere (their manifest says what they hold); `run` scores them itself
    if cfg.get("command") == "run":
        _check_weight_columns(cfg)
    if "ifd" in needs and cfg.get("command") == "run" and not cfg.score.get("ifd"):
        raise ConfigError("score.ifd", f"scorer={name} ranks by IFD, which needs the response's loss without its "
                          "prompt: set score.ifd=true (one more forward pass)")


def _layers_covered(want: Any, have: Any, n_layers: int | None) -> bool | None:
    """Whether layer indices ``want`` are among ``have`` (each ``all`` or a list); ``None``: not known before
    the model's depth is (indices counted from both ends)."""
    if have == "all":
        return True
    if n_layers is not None:
        return set(resolve_indices(want, n_layers, "layers.indices")) <= set(
            resolve_indices(have, n_layers, "score.candidates.indices"))
    if want == "all":
        return None
    signs = {i < 0 for i in [*want, *have]}
    return set(want) <= set(have) if len(signs) == 1 else None


def _check_weight_columns(cfg: DictConfig) -> None:
    """Every statistic-over-layers column the scorer reads (``layers`` × ``statistic``, a combined scorer's
    indicators) is among what ``score.candidates`` × ``score.statistics`` will score."""
    from resofilter.selection.scorers import weight_columns_needed

    have_stats = statistic_names(cfg)
    cand = cfg.score.candidates
    n_layers = model_depth(cfg)
    scorer = OmegaConf.to_container(cfg.scorer, resolve=True)
    for key, stat_key, modules, indices, stat in weight_columns_needed(
            scorer, OmegaConf.to_container(cfg.layers, resolve=True), cfg.statistic.name):
        if stat not in have_stats:
            raise ConfigError(stat_key, f"reads statistic {stat!r}, which score.statistics {have_stats} do not give")
        if not set(modules) <= set(cand.modules) or _layers_covered(indices, cand.indices, n_layers) is False:
            raise ConfigError(key, f"reads {list(modules)} in layers {indices}, outside what is scored "
                              f"(score.candidates: {list(cand.modules)} in layers {cand.indices}): "
                              "candidates=all scores every layer")


def _check_score(cfg: DictConfig, n_layers: int | None) -> None:
    """The score stage: mode, statistics, precision policy and check, sizes, sketches, token signals, step."""
    _one_of(cfg.score.mode, sorted(EXTRACTORS), "score.mode")
    for s in cfg.score.statistics:
        _one_of(s, sorted(NEEDS), "score.statistics")  # every registered statistic
    scoring_dtype(cfg)  # the precision policy: bf16/fp16 scoring only with score.allow_low_precision
    pc = cfg.score.precision_check
    if not 0 < pc.min_spearman <= 1 or pc.max_error_over_std <= 0:
        raise ConfigError("score.precision_check", "min_spearman must be in (0, 1] and max_error_over_std > 0")
    for k in ("batch_size", "shard_size", "chunk_elements", "max_tokens_per_batch", "quantile_hold_elements"):
        v = cfg.score.get(k)
        if k == "quantile_hold_elements" and v is None:
            continue  # its default
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"score.{k}", f"must be a positive integer, got {v!r}")
    sketch = SketchSpec.from_cfg(cfg.score.get("sketch"))  # kind and sizes
    if n_layers is not None and sketch.enabled:
        resolve_indices(sketch.indices, n_layers, "score.sketch.indices")
    TokenSignalSpec.from_cfg(cfg)  # topk and the answer pattern (a regex with a group)
    check_scorer_needs(cfg, sketch.enabled)
    v = cfg.score.logits_chunk_elements
    if not isinstance(v, int) or v < 0:
        raise ConfigError("score.logits_chunk_elements", f"must be an integer ≥ 0 (0 = whole logits), got {v!r}")
    v = cfg.score.mmap_threshold
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ConfigError("score.mmap_threshold", f"must be a positive number of bytes or null, got {v!r}")
    if not isinstance(cfg.score.recompute_layers, bool):
        raise ConfigError("score.recompute_layers", f"must be true or false, got {cfg.score.recompute_layers!r}")
    _check_device_map(cfg)
    _one_of(cfg.step.name, tuple(STEP_OPTIMIZERS), "step.name")
    if not cfg.step.lr or cfg.step.lr <= 0:
        raise ConfigError("step.lr", "must be > 0")
    stat_names = statistic_names(cfg)
    if cfg.statistic.name not in stat_names:
        raise ConfigError("statistic.name",
                          f"{cfg.statistic.name!r} is not computed; score.statistics give {stat_names}")


def _check_selection(cfg: DictConfig, n_layers: int | None) -> None:
    """The scorer, the keep ratio, the direction and the deduplication."""
    if "_target_" not in cfg.scorer:  # a user's own scorer class is checked when built
        _one_of(cfg.scorer.name, tuple(SCORERS), "scorer.name")
    _one_of(cfg.scorer.get("bad_end", "high"), ("high", "low"), "scorer.bad_end")
    check_keep_ratio(cfg.selection.keep_ratio)
    _one_of(cfg.selection.direction, DIRECTIONS, "selection.direction")
    _one_of(cfg.selection.get("dedup"), (None, "exact", "normalized"), "selection.dedup")


def _check_finetune(cfg: DictConfig, n_layers: int | None) -> None:
    """The fine-tuning recipe: every ``_target_`` bound to its signature, schedule, budget, batch, checkpoints."""
    _one_of(cfg.finetune.mode, ("full", "lora"), "finetune.mode")
    # bf16/fp16 "-true" precision trains the weights themselves in half precision: a 1e-5 step
    # vanishes below their resolution (16 % of up_proj weights moved in 10 steps: experiments/README.md, "Precision")
    _one_of(str(cfg.finetune.precision), FINETUNE_PRECISIONS, "finetune.precision")
    from resofilter.stages.finetune import check_target, lora_config

    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    check_target(plain(cfg.finetune.optimizer), "finetune.optimizer", params=[])
    check_target(plain(cfg.trainer), "trainer", max_steps=1, precision="32-true", logger=False, callbacks=[])
    check_target(plain(cfg.logger), "logger", save_dir=".")
    if cfg.finetune.mode == "lora":
        if not cfg.finetune.get("lora"):
            raise ConfigError("finetune.lora", "finetune.mode=lora needs a `lora` section")
        lora_config(plain(cfg.finetune.lora))
    check_target(plain(cfg.finetune.scheduler), "finetune.scheduler", optimizer=None, num_warmup_steps=0,
                 num_training_steps=1)
    from transformers import SchedulerType

    try:
        SchedulerType(cfg.finetune.scheduler.name)
    except ValueError:
        raise ConfigError("finetune.scheduler.name", f"unknown schedule {cfg.finetune.scheduler.name!r}; "
                          f"transformers knows {[t.value for t in SchedulerType]}") from None
    _one_of(cfg.finetune.budget, ("steps", "epochs"), "finetune.budget")
    from resofilter.stages.finetune import accumulation

    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    world = devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else 1  # "auto": checked at fit
    accumulation(cfg.finetune.get("global_batch_size"), cfg.finetune.batch_size, world,
                 cfg.finetune.accumulate_grad_batches)
    if cfg.finetune.budget == "steps" and not (isinstance(cfg.finetune.max_steps, int) and cfg.finetune.max_steps > 0):
        raise ConfigError("finetune.max_steps", f"finetune.budget=steps trains max_steps optimizer steps: it must be "
                          f"≥ 1, got {cfg.finetune.max_steps}")
    if cfg.finetune.budget == "epochs" and not (isinstance(cfg.finetune.epochs, int) and cfg.finetune.epochs > 0):
        raise ConfigError("finetune.epochs", f"finetune.budget=epochs trains that many passes over the data: it must "
                          f"be ≥ 1, got {cfg.finetune.epochs}")
    every = cfg.finetune.get("checkpoint_every_n_steps")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ConfigError("finetune.checkpoint_every_n_steps", f"must be a whole number ≥ 1, or null, got {every!r}")
    if not 0 <= cfg.finetune.warmup_ratio < 1:
        raise ConfigError("finetune.warmup_ratio", f"must be in [0, 1), got {cfg.finetune.warmup_ratio}")


def _check_evaluation(cfg: DictConfig, n_layers: int | None) -> None:
    """Every eval set (extractor, protocol, overflow), tokenization and ``run.until``."""
    from resofilter.evaluation.protocols import ProtocolSpec
    from resofilter.stages.evaluate import answer_extractor

    for ev, key in context.eval_sets(cfg).values():
        answer_extractor(ev.extractor, f"{key}.extractor")
        ProtocolSpec.from_cfg(ev, key)  # a known protocol, with the exemplars it needs
        _one_of(ev.get("prompt_overflow", "error"), ("error", "count_wrong"), f"{key}.prompt_overflow")
    _one_of(cfg.tokenize.prompt_overflow, ("skip", "error"), "tokenize.prompt_overflow")
    _one_of(cfg.run.get("until"), (None, "score", "select", "finetune"), "run.until")



STAGE_CHECKS = (_check_layers, _check_score, _check_selection, _check_finetune, _check_evaluation)


# What each command reads besides the model: checked from the config alone at start-up, so a missing
# or mistyped input fails in a second (exit 2), not after an hour of scoring and fine-tuning.
COMMAND_INPUTS = {
    "prepare": ("data",),
    "score": ("data",),
    "select": ("features_dir", "reference_features"),
    "finetune": ("train_records",),
    "evaluate": ("checkpoint_dir", "evals"),
    "run": ("data", "evals", "reference"),
}


def _existing(cfg: DictConfig, key: str, what: str) -> None:
    from pathlib import Path

    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if not value:
        raise ConfigError(key, f"is required: {what}")
    if not Path(str(value)).exists():
        raise ConfigError(key, f"{value} does not exist ({what})")


def check_inputs(cfg: DictConfig, command: str | None = None) -> None:
    """Every input ``command`` (default ``cfg.command``) reads exists or can be built: ConfigError naming
    its key otherwise. Nothing is loaded, generated or trained here."""
    command = command or cfg.get("command")
    needs = COMMAND_INPUTS.get(command, ())
    for key in ("model", "train_model"):
        name = (cfg.get(key) or {}).get("name_or_path")
        if needs and name and str(name).startswith(("/", ".", "~")):  # a local directory, not a hub name
            _existing(cfg, f"{key}.name_or_path", "the model's directory (config.json and weights)")
    if command == "run" and cfg.run.get("until") in ("score", "select", "finetune"):
        needs = tuple(n for n in needs if n != "evals")  # it stops before evaluating
    target = cfg.scorer.get("name") == "target"
    for need in needs:
        if need == "data":
            context.input_source(cfg, "data")
        elif need == "features_dir":
            _existing(cfg, "features_dir", "a `resofilter score` output directory")
        elif need == "train_records":
            if cfg.get("subset_path"):
                _existing(cfg, "subset_path", "the records to fine-tune on (a select dir's subset.jsonl)")
            else:
                context.input_source(cfg, "data")
        elif need == "checkpoint_dir":
            if cfg.get("checkpoint_dir"):  # null: the base model is evaluated
                _existing(cfg, "checkpoint_dir", "a `resofilter finetune` output directory or an HF model dir")
        elif need == "evals":
            for _, key in context.eval_sets(cfg).values():
                context.input_source(cfg, key)
        elif need == "reference_features" and target:
            _existing(cfg, "scorer.reference.features_dir", "scorer=target ranks by similarity to a reference set: "
                      "its `resofilter score` dir (`resofilter run` scores scorer.reference.path itself)")
        elif need == "reference" and target and not cfg.scorer.reference.get("features_dir"):
            if cfg.scorer.reference.get("path"):
                _existing(cfg, "scorer.reference.path", "the reference records of scorer=target")
            elif cfg.data.get("synthetic") is None:
                raise ConfigError("scorer.reference.path", "scorer=target needs its reference records (same fields as "
                                  "the data), or scorer.reference.features_dir (their `resofilter score` dir)")
