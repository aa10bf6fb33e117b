"""Process-group setup for ``torchrun`` and the few collectives the loop needs.

Launched plainly, the loop runs in one process (world size 1) and every helper here is a
no-op. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the environment)
it joins the process group: NCCL on CUDA, gloo on CPU. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from _config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's CUDA device when CUDA is available, else the CPU.

    Raises:
        ConfigError: a CUDA device is asked for but none (or not that one) is visible.
    """
    if request == "auto":
        return (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(request)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"run.device = {request!r} but CUDA is not available; use 'cpu' or 'auto'."
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"run.device = {request!r} but only {torch.cuda.device_count()} CUDA device(s) "
                f"are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
    return device


def setup(device_request: str = "auto") -> DistEnv:
    """Read the ``torchrun`` environment and join the process group when world size > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, local_rank, world_size, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks in place (identity in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
