"""torchrun support: one code path for one process and for many.

Rank and world size come from the environment torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); a plain
`python -m pipeline.<stage>` is rank 0 of 1 and never touches torch.distributed. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

from pipeline.runtime import DistInfo, dist_info


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[DistInfo]:
    """Initialises the process group when launched by torchrun (and tears it down); yields this process's rank."""
    info = dist_info()
    started = False
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        started = True
    try:
        yield info
    finally:
        if started:
            dist.barrier()
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums numbers over ranks (for epoch totals); identity in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
