"""The embedded default: synthetic benchmark + locally built tokenizer + tiny Llama base model.

Everything is cached on disk keyed by a hash of the config that produced it, so the first
run builds it (a few minutes on 2 CPU cores) and every later run reuses it. The result is
an ordinary HF model directory: the rest of the pipeline loads it through
``AutoModelForCausalLM``/``AutoTokenizer`` exactly as it would load google/gemma-2-2b.
"""

from __future__ import annotations

import copy
import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from transformers import get_scheduler

from resofilter import progress
from resofilter._io import read_jsonl, stable_hash, temporary_dir, write_json_atomic, write_jsonl_atomic
from resofilter.data.records import load_records
from resofilter.data.synthetic import SyntheticConfig, another_pool, check_pool, heldout_split, write_benchmark
from resofilter.data.templates import ChatTemplate, Template, template_identity
from resofilter.data.tokenize import tokenize_records
from resofilter.environment import environment, numeric_identity
from resofilter.errors import ConfigError
from resofilter.evaluation.extract import SyntheticExtractor
from resofilter.evaluation.generate import accuracy_metrics, predict_records
from resofilter.models.loading import build_tiny_model
from resofilter.models.tokenizer import train_tokenizer
from resofilter.training.sft import SFTDataModule, SFTModule

log = logging.getLogger(__name__)


def _plain(cfg: Any) -> dict[str, Any]:
    """A private deep copy of a recipe (plain dicts from the command layer): the build seeds are written into it."""
    return copy.deepcopy(dict(cfg))


def synthetic_config(cfg: Any) -> SyntheticConfig:
    return SyntheticConfig(**_plain(cfg))


_ANNOUNCED: set[Path] = set()


def ensure_benchmark(synth_cfg: Any, cache_dir: str | Path) -> Path:
    """The synthetic benchmark directory for ``synth_cfg``, generated on first use."""
    sc = synthetic_config(synth_cfg)
    sc.validate()
    out = Path(cache_dir) / "synthetic" / stable_hash(asdict(sc))
    if (out / "manifest.json").exists():
        # every stage asks for it (data, model, eval set): say it once per process
        log.log(logging.DEBUG if out in _ANNOUNCED else logging.INFO, "synthetic benchmark cached at %s", out)
        _ANNOUNCED.add(out)
        return out
    write_benchmark(sc, out)  # manifest is written last: its presence marks completion
    return out


SPLITS = ("test", "base_test", "pool", "base_train")


def _disjoint(bench_dir: Path, path: Path, rows: Callable[[set[str]], list[dict[str, Any]]], what: str) -> Path:
    """Write ``rows(taken)`` to ``path`` once, ``taken`` the queries of every split and of the other held-out
    files present, so no two files share a problem (a collision is ~1e-4 likely; it would only redraw)."""
    if path.exists():
        return path
    taken = {r["query"] for split in SPLITS for r in read_jsonl(bench_dir / f"{split}.jsonl")}
    others = [f for f in bench_dir.glob("*.jsonl") if f.stem not in SPLITS and f != path]
    taken |= {r["query"] for f in others for r in read_jsonl(f)}
    out = rows(taken)
    write_jsonl_atomic(path, out)
    log.info("synthetic %s: %d problems → %s", what, len(out), path)
    return path


def _heldout(synth_cfg: Any, bench_dir: Path, kind: str, n: int, path: Path, head: list[dict[str, Any]]) -> Path:
    """``head`` + ``n`` clean held-out problems of ``kind`` in ``path`` (:func:`_disjoint`)."""
    return _disjoint(bench_dir, path, lambda taken: [*head, *heldout_split(synthetic_config(synth_cfg), kind, n,
                                                                             taken)], f"{kind} split (clean)")


