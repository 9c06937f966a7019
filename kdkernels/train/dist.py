"""The process group of the trainer: under ``torchrun`` (``WORLD_SIZE > 1`` in the environment)
every process trains the same model on its own batches (``DistributedDataParallel``, or FSDP2
with ``--fsdp``, in :func:`kdkernels.train.loop.fit`), so every rank takes the same optimizer step.
gloo on the CPU, NCCL on GPUs. Rank 0 alone writes metrics, checkpoints and the table; these
helpers are the few collectives the loop needs besides those."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["setup", "teardown", "rank", "world", "is_main", "barrier", "gather_objects",
           "all_mean"]


def setup(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def all_mean(value: float) -> float:
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world()


def gather_objects(obj) -> list:
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
