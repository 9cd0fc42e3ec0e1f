"""torch.distributed set-up for runs started with torchrun (one process per device)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> ProcessInfo:
    """Joins the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...);
    a plain single process otherwise. NCCL on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ProcessInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    return ProcessInfo(rank, world_size, local_rank)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (``flag`` itself in a single process). Every
    process must call it at the same point: a decision to stop, taken by one process alone,
    would leave the others waiting in the next collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    agreed = torch.tensor([float(flag)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return bool(agreed.item())
