"""The finetune stage: records → SFT with Lightning → an HF ``save_pretrained`` checkpoint."""

from __future__ import annotations

import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

from resofilter import distributed, progress
from resofilter._io import (
    file_hash,
    model_fingerprint,
    read_json,
    remove_orphans,
    stable_hash,
    temporary_dir,
    write_json_atomic,
)
from resofilter.data.records import Record
from resofilter.data.templates import Template
from resofilter.data.tokenize import tokenize_records
from resofilter.errors import ConfigError, ResoFilterError
from resofilter.features.extract import samples_hash
from resofilter.identity import identity_of, runtime_field
from resofilter.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from resofilter.reporting.wandb_log import is_wandb
from resofilter.training.sft import PeriodicCheckpoint, SFTDataModule, SFTModule, quiet_resume_warning

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
RESUME_DIR = "resume"  # the training state of an unfinished fine-tuning
LAST_CKPT = "last.ckpt"


# our short names for peft.LoraConfig's fields; any other LoraConfig field passes through as is
_LORA_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def lora_config(lora: Any) -> Any:
    """``peft.LoraConfig`` from the ``finetune.lora`` section; a key LoraConfig lacks is a ConfigError."""
    from peft import LoraConfig

    kwargs = {_LORA_NAMES.get(k, k): (list(v) if k == "target_modules" else v)
              for k, v in dict(lora).items()}
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

    try:
        cls = get_object(node["_target_"])
    except Exception as e:  # noqa: BLE001 - hydra raises several kinds
        raise ConfigError(f"{key}._target_", f"cannot import {node.get('_target_')!r}: {e}") from None
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    try:
        inspect.signature(cls).bind(**{**supplied, **kwargs})  # the config's own value wins (callbacks)
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
    """What the finetune stage is asked, built from the config once (:func:`~resofilter.stages.specs.finetune_spec`).

    ``optimizer``, ``scheduler``, ``trainer`` and ``logger`` are ``_target_`` configs (plain
    dicts) that the stage instantiates; ``template`` is recorded in ``finetune.json``.
    """

    mode: str
    batch_size: int
    accumulate_grad_batches: int | None
    epochs: int
    max_steps: int
    gradient_clip_val: float
    precision: str
    seed: int
    warmup_ratio: float
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    # how the run is driven and logged, not where it goes: not in the fine-tuning's key (the number of
    # processes, which sets the data order, is checked by the data module when it loads a checkpoint)
    trainer: dict[str, Any] = runtime_field()
    logger: dict[str, Any] = runtime_field()
    template: dict[str, Any]
    tokenize: dict[str, Any]
    model_dtype: str = "float32"
    attn_implementation: str | None = None
    lora: dict[str, Any] | None = None
    merge_lora: bool = False
    gradient_checkpointing: bool = False
    checkpoint_every_n_steps: int | None = runtime_field(None)
    budget: str = "steps"
    global_batch_size: int | None = None

    def accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step: ``global_batch_size / (batch_size × world_size)`` when the
        global batch is set, so one recipe is one optimisation on 1, 4 or 8 GPUs (the paper: 16 = 2 per
        GPU × 8, accumulation 1; on one GPU accumulation 8); else ``accumulate_grad_batches``."""
        return accumulation(self.global_batch_size, self.batch_size, world_size, self.accumulate_grad_batches)

    def limits(self, n_samples: int, world_size: int = 1) -> dict[str, int]:
        """Lightning's ``max_epochs``/``max_steps`` for the budget: ``epochs`` passes over the subset
        (the paper: half the data, half the steps), or ``max_steps`` optimizer steps whatever its
        size (compute-matched).

        For ``steps``, ``max_epochs`` is the passes those steps take plus one — an upper bound
        that never binds (:func:`run_finetune` checks the step count), so that the progress bar
        reads ``Epoch 3/7`` rather than Lightning's ``3/-2`` for an unbounded run.
        """
        if self.budget == "epochs":
            return {"max_epochs": self.epochs, "max_steps": -1}
        batches = math.ceil(math.ceil(n_samples / max(1, world_size)) / self.batch_size)
        per_epoch = max(1, math.ceil(batches / self.accumulation(world_size)))
        return {"max_epochs": math.ceil(self.max_steps / per_epoch) + 1, "max_steps": self.max_steps}


def accumulation(global_batch: int | None, batch_size: int, world_size: int, accumulate: int | None) -> int:
    """Gradient accumulation for a global batch (see :meth:`FinetuneSpec.accumulation`); ConfigError
    naming the three numbers when they do not divide, or when both ways of setting it are given."""
    if global_batch is None:
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ConfigError("finetune.accumulate_grad_batches", f"must be ≥ 1 when finetune.global_batch_size is "
                              f"null, got {accumulate!r}")
        return accumulate
    if accumulate is not None:
        raise ConfigError("finetune.accumulate_grad_batches", f"is {accumulate} and finetune.global_batch_size is "
                          f"{global_batch}: set one of them (null the other)")
    per_step = batch_size * world_size
    if not isinstance(global_batch, int) or global_batch < 1 or global_batch % per_step:
        raise ConfigError("finetune.global_batch_size", f"{global_batch} is not a whole multiple of "
                          f"finetune.batch_size {batch_size} × {world_size} processes (trainer.devices × "
                          f"trainer.num_nodes) = {per_step} samples per micro-step")
    return global_batch // per_step


def finetune_key(spec: FinetuneSpec, model_dir: str, samples_key: str, memo_dir: Path | None = None) -> str:
    """What a fine-tuning's trajectory depends on: a resume checkpoint or a finished output of
    another key is not this run's. The spec's identity fields (all but the ``runtime_field`` ones:
    trainer, logger, checkpoint interval), the model's content (not its path) and the samples."""
    return stable_hash({"spec": identity_of(spec), "model_weights": model_fingerprint(model_dir, memo_dir),
                        "samples": samples_key})