def ensure_pool(synth_cfg: Any, bench_dir: str | Path, pool_cfg: Any) -> Path:
    """``<bench>/pool_<name>-<hash>.jsonl``: another fine-tuning pool of the benchmark (``data.pool``: its
    name, size and noise), generated once, disjoint from every split and held-out file; the benchmark and
    the base model trained on it are unchanged (:func:`~resofilter.data.synthetic.another_pool`)."""
    bench_dir = Path(bench_dir)
    spec = _plain(pool_cfg)
    check_pool(spec)
    path = bench_dir / f"pool_{spec['name']}-{stable_hash(spec, 8)}.jsonl"
    return _disjoint(bench_dir, path, lambda taken: another_pool(synthetic_config(synth_cfg), spec["name"], spec["n"],
                                                                 dict(spec.get("noise") or {}), taken),
                     f"pool {spec['name']!r}")


def ensure_reference(synth_cfg: Any, bench_dir: str | Path, n: int) -> Path:
    """``<bench>/reference-<n>.jsonl``: clean fine-tuning-skill problems disjoint from every split."""
    bench_dir = Path(bench_dir)
    return _heldout(synth_cfg, bench_dir, "reference", n, bench_dir / f"reference-{n}.jsonl", [])


def ensure_extended_test(synth_cfg: Any, bench_dir: str | Path, n_extra: int) -> Path:
    """``<bench>/test-plus-<n>.jsonl``: the 500 test problems, then ``n_extra`` more of the same skill
    (ids ``test_extra-…``), for intervals narrower than 500 problems allow."""
    bench_dir = Path(bench_dir)
    return _heldout(synth_cfg, bench_dir, "test_extra", n_extra, bench_dir / f"test-plus-{n_extra}.jsonl",
                    read_jsonl(bench_dir / "test.jsonl"))


# base_training settings that change how a build is shown, never its weights.
_DISPLAY_ONLY = ("progress_bar",)


def check_build_seed(build: Any) -> None:
    """``build`` must be a non-negative integer (it seeds the embedded build)."""
    if isinstance(build, bool) or not isinstance(build, int) or build < 0:
        raise ConfigError("build", f"must be a non-negative integer (the embedded build's seed), got {build!r}")


def build_recipe(embedded: Any, build: int) -> dict[str, Any]:
    """The embedded recipe of one build: ``build`` is the weight-init and the base-training seed.

    The build is the unit of replication of every embedded experiment: float32 training on the
    CPU gives another base model under another seed (and on another CPU), and every fine-tuned
    accuracy follows it, so experiments sweep builds like fine-tuning seeds (``build=0,1,2``).
    """
    check_build_seed(build)
    e = _plain(embedded)
    for key, where in (("init_seed", e), ("seed", e["base_training"])):
        if key in where:
            raise ConfigError(f"model.embedded.{'' if where is e else 'base_training.'}{key}",
                              "is set by the top-level `build` now (one knob for both seeds): remove it, set build=")
        where[key] = build
    return e


def base_model_key(embedded: Any, bench_dir: Path, template: Template, build: int = 0) -> str:
    e = build_recipe(embedded, build)
    e.pop("eval", None)
    e["base_training"] = {k: v for k, v in e["base_training"].items() if k not in _DISPLAY_ONLY}
    # builder: the build procedure's version; bump it when the same config would train differently
    # (2: transformers' schedules), so an old cached model is rebuilt rather than reused. numerics: the packages,
    # the CPU and its code path change a build's bits, so a build made under others is another model
    return stable_hash({"embedded": e, "bench": bench_dir.name, "builder": 2, "numerics": numeric_identity(),
                        "template": template_identity(template) if isinstance(template, ChatTemplate)
                        else template.render_prompt("{q}", None, None)})  # (the key builds made before chat templates)


