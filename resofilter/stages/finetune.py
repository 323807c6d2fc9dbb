"""The finetune stage: records → SFT with Lightning → an HF ``save_pretrained`` checkpoint."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from resofilter import distributed
from resofilter._io import file_hash, read_json, remove_orphans, stable_hash, temporary_dir, write_json_atomic
from resofilter.data.records import Record
from resofilter.data.templates import Template
from resofilter.data.tokenize import tokenize_records
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from resofilter.training.sft import SFTDataModule, SFTModule

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"


# our short names for peft.LoraConfig's fields; any other LoraConfig field passes through as is
_LORA_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def lora_config(lora: Any) -> Any:
    """``peft.LoraConfig`` from the ``finetune.lora`` section; a key LoraConfig lacks is a ConfigError."""
    from peft import LoraConfig

    kwargs = {_LORA_NAMES.get(k, k): (list(v) if k == "target_modules" else v)
              for k, v in (OmegaConf.to_container(lora, resolve=True) if isinstance(lora, DictConfig)
                           else dict(lora)).items()}
    try:
        return LoraConfig(task_type="CAUSAL_LM", **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError("finetune.lora", f"{e} (keys: {sorted(lora)}; alpha/dropout stand for lora_alpha/"
                          "lora_dropout, every other peft.LoraConfig field passes through)") from None


def check_target(node: Any, key: str, **supplied: Any) -> None:
    """Bind a ``_target_`` config's kwargs (plus what the stage supplies) to the target's signature.

    A typo or a missing argument fails validation, before any weights load, naming the key.
    """
    import inspect

    from hydra.utils import get_object

    node = OmegaConf.to_container(node, resolve=True)
    try:
        cls = get_object(node["_target_"])
    except Exception as e:  # noqa: BLE001 - hydra raises several kinds
        raise ConfigError(f"{key}._target_", f"cannot import {node.get('_target_')!r}: {e}") from None
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    try:
        inspect.signature(cls).bind(**supplied, **kwargs)
    except TypeError as e:
        raise ConfigError(key, f"{cls.__name__}: {e}") from None


def wrap_lora(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(lora))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d: %d trainable parameters", lora["r"], trainable)
    return model


@dataclass(frozen=True)
class FinetuneSpec:
    """What the finetune stage is asked, built from the config in one place (:meth:`from_cfg`).

    ``optimizer``, ``scheduler``, ``trainer`` and ``logger`` are ``_target_`` configs (plain
    dicts) that the stage instantiates; ``template`` is recorded in ``finetune.json``.
    """

    mode: str
    batch_size: int
    accumulate_grad_batches: int
    epochs: int
    max_steps: int
    gradient_clip_val: float
    precision: str
    seed: int
    warmup_ratio: float
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    trainer: dict[str, Any]
    logger: dict[str, Any]
    template: dict[str, Any]
    tokenize: dict[str, Any]
    model_dtype: str = "float32"
    attn_implementation: str | None = None
    lora: dict[str, Any] | None = None
    merge_lora: bool = False
    gradient_checkpointing: bool = False

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> FinetuneSpec:
        ft = cfg.finetune
        plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
        return cls(mode=ft.mode, batch_size=ft.batch_size, accumulate_grad_batches=ft.accumulate_grad_batches,
                   epochs=ft.epochs, max_steps=ft.max_steps, gradient_clip_val=ft.gradient_clip_val,
                   precision=str(ft.precision), seed=ft.seed, warmup_ratio=ft.warmup_ratio,
                   optimizer=plain(ft.optimizer), scheduler=plain(ft.scheduler), trainer=plain(cfg.trainer),
                   logger=plain(cfg.logger), template=plain(cfg.template), tokenize=plain(cfg.tokenize),
                   model_dtype=cfg.model.dtype, attn_implementation=cfg.model.get("attn_implementation"),
                   lora=plain(ft.lora) if ft.get("lora") else None, merge_lora=bool(ft.get("merge_lora")),
                   gradient_checkpointing=bool(ft.get("gradient_checkpointing")))


def run_finetune(spec: FinetuneSpec, model_dir: str, records: list[Record], template: Template,
                 out_dir: str | Path) -> dict[str, Any]:
    """Fine-tune ``model_dir`` on ``records``; the checkpoint lands in ``<out>/checkpoint``."""
    out_dir = Path(out_dir)
    ft = spec
    tok = load_tokenizer(model_dir)
    samples, stats = tokenize_records(records, template, tok, spec.tokenize["max_length"],
                                      spec.tokenize["prompt_overflow"], spec.tokenize["append_eos"])
    if distributed.is_rank_zero():
        remove_orphans(out_dir, (f".{CHECKPOINT}.*",))  # a killed run's half-saved checkpoint
    pl.seed_everything(ft.seed, workers=True, verbose=False)
    model = load_causal_lm(model_dir, training_load_dtype(spec.model_dtype, spec.mode), spec.attn_implementation)
    if ft.mode == "lora":
        model = wrap_lora(model, ft.lora)
    check_master_weights(model, ft.precision)
    if ft.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()  # from_pretrained returns eval mode: dropout (attention, LoRA) must be on while fitting
    optimizer = instantiate(ft.optimizer)
    module = SFTModule(model, optimizer, instantiate(ft.scheduler), ft.warmup_ratio)
    trainer = instantiate(
        spec.trainer, max_epochs=ft.epochs, max_steps=ft.max_steps, accumulate_grad_batches=ft.accumulate_grad_batches,
        gradient_clip_val=ft.gradient_clip_val, precision=ft.precision, enable_checkpointing=False,
        enable_model_summary=False, logger=instantiate(spec.logger, save_dir=str(out_dir)), deterministic=True)
    t0 = time.perf_counter()
    trainer.fit(module, SFTDataModule(samples, tok.pad_token_id, ft.batch_size, seed=ft.seed))
    train_s = time.perf_counter() - t0
    final = out_dir / CHECKPOINT
    if not trainer.is_global_zero:  # rank 0 saves; the others wait for it, then know where it is
        trainer.strategy.barrier("checkpoint-saved")
        return {"checkpoint": str(final), "steps": trainer.global_step, "n_records": len(records)}
    tmp = temporary_dir(final)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if ft.mode == "lora" and ft.merge_lora:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tok.save_pretrained(tmp / "merged")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = {"checkpoint": str(final), "base_model": model_dir, "mode": ft.mode, "n_records": len(records),
              "tokenized": stats.as_dict(), "steps": trainer.global_step, "train_s": train_s,
              "tokens_per_s": module.tokens_seen / max(train_s, 1e-9), "final_metrics": metrics,
              # what evaluating this checkpoint must reuse: the prompt format it was trained on
              "template": spec.template, "tokenize": spec.tokenize}
    write_json_atomic(out_dir / "finetune.json", result)
    trainer.strategy.barrier("checkpoint-saved")
    log.info("fine-tuned %d steps in %.0f s (%.0f tokens/s) → %s", trainer.global_step, train_s,
             result["tokens_per_s"], final)
    return result


def training_load_dtype(model_dtype: str, mode: str) -> torch.dtype:
    """The dtype fine-tuning loads the model in.

    Full fine-tuning trains the loaded weights, so they are fp32 (float64 if asked) whatever
    ``model.dtype`` says: under ``bf16-mixed`` Lightning autocasts the computation and the
    optimizer steps fp32 master weights, as the authors' DeepSpeed bf16 does. (bf16 weights
    stepped at lr 1e-5 barely move: 16 % of up_proj weights changed in 10 steps.) LoRA trains
    adapters only, which peft keeps in fp32, so the frozen base may stay in ``model.dtype``.
    """
    dtype = resolve_dtype(model_dtype)
    if mode == "lora" or dtype == torch.float64:
        return dtype
    return torch.float32


def check_master_weights(model: torch.nn.Module, precision: str) -> None:
    """Every trainable parameter is fp32/fp64: an optimizer step on half-precision weights loses the update."""
    low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad
                  and p.dtype not in (torch.float32, torch.float64)})
    if low:
        raise ResoFilterError(f"trainable parameters in {low} under precision {precision}: "
                              "fine-tuning needs fp32 master weights (load in fp32 and use bf16-mixed)")


def _finetune_record(checkpoint_dir: str | Path) -> Path | None:
    """The ``finetune.json`` of a fine-tuning output dir or of its ``checkpoint/``, if any."""
    d = Path(checkpoint_dir)
    candidates = [d / "finetune.json"] + ([d.parent / "finetune.json"] if d.name == CHECKPOINT else [])
    return next((p for p in candidates if p.exists()), None)


def checkpoint_id(checkpoint_dir: str | Path) -> str:
    """What identifies a model to evaluate: its path and, for our checkpoints, their training record."""
    record = _finetune_record(checkpoint_dir)
    return stable_hash([str(Path(checkpoint_dir).resolve()), file_hash(record) if record else None])


def trained_template(checkpoint_dir: str | Path, template_cfg: DictConfig) -> None:
    """A fine-tuned checkpoint is evaluated with the template it was trained on; another is a ConfigError."""
    record = _finetune_record(checkpoint_dir)
    if record is None:  # a base model or another tool's checkpoint: the config's template
        return
    trained = read_json(record).get("template")
    given = OmegaConf.to_container(template_cfg, resolve=True)
    if trained is not None and trained != given:
        raise ConfigError("template", f"{checkpoint_dir} was fine-tuned with template {trained.get('name')!r} "
                          f"({record}); the config gives {given.get('name')!r}: evaluate it with the template "
                          f"it learned (template={trained.get('name')})")


def load_checkpoint(path: str | Path, dtype: str, attn: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a full checkpoint or a LoRA adapter directory."""
    path = Path(path)
    if (path / CHECKPOINT).is_dir():
        path = path / CHECKPOINT
    if not path.is_dir():
        raise ResoFilterError(f"checkpoint {path} not found")
    tok = load_tokenizer(str(path))
    if (path / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        model = PeftModel.from_pretrained(load_causal_lm(base, dtype, attn), str(path))
    else:
        model = load_causal_lm(str(path), dtype, attn)
    return model, tok
