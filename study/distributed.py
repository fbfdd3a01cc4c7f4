"""torch.distributed for ``torchrun``: one process per rank, gloo on CPU, nccl on GPUs, no-ops when alone.

``torchrun --nproc_per_node N run_study.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR;
``init_from_env`` joins that group. Without those variables (or with WORLD_SIZE=1) every helper
answers as a single process would, so the same code runs on one CPU, many CPUs and many GPUs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(*, backend: str | None = None) -> bool:
    """Join the process group torchrun describes; return True when running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, *, src: int = 0):
    """``obj`` from rank ``src`` on every rank (e.g. a path or an error message decided on rank 0)."""
    if not _active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def device_for_rank(device: str) -> str:
    """``cuda`` -> ``cuda:<local rank>`` when distributed, so each rank drives its own GPU."""
    if device == "cuda" and world_size() > 1:
        return f"cuda:{local_rank()}"
    return device