def ensure_base_model(embedded: Any, bench_dir: str | Path, template: Template, cache_dir: str | Path,
                      build: int = 0) -> Path:
    """Directory of the embedded base model (tokenizer + weights) of build ``build``, built and cached on first use.

    Trains a digit-aware BPE tokenizer on the benchmark's training text, builds a tiny Llama
    from ``embedded`` sizes (weights drawn under seed ``build``) and trains it on the base skill
    (one-step problems, order drawn under the same seed) with the SFT module, then records
    held-out accuracy on both skills in ``build.json``.
    """
    bench_dir = Path(bench_dir)
    final = Path(cache_dir) / "models" / f"base-{base_model_key(embedded, bench_dir, template, build)}"
    if (final / "build.json").exists():
        log.info("embedded base model (build %d) cached at %s", build, final)
        return final
    e = build_recipe(embedded, build)
    t0 = time.perf_counter()
    base_train = load_records(bench_dir / "base_train.jsonl", id_field="id")
    pool = load_records(bench_dir / "pool.jsonl", id_field="id")
    texts = [f"{r.query}\n{r.response}" for r in base_train + pool]
    if not isinstance(template, ChatTemplate):  # the tokenizer's own chat template is written in its special tokens
        texts.append(template.render_prompt("x", None, None))
    tokenizer = train_tokenizer(texts, vocab_size=e["tokenizer"]["vocab_size"])
    sizes = {k: v for k, v in e["architecture"].items()}
    model = build_tiny_model(
        e["arch"], vocab_size=len(tokenizer), seed=e["init_seed"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **sizes,
    )
    n_params = sum(p.numel() for p in model.parameters())
    bt = e["base_training"]
    samples, stats = tokenize_records(base_train, template, tokenizer, bt["max_length"])
    log.info("base training: %d samples, %.2fM parameters, %d steps × batch %d",
             len(samples), n_params / 1e6, bt["steps"], bt["batch_size"])
    pl.seed_everything(bt["seed"], workers=True, verbose=False)
    optimizer = _adamw(lr=bt["lr"], weight_decay=bt["weight_decay"], betas=tuple(bt["betas"]))
    schedule = functools.partial(get_scheduler, name="cosine_with_min_lr",
                                 scheduler_specific_kwargs={"min_lr_rate": bt["min_lr_ratio"]})
    module = SFTModule(model, optimizer, schedule, bt["warmup_ratio"])
    shown = progress.trainer_progress(bt.get("progress_bar", True), "base-model training")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=bt["steps"], max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_model_summary=False, gradient_clip_val=1.0,
        log_every_n_steps=50, **shown,
    )
    trainer.fit(module, SFTDataModule(samples, tokenizer.pad_token_id, bt["batch_size"], seed=bt["seed"]))
    train_time = time.perf_counter() - t0

    metrics = {}
    ev = e["eval"]
    for split in ("base_test", "test"):
        recs = load_records(bench_dir / f"{split}.jsonl", id_field="id", max_samples=ev["max_samples"])
        ex = SyntheticExtractor()
        golds = [ex.gold(r.raw["answer"]) for r in recs]
        preds = predict_records(model, tokenizer, recs, golds, template, ex, batch_size=ev["batch_size"],
                                max_new_tokens=ev["max_new_tokens"], progress=False)
        metrics[split] = accuracy_metrics(preds)
    tmp = temporary_dir(final)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {
            "build": build, "embedded": e, "benchmark": str(bench_dir), "n_parameters": n_params,
            "train_samples": stats.as_dict(), "train_time_s": train_time,
            "total_time_s": time.perf_counter() - t0,
            "accuracy": {k: v["accuracy"] for k, v in metrics.items()}, "metrics": metrics,
            "environment": environment(),  # float32 kernels differ by CPU: another machine builds another model
        }
        write_json_atomic(tmp / "build.json", record)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("embedded base model (build %d) built in %.0f s: base-skill accuracy %.3f, fine-tuning-skill accuracy "
             "%.3f", build, time.perf_counter() - t0, metrics["base_test"]["accuracy"], metrics["test"]["accuracy"])
    return final


def _adamw(**kw: Any):  # noqa: ANN202
    def make(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, **kw)

    return make
