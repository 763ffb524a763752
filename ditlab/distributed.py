"""torch.distributed set-up and the few collectives the scripts use."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditlab.errors import UsageError

#################################################################################
#                              Distributed set-up                               #
#################################################################################


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(device=None):
    """Join the torchrun process group (NCCL on GPUs, gloo on CPUs), or run as a single process.

    device: "cuda", "cpu" or None (CUDA when available).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return DistInfo(rank, world_size(), local_rank, dev)


def world_size():
    """The number of processes torchrun started (WORLD_SIZE), 1 without torchrun; readable before joining."""
    return int(os.environ.get("WORLD_SIZE", 1))


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src=0):
    """Send a small picklable Python object from rank `src` to every rank (identity when not distributed)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj):
    """Every rank's picklable `obj`, as a list in rank order, on every rank ([obj] when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_global_batch(global_batch_size, world_size):
    """The local batch: the global batch split evenly over the processes; UsageError for a split that is
    not exact."""
    if global_batch_size % world_size:
        raise UsageError(
            f"--global-batch-size {global_batch_size} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    return global_batch_size // world_size
