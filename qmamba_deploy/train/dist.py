"""DistributedDataParallel under torchrun (gloo on CPU, NCCL on GPU): process info, barriers, digests."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import OptionError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (or run alone).

    GPUs use NCCL with one device per local rank; CPUs use gloo, so the
    same code path is tested on a CPU machine.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
        device = f"cuda:{local}" if world > 1 else device
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world, local, device)

def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()

def state_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

def gather_digests(model: nn.Module, info: DistInfo) -> list[str]:
    digest = state_digest(model)
    if not info.distributed:
        return [digest]

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, digest)
    return out

def cleanup_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
