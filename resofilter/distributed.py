"""Rank and barrier helpers for stages that run under Lightning's DDP launcher.

Lightning starts the other ranks by re-running the command line when the first Trainer is
built; from then on every rank walks the same pipeline. Work that writes a shared file
(merging features, selection, saving the checkpoint, merging predictions) runs on rank 0
and the others wait at :func:`barrier`. Before the process group exists (a single process,
or a child rank that has not reached its first Trainer yet) the barrier is a no-op: rank 0
launched the child only after finishing everything written before it.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank: the process group's, else what the launcher put in the environment."""
    if initialized():
        return dist.get_rank()
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def rank_zero_lock(out_dir: str | os.PathLike[str], stage: str,
                   wait: bool = False) -> contextlib.AbstractContextManager[None]:
    """Rank 0 holds ``out_dir``'s writer lock (:func:`resofilter._io.output_lock`) for every rank; ``wait``: a
    directory shared by runs (the cache) is waited for instead of refused."""
    from resofilter._io import output_lock

    return output_lock(out_dir, stage, wait=wait) if is_rank_zero() else contextlib.nullcontext()


def local_device(accelerator: str) -> torch.device:
    """The device this rank computes on outside a Trainer (generation): cuda:LOCAL_RANK unless on CPU."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
