"""requirements-cpu.lock: requirements.lock without the packages that only a GPU run loads.

PyPI's torch for Linux x86_64 is the CUDA build, and no CPU build of the pinned version is on PyPI. That build links
the CUDA libraries of the `nvidia-*` wheels at load time (libtorch_cuda.so needs cuBLAS, cuDNN, cuFFT, NCCL, ...), so
`import torch` fails without them even on a CPU: they stay. What a CPU never loads goes (~0.9 GB of the 6.0 GB):

- triton: torch.compile's GPU kernel compiler; torch imports it only when present, and this project never compiles.
- cuda-bindings, cuda-pathfinder: the CUDA Python bindings; torch.cuda imports them inside try/except.
- cuda-toolkit: an empty meta-package (its extras pull in the nvidia-* wheels, which the lock pins one by one).
- nvidia-nvtx: libnvtx3interop, which no torch library links or loads.

The same torch binary either way, so results are the same bytes. The lock is a complete freeze, so `make setup`
installs the CPU lock with `pip install --no-deps` (a resolver would pull the dropped packages back in).

    python tools/cpu_lock.py            # write requirements-cpu.lock from requirements.lock (`make lock` runs it)
    python tools/cpu_lock.py --check    # exit 1 if requirements-cpu.lock has drifted (tests/test_install.py)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "requirements.lock"
CPU = REPO / "requirements-cpu.lock"
GPU_ONLY = ("triton", "cuda-bindings", "cuda-pathfinder", "cuda-toolkit", "nvidia-nvtx")
HEADER = ("# requirements.lock less what only a GPU loads: " + ", ".join(GPU_ONLY) + ".\n"
          "# Written by tools/cpu_lock.py (`make lock`); `make setup` installs it (--no-deps) if no NVIDIA driver.\n")


def package(line: str) -> str | None:
    """The normalized name a `name==version` line pins, None for a comment or blank line."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==", line)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else None


def cpu_lock(full: str) -> str:
    """The CPU lock's text from the full lock's: its pins less GPU_ONLY, in the same order, under HEADER."""
    pins = [line for line in full.splitlines() if package(line)]
    missing = set(GPU_ONLY) - {package(line) for line in pins}
    if missing:  # a torch release that no longer pins one of them: review GPU_ONLY rather than drop nothing silently
        raise ValueError(f"requirements.lock pins no {sorted(missing)}; update GPU_ONLY in tools/cpu_lock.py")
    return HEADER + "".join(line + "\n" for line in pins if package(line) not in GPU_ONLY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if requirements-cpu.lock differs")
    args = parser.parse_args(argv)
    want = cpu_lock(FULL.read_text())
    if args.check:
        if not CPU.is_file() or CPU.read_text() != want:
            print("requirements-cpu.lock has drifted from requirements.lock (fix: python tools/cpu_lock.py)")
            return 1
        return 0
    CPU.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