def run_finetune(spec: FinetuneSpec, model_dir: str, records: list[Record], template: Template,
                 out_dir: str | Path, scored_by: str | None = None) -> dict[str, Any]:
    """Fine-tune ``model_dir`` on ``records``; the checkpoint lands in ``<out>/checkpoint``.

    Complete when ``finetune.json`` is written (last, after the checkpoint); a rerun of the
    same fine-tuning on a complete dir reuses it. Every ``checkpoint_every_n_steps`` the full
    training state goes to ``<out>/resume/last.ckpt``; a rerun after a kill resumes from it to
    the weights an uninterrupted run ends with. The resume dir goes once the output is complete.
    Rank 0 holds the directory's lock for the stage. ``scored_by`` (the model whose scores chose
    ``records``, when known) is recorded in ``finetune.json``; it is not part of the fine-tuning's key.
    """
    with distributed.rank_zero_lock(out_dir, "finetune"):
        return _finetune(spec, model_dir, records, template, Path(out_dir), scored_by)


def _finetune(spec: FinetuneSpec, model_dir: str, records: list[Record], template: Template,
              out_dir: Path, scored_by: str | None) -> dict[str, Any]:
    tok = load_tokenizer(model_dir)
    samples, stats = tokenize_records(records, template, tok, spec.tokenize["max_length"],
                                      spec.tokenize["prompt_overflow"], spec.tokenize["append_eos"],
                                      template_key="train_template")  # the trained model's tokenizer
    final, record, resume = out_dir / CHECKPOINT, out_dir / "finetune.json", out_dir / RESUME_DIR
    key = finetune_key(spec, model_dir, samples_hash(samples), resume)
    done = _finished(record, final, key)
    if done is not None:
        log.info("fine-tuning already complete in %s: reusing it", out_dir)
        return done
    resume_from = _resume_point(resume, key)
    # the logger's run id lives with the resume state, so a resumed fine-tuning continues the killed
    # one's W&B run (kept too when it was killed before its first training state was saved)
    run_id = (read_json(resume / "key.json").get("run_id") if (resume / "key.json").exists() else None) \
        or uuid.uuid4().hex[:12]
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    if distributed.is_rank_zero():
        remove_orphans(out_dir, (f".{CHECKPOINT}.*", f"{RESUME_DIR}/.*.tmp"))  # a killed run's half-saved files
        if resume_from is None:
            resume.mkdir(parents=True, exist_ok=True)
            write_json_atomic(resume / "key.json", {"key": key, "run_id": run_id})
    distributed.barrier()
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    model = trainable_model(spec, model_dir)
    module = SFTModule(model, instantiate(spec.optimizer), instantiate(spec.scheduler), spec.warmup_ratio,
                       seed=spec.seed)
    trainer, run_id = build_trainer(spec, len(samples), out_dir, resume, resume_from, run_id)
    if resume_from is not None:
        log.info("resuming fine-tuning from %s (step %d)", resume_from["path"], resume_from["step"])
    t0 = time.perf_counter()
    try:
        with quiet_resume_warning():
            trainer.fit(module, SFTDataModule(samples, tok.pad_token_id, spec.batch_size, seed=spec.seed),
                        ckpt_path=resume_from["path"] if resume_from else None, weights_only=False)
    except BaseException:
        if is_wandb(spec.logger):  # close the W&B run as a dying process would (its resume reopens it by id)
            import wandb

            wandb.finish(exit_code=1)
        raise
    train_s = time.perf_counter() - t0
    check_finished(spec, trainer, resume)
    if not trainer.is_global_zero:  # rank 0 saves; the others wait for it, then know where it is
        trainer.strategy.barrier("checkpoint-saved")
        return {"checkpoint": str(final), "steps": trainer.global_step, "n_records": len(records)}
    save_checkpoint(spec, model, tok, final)
    result = {"checkpoint": str(final), "base_model": model_dir, "scored_by": scored_by, "mode": spec.mode,
              "n_records": len(records),
              "budget": spec.budget,
              # the optimisation as run: samples per optimizer step = batch × accumulation × processes
              "batch": {"per_device": spec.batch_size, "accumulate_grad_batches": spec.accumulation(trainer.world_size),
                        "world_size": trainer.world_size,
                        "global": spec.batch_size * spec.accumulation(trainer.world_size) * trainer.world_size},
              "tokenized": stats.as_dict(), "steps": trainer.global_step, "train_s": train_s,
              "tokens_per_s": (module.tokens_seen - (resume_from or {}).get("tokens_seen", 0)) / max(train_s, 1e-9),
              "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}, "key": key,
              "resumed_from_step": resume_from["step"] if resume_from else None,
              "wandb_run_id": run_id if is_wandb(spec.logger) else None,
              # what evaluating this checkpoint must reuse: the prompt format it was trained on
              "template": spec.template, "tokenize": spec.tokenize}
    write_json_atomic(record, result)  # complete from here on
    shutil.rmtree(resume, ignore_errors=True)
    trainer.strategy.barrier("checkpoint-saved")
    log.info("fine-tuned %d steps in %.0f s (%.0f tokens/s) → %s", trainer.global_step, train_s,
             result["tokens_per_s"], final)
    return result


