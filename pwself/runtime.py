"""Where a process runs: the device (:func:`resolve_device`) and data parallelism under ``torchrun`` (NCCL on
GPUs, gloo on CPU; no-ops in a single process).

Gradients are averaged by ``DistributedDataParallel`` (see :func:`pwself.step.build_step`); these helpers
cover the rest: a common branch on every rank, and gathering rows and objects.
"""

from __future__ import annotations

import gc
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from pwself.run.folder import RunFolder

__all__ = ["Preempted", "STOP_SIGNALS", "any_true", "DistInfo",
           "init_distributed", "leave_distributed", "all_true", "gather_rows", "gather_objects",
           "shard_indices", "resolve_device"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the ``torchrun`` job described by the environment, if any (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def leave_distributed() -> bool:
    """Leave the ``torchrun`` job once every rank is done; returns whether this process was rank 0 (or alone).

    A ``DistributedDataParallel`` wrapper that outlives ``destroy_process_group`` holds the gloo group, and its
    destruction at interpreter exit aborts the rank ("terminate called without an active exception", about 1
    exit in 6 under CPU load with torch 2.14). So callers drop their wrappers first and this collects the
    reference cycles they may sit in before the group goes.
    """
    if not dist.is_initialized():
        return True
    is_main = dist.get_rank() == 0
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return is_main


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_true(flag: bool, device: torch.device) -> bool:
    """``flag`` on every rank (so that all ranks take the same branch)."""
    if not _active():
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def any_true(flags: list[bool], device: torch.device) -> list[bool]:
    """Each of ``flags`` set on some rank (one all-reduce for all): every rank takes the same branches."""
    if not _active():
        return list(flags)
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_rows(x: Tensor, index: Tensor, n_total: int) -> Tensor:
    """Reassemble a tensor whose rows ``index`` were computed on this rank (no duplicates, no padding).

    Args:
        x: ``[n_local, ...]`` rows computed here.
        index: ``[n_local]`` their positions in the full tensor.
        n_total: Rows of the full tensor (every position computed by exactly one rank).

    Returns:
        The ``[n_total, ...]`` tensor, on every rank.
    """
    if not _active():
        out = x.new_empty((n_total, *x.shape[1:]))
        out[index] = x
        return out
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (x.cpu(), index.cpu()))
    out = x.new_empty((n_total, *x.shape[1:])).cpu()
    seen = torch.zeros(n_total, dtype=torch.bool)
    for rows, idx in parts:
        out[idx] = rows
        seen[idx] = True
    if not seen.all():
        raise RuntimeError(f"gather_rows: {int((~seen).sum())} of {n_total} rows computed by no rank")
    return out.to(x.device)


def gather_objects(obj: object) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_indices(n: int) -> Tensor:
    """Indices ``rank, rank + world, ...`` of ``range(n)``: every index on exactly one rank, no padding."""
    if not _active():
        return torch.arange(n)
    return torch.arange(dist.get_rank(), n, dist.get_world_size())


def resolve_device(name: str, info: DistInfo = DistInfo()) -> torch.device:
    """``auto`` -> CUDA when available; under torchrun each rank takes its local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA GPU is visible here: use --device cpu, or auto to take a GPU "
                         "when there is one")
    if device.type == "cuda" and info.world_size > 1:
        device = torch.device("cuda", info.local_rank)
    return device


class Preempted(Exception):  # noqa: N818 - the event, not a failure
    """A stop signal (SIGTERM, SIGUSR1) ended the run after a step; a checkpoint of that step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if checkpoint is not None and checkpoint.name == RunFolder(checkpoint.parent).checkpoint(step).name:
            where = f"checkpoint {checkpoint} written"
        elif checkpoint is not None:
            where = f"no checkpoint of this step (non-finite loss or exploding weights); the last good: {checkpoint}"
        else:
            where = "no checkpoint of this step (non-finite loss or exploding weights) and none before it"
        super().__init__(f"stopped by {name} after step {step}: {where}")


# SLURM sends SIGUSR1 ahead of the end of a job (`--signal`), clouds and torchrun send SIGTERM.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
