"""Resumable fine-tuning (issue 13): a killed fine-tuning resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import signal

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from resofilter.commands import finetune
from resofilter.errors import ResoFilterError
from resofilter.training.sft import EpochBatchSampler, EpochSampler, epoch_order
from tests.conftest import compose_cfg
from tests.helpers.common import TINY_RUN, ft_overrides
from tests.helpers.faults import InjectedFault

FAULT = "tests.helpers.faults.RaiseAtStep"


class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.tolist())
        return (self.w ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lightning_order(loader: DataLoader, steps: int) -> list[list[int]]:
    module = _Recorder()
    pl.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
    return module.seen


@pytest.mark.parametrize("n", [8, 10])  # a full last batch, a partial one
def test_epoch_order_is_the_order_lightning_trained_a_shuffling_dataloader_in(n):
    """Epoch after epoch, the batches Lightning drew from DataLoader(shuffle=True, generator=seed)
    (the order the embedded base model and every earlier fine-tune saw), each epoch computable
    on its own."""
    steps = 4 * -(-n // 4)  # 4 epochs of batches of 4
    reference = _lightning_order(DataLoader(list(range(n)), batch_size=4, shuffle=True,
                                            generator=torch.Generator().manual_seed(11)), steps)
    ours = _lightning_order(DataLoader(list(range(n)), batch_sampler=EpochBatchSampler(
        EpochSampler(n, 11, batch_size=4), 4)), steps)
    assert ours == reference
    assert [i for b in reference[: -(-n // 4)] for i in b] == epoch_order(n, 11, 0, batch_size=4)
    assert len({tuple(b) for b in reference}) > -(-n // 4)  # epochs differ


def test_ranks_share_the_padded_epoch_and_skip_trained_batches():
    orders = [epoch_order(10, 3, 2, rank, 3) for rank in range(3)]
    assert all(len(o) == 4 for o in orders) and set(sum(orders, [])) == set(range(10))  # 12 slots, 2 padded
    s = EpochBatchSampler(EpochSampler(10, seed=3), 4)
    s.sampler.set_epoch(1)
    full = [list(b) for b in s]
    s.resume_at(1, 2)
    assert len(s) == 3 and [list(b) for b in s] == full[2:]  # len stays the full epoch (Lightning counts)
    assert [list(b) for b in s] == full  # the skip applies to the resumed pass only


def _run(model_dir, out, *extra):
    return finetune(compose_cfg(ft_overrides(model_dir, out, "tokenize.max_length=1024",
                                             "finetune.checkpoint_every_n_steps=2", *extra),
                                "finetune"))


def _weights(out):
    ckpt = out / "checkpoint"
    name = "adapter_model.safetensors" if (ckpt / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(ckpt / name)


CASES = {
    # 16 samples, batch 4: 4 batches an epoch; max_steps 9 runs into a third epoch
    "mid-epoch": (["finetune.max_steps=9"], 7, 6),  # killed at 7, resumes from 6: epoch 1 after batch 2
    "epoch-end": (["finetune.max_steps=9"], 5, 4),  # resumes from 4: after the last batch of epoch 0
    # 14 samples, accumulate 2: batches 4,4,4,2 → 2 steps an epoch, the second a full pair; 3 epochs = 6 steps
    "accumulate": (["data.max_samples=14", "finetune.accumulate_grad_batches=2", "finetune.budget=epochs",
                    "finetune.epochs=3", "finetune.checkpoint_every_n_steps=1"], 4, 3),
    # LoRA's dropout draws random numbers every batch
    "lora-dropout": (["finetune=lora", "finetune.lora.target_modules=[q_proj,v_proj]", "finetune.lora.r=4",
                      "finetune.lora.dropout=0.3", "finetune.budget=steps", "finetune.max_steps=7"], 5, 4),
}


# lora-dropout (~14 s: peft) runs in the slow step, keeping the default suite near 4 minutes
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "lora-dropout" else c for c in CASES])
def test_killed_finetune_resumes_to_the_uninterrupted_weights(tmp_path, tiny_model_dir, case):
    extra, kill_at, expect_from = CASES[case]
    whole = _run(tiny_model_dir, tmp_path / "whole", *extra)
    out = tmp_path / "killed"
    with pytest.raises(InjectedFault):
        _run(tiny_model_dir, out, *extra, f"+trainer.callbacks=[{{_target_: {FAULT}, step: {kill_at}}}]")
    assert not (out / "finetune.json").exists() and not (out / "checkpoint").exists()  # nothing looks finished
    assert (out / "resume" / "last.ckpt").exists()
    resumed = _run(tiny_model_dir, out, *extra)
    assert resumed["resumed_from_step"] == expect_from and resumed["steps"] == whole["steps"]
    assert not (out / "resume").exists()  # the training state goes once the output is complete
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    # the killed run's metrics stay; the resumed run logs beside them
    assert (out / "logs" / "metrics.csv").exists()
    assert (out / "logs" / f"resumed-at-step-{expect_from}" / "metrics.csv").exists()


def test_an_interrupted_fit_is_not_saved_as_finished(tmp_path, tiny_model_dir):
    """Ctrl-C or SIGTERM: Lightning stops gracefully and ``fit`` returns; the half-trained model
    must not become ``checkpoint/`` + ``finetune.json``."""
    out = tmp_path / "ft"
    handler = signal.getsignal(signal.SIGINT)
    try:  # Lightning 2.6 exits (status 1) after a KeyboardInterrupt; others returned from fit
        with pytest.raises((ResoFilterError, SystemExit), match=r"interrupted at step 3.*resume|^1$"):
            _run(tiny_model_dir, out, f"+trainer.callbacks=[{{_target_: {FAULT}, step: 3, interrupt: true}}]")
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C from then on
    assert (out / "resume" / "last.ckpt").exists()
    assert not (out / "finetune.json").exists() and not (out / "checkpoint").exists()


def test_a_finished_finetune_is_reused_and_another_config_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "ft"
    first = _run(tiny_model_dir, out, "finetune.max_steps=3")
    import resofilter.stages.finetune as stage

    monkeypatch.setattr(stage, "load_causal_lm", lambda *a, **k: pytest.fail("a finished fine-tuning reloaded"))
    assert _run(tiny_model_dir, out, "finetune.max_steps=3", "finetune.checkpoint_every_n_steps=1") == first
    with pytest.raises(ResoFilterError, match="finished fine-tuning of another configuration"):
        _run(tiny_model_dir, out, "finetune.max_steps=4")


def test_resume_state_of_another_finetune_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "ft"
    with pytest.raises(InjectedFault):
        _run(tiny_model_dir, out, f"+trainer.callbacks=[{{_target_: {FAULT}, step: 3}}]")
    with pytest.raises(ResoFilterError, match=r"resume holds the training state of another fine-tuning"):
        _run(tiny_model_dir, out, "finetune.optimizer.lr=1e-2")


def test_a_killed_run_resumes_and_a_finished_one_is_returned(tmp_path):
    """`run` killed in fine-tuning: the rerun reuses the features, resumes the fine-tuning and ends
    with the uninterrupted run's predictions; a finished run is returned as is; another setting
    in its directory is refused."""
    from resofilter.commands import run
    from tests.conftest import shrink

    def cfg(name, *extra, **more):
        return shrink(compose_cfg(["variant=reso50", *extra], "run"), tmp_path / name,
                      **{**TINY_RUN, "paths.cache_dir": str(tmp_path / "cache"), "finetune.max_steps": 6,
                         "finetune.checkpoint_every_n_steps": 2, **more})

    whole = run(cfg("whole"))
    with pytest.raises(InjectedFault):
        run(cfg("killed", **{"trainer.callbacks": [{"_target_": FAULT, "step": 5}]}))
    out = tmp_path / "killed" / "out"
    assert not (out / "results.json").exists() and (out / "finetune" / "resume" / "last.ckpt").exists()
    resumed = run(cfg("killed"))
    assert resumed["stages"]["score"]["cached"] and resumed["stages"]["finetune"]["resumed_from_step"] == 4
    assert whole["stages"]["finetune"]["resumed_from_step"] is None
    preds = [(tmp_path / d / "out" / "eval" / "predictions.jsonl").read_text() for d in ("whole", "killed")]
    assert preds[0] == preds[1] and resumed["eval"] == whole["eval"]
    assert run(cfg("killed")) == json.loads((out / "results.json").read_text())  # complete: returned as is
    with pytest.raises(ResoFilterError, match="finished run of another setting"):
        run(cfg("killed", "selection.keep_ratio=0.25"))


@pytest.mark.slow  # two W&B (offline) start-ups, ~20 s
def test_a_resumed_finetune_continues_the_killed_wandb_run(tmp_path, tiny_model_dir):
    out = tmp_path / "killed"
    logger = ["logger=wandb", "logger.name=resume-test", "finetune.max_steps=6"]
    with pytest.raises(InjectedFault):
        _run(tiny_model_dir, out, *logger, f"+trainer.callbacks=[{{_target_: {FAULT}, step: 5}}]")
    run_id = json.loads((out / "resume" / "key.json").read_text())["run_id"]
    [killed] = (out / "wandb").glob("offline-run-*")
    assert killed.name.endswith(f"-{run_id}")
    resumed = _run(tiny_model_dir, out, *logger)
    assert resumed["resumed_from_step"] == 4 and resumed["wandb_run_id"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs  # one W&B run, two segments
    # a fresh fine-tuning elsewhere gets a run of its own, though the resumed one is still open in this process
    import wandb

    assert wandb.run is not None and wandb.run.id == run_id
    other = _run(tiny_model_dir, tmp_path / "other", *logger)
    assert other["wandb_run_id"] != run_id and wandb.run.id == other["wandb_run_id"]
    [own] = (tmp_path / "other" / "wandb").glob("offline-run-*")
    assert own.name.endswith(f"-{other['wandb_run_id']}")
    wandb.finish()