def trainable_model(spec: FinetuneSpec, model_dir: str) -> torch.nn.Module:
    """The model to fit: loaded in its training dtype, LoRA-wrapped for ``mode=lora``, in train mode."""
    model = load_causal_lm(model_dir, training_load_dtype(spec.model_dtype, spec.mode), spec.attn_implementation)
    if spec.mode == "lora":
        model = wrap_lora(model, spec.lora)
    check_master_weights(model, spec.precision)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()  # from_pretrained returns eval mode: dropout (attention, LoRA) must be on while fitting
    return model


def build_trainer(spec: FinetuneSpec, n_samples: int, out_dir: Path, resume: Path,
                  resume_from: dict[str, Any] | None, run_id: str) -> tuple[pl.Trainer, str]:
    """The Lightning Trainer of the recipe (budget, accumulation, precision, the periodic training state,
    the logger continuing a killed run's); the logger's run id it uses."""
    trainer_cfg = dict(spec.trainer)
    shown = progress.trainer_progress(trainer_cfg.pop("enable_progress_bar", True), "fine-tuning")
    callbacks = [*instantiate(trainer_cfg.pop("callbacks", None) or []), *shown["callbacks"]]
    if spec.checkpoint_every_n_steps:
        callbacks.append(PeriodicCheckpoint(resume / LAST_CKPT, spec.checkpoint_every_n_steps))
    # a resumed run logs beside the killed one's metrics, which the CSV logger would otherwise delete
    log_kwargs = ({"version": f"resumed-at-step-{resume_from['step']}"}
                  if resume_from and "version" in spec.logger else {})
    if is_wandb(spec.logger):  # one W&B run across a kill and its resume (a logger.id of the user's wins)
        run_id = spec.logger.get("id") or run_id
        log_kwargs = {"id": run_id, "resume": spec.logger.get("resume") or "allow"}
        import wandb

        if wandb.run is not None and wandb.run.id != run_id:  # another fine-tuning's, still open in this process:
            wandb.finish()  # WandbLogger would log into it
    trainer = instantiate(
        trainer_cfg, **spec.limits(n_samples, distributed.world_size()),
        accumulate_grad_batches=spec.accumulation(distributed.world_size()),
        gradient_clip_val=spec.gradient_clip_val, precision=spec.precision, enable_checkpointing=False,
        enable_model_summary=False, logger=instantiate(spec.logger, save_dir=str(out_dir), **log_kwargs),
        enable_progress_bar=shown["enable_progress_bar"],
        deterministic=True, callbacks=callbacks,
        use_distributed_sampler=False)  # the data module deals the ranks' batches itself
    return trainer, run_id


