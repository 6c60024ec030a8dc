"""Process-level set-up shared by every stage: logging, seeds, determinism, device, and torchrun rank.

numpy and torch are imported inside the functions that use them, not here: every stage imports this module (through
pipeline/infra/runner.py), and a stage that never computes with torch (select) should not pay its ~3 s import.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import random
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from pipeline.infra import numerics

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size as torchrun sets them; a plain `python -m` run is rank 0 of 1."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for all stages; ranks other than 0 only report warnings."""
    if dist_info().rank != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def pin_torch_threads() -> None:
    """In portable numerics, gives torch's intra-op pool the pinned thread count (pipeline/infra/numerics.py).

    OMP_NUM_THREADS set by the pin already does so when torch loads after it; this also covers a torch imported
    before `pipeline`, or a caller that changed the count since: the split of a reduction between threads changes
    its rounding, so the count is part of the result. Native mode leaves torch's own choice. A torch not imported yet
    is left to load later (under the pin's OMP_NUM_THREADS), not imported here.
    """
    threads = numerics.STATUS.get("threads")
    torch = sys.modules.get("torch")
    if threads and torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, numpy and torch; returns a torch Generator for DataLoader shuffling and worker seeds."""
    import numpy as np
    import torch

    pin_torch_threads()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def set_deterministic() -> None:
    """Deterministic kernels, TF32 off, no cuDNN autotuning and the pinned CPU thread count, so reruns give the
    same bytes on the same machine (and, with portable numerics, on other x86-64 CPUs)."""
    import torch

    pin_torch_threads()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _use_deterministic_algorithms(torch)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _use_deterministic_algorithms(torch) -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without its import of torch._inductor.config.

    Why: that import costs ~1.1 s here (a third of the heads' head-swap stage) for one flag that only torch.compile
    reads, and this project never compiles. The public call runs when the inductor is loaded already (its flag then
    follows) or when torch lacks the private setter.
    """
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


@contextlib.contextmanager
def single_threaded(enabled: bool = True, *, blas: bool = True) -> Iterator[None]:
    """Runs the block with one torch intra-op thread and one BLAS thread (OpenBLAS, numpy's and scipy's); the
    previous counts are restored after. `blas=False` leaves BLAS at its pinned count.

    For loops of many small steps (a 64-row mini-batch through the MLP head): each torch kernel over more than 32,768
    elements and each OpenBLAS call opens a parallel region whose threads must all be scheduled before it ends, which
    costs more than the second thread saves at this size, and far more on a shared machine (measured there: 16 epochs
    of the digits' MLP head 51-85 s with 2 threads, 7-11 s with 1). One fixed count is still portable numerics: the
    same reduction splits, so the same bytes, on every machine.

    `blas=False` is for loops whose cost is a few large BLAS products with element-wise torch work between them (the
    logistic-regression solver): torch's OpenMP workers spin-wait after each parallel region and take the cores from
    OpenBLAS's threads. Measured on the 2-core EPYC, one loss + gradient on 90,000 x 1280, K = 100: 0.52-0.57 s with
    torch and BLAS on 2 threads, 0.64 s on 1 and 1, 0.32-0.40 s with torch on 1 and BLAS on 2.
    """
    if not enabled:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency; only this function needs it

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if blas:
            with threadpool_limits(1, user_api="blas"):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name: str) -> torch.device:
    """`auto` picks the local CUDA device when there is one (LOCAL_RANK under torchrun), else the CPU.

    Under torchrun a bare `cuda` is this rank's GPU on its node, `cuda:LOCAL_RANK` (never the global RANK: on the
    second node of two with 4 GPUs each, RANK runs 4-7 but the GPUs are 0-3). Without it every rank of a node would
    share GPU 0, and NCCL refuses a device without an index. `cuda:N` stays the device named.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info().local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; use device: auto or cpu")
    if device.type == "cuda" and device.index is None and dist_info().world_size > 1:
        return torch.device("cuda", dist_info().local_rank)
    return device


def progress_disabled() -> bool:
    """tqdm bars only on an interactive terminal, so CI logs stay readable."""
    return not sys.stderr.isatty() or dist_info().rank != 0


@contextlib.contextmanager
def retained_heap(enabled: bool = True) -> Iterator[None]:
    """Keeps freed memory in the process heap while extracting on a CPU (glibc only); defaults restored after.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each forward pass's
    activations (150 MB per tensor at batch 32 x 224 px) come back as newly faulted, zeroed pages: measured here, half
    of a CPU forward's time was spent in the kernel (1.3 M page faults per 128 images), and turning that off made the
    Lite0 forward 2.3x faster. Only where memory is allocated changes, never the arithmetic: the bytes are the same.
    The same gain is available to any PyTorch CPU process through
    `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295` (glibc), jemalloc or tcmalloc.
    """
    libc = None
    if enabled and sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)  # no mmap: large blocks come from the heap and are reused
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # and the heap is not trimmed back after each batch
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
