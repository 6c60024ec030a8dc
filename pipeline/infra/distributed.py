"""torchrun support: one code path for one process and for many.

Rank and world size come from the environment torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`); a plain
`python -m pipeline.<stage>` is rank 0 of 1 and never touches torch.distributed. NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import contextlib
import datetime
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.infra.runtime import DistInfo, dist_info


@contextlib.contextmanager
def process_group(device: torch.device, timeout: datetime.timedelta | None = None
                  ) -> Iterator[tuple[DistInfo, Callable[[], None]]]:
    """Under torchrun, initialises the process group (and tears it down); yields this rank and a `barrier`.

    In one process it yields rank 0 of 1 and a barrier that does nothing. No barrier runs on the way out: after an
    error on one rank, a barrier there would hang the others.
    """
    info = dist_info()
    if info.world_size == 1:
        yield info, lambda: None
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, **({"timeout": timeout} if timeout else {}))

    def barrier() -> None:
        dist.barrier(device_ids=[device.index]) if backend == "nccl" else dist.barrier()

    try:
        yield info, barrier
    finally:
        dist.destroy_process_group()


def broadcast_from_main(value: object) -> object:
    """Rank 0's `value` on every rank (a picklable object); identity in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(value: object) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank; `[value]` in one process.

    Every rank gets the same list, so a decision taken from it (stop with an error) is taken by all ranks alike and
    none is left waiting at a barrier for a rank that stopped.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums numbers over ranks (for epoch totals); identity in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