def check_finished(spec: FinetuneSpec, trainer: pl.Trainer, resume: Path) -> None:
    """An interrupted fit (Ctrl-C / SIGTERM: Lightning returns normally) or a step count off the budget is
    an error, not a model."""
    if trainer.interrupted:
        then = (f"; rerun the same command to resume from {resume / LAST_CKPT}" if (resume / LAST_CKPT).exists()
                else "")
        raise ResoFilterError(f"fine-tuning was interrupted at step {trainer.global_step}{then}")
    if spec.budget == "steps" and trainer.global_step != spec.max_steps:
        raise ResoFilterError(f"fine-tuning stopped at step {trainer.global_step} of finetune.max_steps="
                              f"{spec.max_steps} (a bug in the epoch bound: please report it)")


def save_checkpoint(spec: FinetuneSpec, model: torch.nn.Module, tok: Any, final: Path) -> None:
    """Weights and tokenizer (and the merged LoRA model) into a temporary dir, renamed onto ``final``."""
    tmp = temporary_dir(final)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if spec.mode == "lora" and spec.merge_lora:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tok.save_pretrained(tmp / "merged")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _finished(record: Path, final: Path, key: str) -> dict[str, Any] | None:
    """The record of a complete fine-tuning of ``key`` in this dir, if any; another key's is an error."""
    if not record.exists():
        return None
    done = read_json(record)
    if done.get("key") != key:
        raise ResoFilterError(f"{record.parent} holds a finished fine-tuning of another configuration, data or "
                              "model (its finetune.json); use another output_dir, or delete it to redo it")
    return done if final.is_dir() else None  # weights deleted after evaluation (run.keep_checkpoint=false)


def _resume_point(resume: Path, key: str) -> dict[str, Any] | None:
    """Where a killed fine-tuning of ``key`` stopped (``resume/last.ckpt``), if anywhere."""
    ckpt = resume / LAST_CKPT
    if not (resume / "key.json").exists():
        return None
    if read_json(resume / "key.json")["key"] != key:
        raise ResoFilterError(f"{resume} holds the training state of another fine-tuning (configuration, data, "
                              f"model or number of processes differ); delete {resume} to start this one over")
    if not ckpt.exists():
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    return {"path": str(ckpt), "step": int(state["global_step"]),
            "tokens_seen": state.get("resofilter", {}).get("tokens_seen", 0)}


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


def trained_template(checkpoint_dir: str | Path, given: dict[str, Any]) -> None:
    """A fine-tuned checkpoint is evaluated with the template it was trained on; another is a ConfigError."""
    record = _finetune_record(checkpoint_dir)
    if record is None:  # a base model or another tool's checkpoint: the config's template
        return
    trained = read_json(record).get("template")
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
