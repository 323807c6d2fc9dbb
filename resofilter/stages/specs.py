"""The stages' specs from the composed config: the one module that turns a DictConfig into them.

Every command builds its specs here once (``commands.py``); the stages below take frozen
dataclasses (:class:`ScoreSpec`, :class:`SelectSpec`, :class:`FinetuneSpec`, :class:`EvalSpec`,
:class:`RunSpec`) and never read the config. Defaults live in the YAML: a key read here with
``node.key`` is one every shipped config sets (``config_check`` and the composition tests hold
them to it); ``.get`` is kept for the optional ones whose absence means "off".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from resofilter.data.tokenize import TokenizeSpec
from resofilter.evaluation.protocols import ProtocolSpec
from resofilter.features.closed_form import StepConfig
from resofilter.features.extract import ScoreSettings
from resofilter.features.sketch import SketchSpec
from resofilter.features.tokens import TokenSignalSpec
from resofilter.models.loading import resolve_dtype
from resofilter.stages import context
from resofilter.stages.config_check import count_above_bounds, precision_check_samples, scoring_dtype
from resofilter.stages.context import plain
from resofilter.stages.evaluate import EvalSpec
from resofilter.stages.finetune import FinetuneSpec
from resofilter.stages.run import RunInputs, RunSpec
from resofilter.stages.score import PrecisionCheckSpec, ScoreSpec
from resofilter.stages.select import SelectSpec


def score_settings(cfg: DictConfig) -> ScoreSettings:
    s = cfg.score
    literal = resolve_dtype(s.literal_dtype, "score.literal_dtype")
    return ScoreSettings(
        # the literal loop's dtype means nothing to the fast mode: its spec (and features' identity) holds the default
        mode=s.mode, literal_dtype=literal if s.mode == "literal" else ScoreSettings.literal_dtype,
        statistics=tuple(s.statistics), quantiles=tuple(s.quantiles), count_above=tuple(count_above_bounds(cfg)),
        chunk_elements=s.chunk_elements,
        quantile_hold_elements=(ScoreSettings.quantile_hold_elements if s.get("quantile_hold_elements") is None
                                else s.quantile_hold_elements),
        logits_chunk_elements=s.logits_chunk_elements, recompute_layers=bool(s.recompute_layers),
        mmap_threshold=s.mmap_threshold, batch_size=s.batch_size,
        max_tokens_per_batch=s.max_tokens_per_batch, shard_size=s.shard_size, progress_bar=s.progress_bar,
        tokens=TokenSignalSpec.from_cfg(cfg), sketch=SketchSpec.from_cfg(plain(s.get("sketch"))))


def precision_check_spec(cfg: DictConfig, dtype: Any) -> PrecisionCheckSpec:
    pc = cfg.score.precision_check
    return PrecisionCheckSpec(n_samples=precision_check_samples(cfg, dtype), min_spearman=pc.min_spearman,
                              max_error_over_std=pc.max_error_over_std, seed=cfg.seed, statistic=cfg.statistic.name,
                              layer_modules=tuple(cfg.layers.modules), layer_indices=plain(cfg.layers.indices))


def score_spec(cfg: DictConfig) -> ScoreSpec:
    """What the score stage is asked (see :class:`ScoreSpec`: its identity fields key the features)."""
    dtype = scoring_dtype(cfg)
    cand = cfg.score.candidates
    return ScoreSpec(settings=score_settings(cfg), dtype=dtype, step=StepConfig.from_cfg(plain(cfg.step)),
                     candidate_modules=tuple(cand.modules), candidate_indices=plain(cand.indices),
                     ifd=bool(cfg.score.ifd), attn_implementation=cfg.model.get("attn_implementation"),
                     tokenize=TokenizeSpec.from_cfg(cfg.tokenize),
                     declared_depth=cfg.model.get("num_hidden_layers"), check=precision_check_spec(cfg, dtype),
                     trainer=plain(cfg.trainer), cache_dir=cfg.paths.get("cache_dir"),
                     device_map=plain(cfg.score.device_map), config=plain(cfg))


def select_spec(cfg: DictConfig) -> SelectSpec:
    """What the select stage is asked; what the features know (depth, records) comes from their manifest."""
    sel = cfg.selection
    return SelectSpec(scorer=plain(cfg.scorer), layers=plain(cfg.layers), statistic=cfg.statistic.name,
                      keep_ratio=sel.keep_ratio, direction=sel.direction, dedup=sel.get("dedup"),
                      diagnostics=sel.diagnostics, allow_unscored=bool(sel.allow_unscored),
                      panel_layer_sets=plain(sel.panel_layer_sets),
                      label_field=cfg.data.get("label_field"), kind_field=cfg.data.get("kind_field"),
                      group_fields=tuple(cfg.data.get("group_fields") or ()), seed=cfg.seed,
                      declared_depth=cfg.model.get("num_hidden_layers"),
                      report_k=int(sel.report.k), report_excerpt_chars=int(sel.report.excerpt_chars))


def finetune_spec(cfg: DictConfig) -> FinetuneSpec:
    """What the finetune stage is asked: the trained model (``train_model``, else ``model``) and its template."""
    ft, trained = cfg.finetune, context.trained_model_cfg(cfg)
    return FinetuneSpec(mode=ft.mode, batch_size=ft.batch_size, accumulate_grad_batches=ft.accumulate_grad_batches,
                        global_batch_size=ft.get("global_batch_size"),
                        epochs=ft.epochs, max_steps=ft.max_steps, gradient_clip_val=ft.gradient_clip_val,
                        precision=str(ft.precision), seed=ft.seed, warmup_ratio=ft.warmup_ratio,
                        optimizer=plain(ft.optimizer), scheduler=plain(ft.scheduler), trainer=plain(cfg.trainer),
                        logger=plain(cfg.logger), template=plain(context.trained_template_cfg(cfg)),
                        tokenize=plain(cfg.tokenize), model_dtype=trained.dtype,
                        attn_implementation=trained.get("attn_implementation"),
                        lora=plain(ft.lora) if ft.get("lora") else None, merge_lora=bool(ft.get("merge_lora")),
                        gradient_checkpointing=bool(ft.get("gradient_checkpointing")),
                        checkpoint_every_n_steps=ft.get("checkpoint_every_n_steps"), budget=ft.budget)


def eval_spec(ev: DictConfig, path: str | Path, key: str = "eval") -> EvalSpec:
    """One eval set (``eval`` or ``evals.<name>``) reading ``path``."""
    return EvalSpec(name=ev.name, path=str(path), query_field=ev.query_field, answer_field=ev.answer_field,
                    extractor=plain(ev.extractor), id_field=ev.get("id_field"), max_samples=ev.get("max_samples"),
                    batch_size=ev.batch_size, save_every=ev.get("save_every"), max_new_tokens=ev.max_new_tokens,
                    min_new_tokens=ev.get("min_new_tokens", 0), stop_strings=tuple(ev.get("stop_strings") or ()),
                    protocol=ProtocolSpec.from_cfg(plain(ev), key), prompt_overflow=ev.get("prompt_overflow", "error"),
                    key=key)


def eval_specs(cfg: DictConfig) -> tuple[EvalSpec, ...]:
    """Every eval set a command evaluates, ``eval`` first (its files resolved, the benchmark's generated)."""
    return tuple(eval_spec(ev, context.eval_path(cfg, key), key) for ev, key in context.eval_sets(cfg).values())


# Keys that never distinguish one setting from another: the replicates of a row (fine-tuning seed, embedded
# build), where outputs go.
_NOT_SETTING = {"output_dir", "paths", "features_dir", "subset_path", "checkpoint_dir", "hydra", "command", "build",
                "expected"}


def run_setting(cfg: DictConfig) -> dict[str, Any]:
    """The run's resolved config, flattened (``a.b.c: value``), minus seeds and output locations.

    ``resofilter table`` groups runs by it: two runs are one row exactly when their settings
    are equal, whatever keys differ.
    """
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if (not prefix and k in _NOT_SETTING) or k == "seed":
                    continue
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk(plain(cfg), "")
    return flat


def hydra_choices() -> dict[str, Any] | None:
    """The config group options this run was composed from (``layers: last3_mlp``), when under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return {k: v for k, v in plain(HydraConfig.get().runtime.choices).items() if not k.startswith("hydra")}


def needs_reference(cfg: DictConfig) -> bool:
    """``scorer=target`` without a scored reference dir: the run scores the reference records."""
    ref = cfg.scorer.get("reference") if cfg.scorer.get("name") == "target" else None
    return ref is not None and not ref.get("features_dir")


def expected_band(overrides: list[str] | None) -> tuple[float, float] | None:
    """README command 1 only — ``resofilter run`` with no overrides (``overrides == []``): the band its final
    accuracy should lie in (:data:`resofilter.readme.COMMAND_1_ACCURACY`, the README's claim, not a setting);
    ``None`` for any other run (nothing claimed)."""
    from resofilter.readme import COMMAND_1_ACCURACY

    return COMMAND_1_ACCURACY if overrides == [] else None


def run_spec(cfg: DictConfig) -> RunSpec:
    """The whole run: the four stages' specs and what ``results.json`` records about the setting."""
    return RunSpec(
        score=score_spec(cfg), select=select_spec(cfg), finetune=finetune_spec(cfg), evals=eval_specs(cfg),
        variant=cfg.variant_name, seed=cfg.seed, build=context.build_id(cfg), setting=run_setting(cfg),
        choices={"scorer": cfg.scorer.name, "keep_ratio": cfg.selection.keep_ratio, "budget": cfg.finetune.budget,
                 "direction": cfg.selection.direction, "layers": plain(cfg.layers), "statistic": cfg.statistic.name,
                 "step": cfg.step.name},
        until=cfg.run.get("until"), keep_checkpoint=bool(cfg.run.keep_checkpoint),
        evaluate_base=bool(cfg.run.evaluate_base), accelerator=cfg.trainer.accelerator,
        scores_reference=needs_reference(cfg), expected_band=expected_band(context.task_overrides()),
        logger=plain(cfg.logger), config=plain(cfg), hydra_choices=hydra_choices())


def run_inputs(cfg: DictConfig) -> RunInputs:
    """What the run reads, resolved when the run first needs it (a base model may take minutes to build)."""
    return RunInputs(model_dir=lambda: context.ensure_model(cfg),
                     train_model_dir=lambda: context.ensure_train_model(cfg),
                     load=lambda path=None: context.load_data(cfg, path), template=context.template(cfg),
                     train_template=context.train_template(cfg), reference_path=lambda: reference_path(cfg))


def reference_path(cfg: DictConfig) -> Path:
    """The target scorer's reference records: ``scorer.reference.path``, or the synthetic benchmark's
    reference split (generated on first use)."""
    from resofilter.errors import ResoFilterError

    ref = cfg.scorer.reference
    if ref.get("path"):
        return Path(ref.path)
    if (bench := context.benchmark_dir(cfg)) is not None:
        from resofilter.stages.embedded import ensure_reference

        return ensure_reference(plain(cfg.data.synthetic), bench, int(ref.n))
    raise ResoFilterError("scorer=target needs its reference records: set scorer.reference.path (records with "
                          "the data's fields) or scorer.reference.features_dir (their `resofilter score` dir)")
