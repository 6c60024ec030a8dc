"""Portable CPU numerics: the same kernels and the same thread count on every x86-64 machine, by default.

numpy, scipy and scikit-learn (OpenBLAS, numpy's own SIMD loops) and torch (MKL for BLAS, oneDNN for convolutions,
ATen's vectorised kernels) pick their code paths per CPU when they load, so the same fp32 run gives different last
bits on an AVX-512 machine and on an AVX2 one, and a pinned result in git does not reproduce elsewhere. Each library
reads its knob once, from the environment, when it loads; so :func:`pin` writes them before numpy, scipy or torch are
imported. `pipeline/__init__.py` calls it: `python -m pipeline.<stage>`, `torchrun -m pipeline.<stage>` and any
`import pipeline...` pin first. This module is pure stdlib for that reason: it must never load numpy or torch itself.

What portable mode pins (the values override the environment's, so a stray `OPENBLAS_CORETYPE` cannot change results):

- one instruction-set baseline, x86-64-v3 (AVX2 + FMA, every x86-64 server and desktop CPU of the last decade):
  `OPENBLAS_CORETYPE=Haswell`, `ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2` (and its older name
  `DNNL_MAX_CPU_ISA`), `NPY_DISABLE_CPU_FEATURES` = numpy's AVX-512 targets, and `MKL_CBWR=COMPATIBLE`. MKL honours
  its AVX2 branch on Intel CPUs only: on AMD, `MKL_CBWR=AVX2` silently runs the AUTO branch (measured here:
  `mkl_cbwr_get` returns AUTO), so the one MKL branch that is the same code on every x86-64 vendor is COMPATIBLE (SSE2);
- one thread count, :data:`THREADS`, for torch's intra-op pool, OpenMP, MKL and OpenBLAS, with dynamic thread
  adjustment off: the split of a reduction between threads changes its rounding, so a 64-core machine must add in the
  same order as a 2-core one. 2 is the smallest machine this project runs on (its reference runs are made there), so
  no machine computes with more threads than it has cores, and a many-core machine gives up speed, not results.

`PIPELINE_NUMERICS=native` turns all of it off, for speed (each library then chooses for this CPU). It is an
environment variable, not a param, because it must act before the libraries load, before params.yaml is read.
Where a pin cannot be honoured (not x86-64, a CPU without AVX2/FMA, or numpy/torch already imported when the pin ran)
the status says why; stages log it in one line at start, and the run log (`runs/`) records it.
The pins are written to `os.environ`, so child processes inherit them (DataLoader workers, torchrun ranks, a
`dvc repro` started from a pinned Python). A child meant to run native needs `PIPELINE_NUMERICS=native` *and* the
pinned variables removed from its environment, as tests/test_numerics.py and bench/numerics.py do.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Iterable, MutableMapping
from importlib import metadata
from pathlib import Path
from typing import Any

MODE_VAR = "PIPELINE_NUMERICS"
PORTABLE, NATIVE = "portable", "native"
BASELINE = "x86-64-v3"
THREADS = 2
# What the x86-64-v3 kernels chosen below execute; a CPU without them would die of SIGILL, not merely differ.
REQUIRED_FLAGS = ("avx2", "fma")
X86_64 = ("x86_64", "amd64", "x64")
# Libraries that read the pins when they load: imported before the pin, they keep what they chose.
PINNED_LIBRARIES = ("numpy", "scipy", "sklearn", "torch")

# MKL's CNR branch codes (mkl_cbwr_get), from the oneMKL reference, "Named Constants for CNR Control".
MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 5: "SSE3", 6: "SSSE3", 7: "SSE4_1",
                8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1",
                14: "AVX512_E1"}
_MKL_STRICT = 0x10000

STATUS: dict[str, Any] = {}  # what :func:`pin` did in this process; filled when `pipeline` is imported

log = logging.getLogger(__name__)


def kernel_pins(numpy_version: str | None) -> dict[str, str]:
    """The environment that selects x86-64-v3 kernels in every numeric library this project loads."""
    return {
        "OPENBLAS_CORETYPE": "Haswell",  # OpenBLAS's AVX2 + FMA kernels (numpy's and scipy's copies alike)
        "MKL_CBWR": "COMPATIBLE",  # the only branch MKL runs the same on Intel and AMD (see the module docstring)
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "DNNL_MAX_CPU_ISA": "AVX2",  # the same knob under oneDNN's former name, for older torch builds
        "NPY_DISABLE_CPU_FEATURES": _numpy_avx512_targets(numpy_version),
    }


def thread_pins(threads: int = THREADS) -> dict[str, str]:
    """The environment that fixes every pool's thread count before it starts (torch also gets set_num_threads)."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            # MKL and OpenMP may otherwise use fewer threads than asked for, and the split changes the sums
            "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}


def _numpy_avx512_targets(version: str | None) -> str:
    """numpy's dispatch targets above x86-64-v3; their names changed in numpy 2.4 (grouped as X86_V4)."""
    try:
        major, minor = (int(p) for p in (version or "0.0").split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    if (major, minor) >= (2, 4):
        return "X86_V4 AVX512_ICL AVX512_SPR"
    return "AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The instruction-set flags of the first CPU in /proc/cpuinfo; None where there is none (macOS, Windows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def plan(environ: MutableMapping[str, str], machine: str, flags: set[str] | None, loaded: Iterable[str],
         numpy_version: str | None) -> tuple[dict[str, str], dict[str, Any]]:
    """Decides the pins from the facts given; returns (variables to set, status). Pure, for testing.

    Args:
        environ: the current environment (read only here).
        machine: `platform.machine()`.
        flags: the CPU's flags (`cpu_flags()`), or None when they cannot be read.
        loaded: names of the libraries in PINNED_LIBRARIES already imported.
        numpy_version: the installed numpy's version (selects its feature names).
    """
    raw = environ.get(MODE_VAR, PORTABLE).strip().lower() or PORTABLE
    reasons: list[str] = []
    if raw not in (PORTABLE, NATIVE):
        reasons.append(f"{MODE_VAR}={environ.get(MODE_VAR)!r} is neither {PORTABLE} nor {NATIVE}; using {PORTABLE}")
        raw = PORTABLE
    status: dict[str, Any] = {"mode": raw, "pinned": False, "baseline": None, "threads": None, "machine": machine,
                              "cpu": cpu_model(), "set": {}, "overridden": {}, "not_pinned": reasons}
    if raw == NATIVE:
        return {}, status
    updates = thread_pins()
    status["threads"] = THREADS
    if machine.lower() not in X86_64:
        reasons.append(f"not x86-64 ({machine}): instruction sets not pinned (threads are)")
    elif flags is None:
        reasons.append("CPU flags unreadable (no /proc/cpuinfo): instruction sets not pinned (threads are)")
    elif missing := [f for f in REQUIRED_FLAGS if f not in flags]:
        reasons.append(f"CPU lacks {', '.join(missing)} ({BASELINE}): instruction sets not pinned (threads are)")
    else:
        updates.update(kernel_pins(numpy_version))
        status["baseline"] = BASELINE
    early = sorted(set(loaded) & set(PINNED_LIBRARIES))
    if early:
        reasons.append(f"imported before the pin, so they keep the kernels and threads they chose: "
                       f"{', '.join(early)} (import pipeline first)")
    status["set"] = updates
    status["overridden"] = {k: environ[k] for k in updates if k in environ and environ[k] != updates[k]}
    status["pinned"] = not reasons
    return updates, status


def pin(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """Writes the pins into the environment (portable mode) and returns the status; idempotent per process.

    Must run before numpy, scipy and torch load (`pipeline/__init__.py` calls it), since each reads its knob once.
    """
    if STATUS and environ is None:
        return STATUS
    env = os.environ if environ is None else environ
    try:
        numpy_version = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        numpy_version = None
    loaded = [name for name in PINNED_LIBRARIES if name in sys.modules]
    updates, status = plan(env, platform.machine(), cpu_flags(), loaded, numpy_version)
    env.update(updates)
    if environ is None:
        STATUS.update(status)
    return status


def status_line(status: dict[str, Any]) -> str | None:
    """The one line a stage logs at start: None when everything is pinned, else what is not and why."""
    if status.get("mode") == NATIVE:
        return (f"numerics: native ({MODE_VAR}=native): kernels and thread counts are this CPU's choice "
                f"({status.get('cpu')}); results can differ in the last bits on other CPUs")
    if status.get("not_pinned"):
        return f"numerics: portable pin not fully honoured: {'; '.join(status['not_pinned'])}"
    return None


def log_status(logger: logging.Logger | None = None) -> None:
    """Logs :func:`status_line` of this process (nothing when everything is pinned)."""
    status = STATUS or pin()
    line = status_line(status)
    if line:  # native is a choice (info); a pin that did not take is a surprise (warning)
        (logger or log).log(logging.INFO if status.get("mode") == NATIVE else logging.WARNING, line)


def _mkl_branch() -> str | None:
    """MKL's CNR branch as MKL reports it (torch links MKL statically and exports its service calls)."""
    import ctypes

    torch = sys.modules["torch"]
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(path))
        code = int(lib.mkl_serv_cbwr_get(1))  # MKL_CBWR_BRANCH = 1: which branch, without the STRICT bit
        strict = int(lib.mkl_serv_cbwr_get(-1)) & _MKL_STRICT  # MKL_CBWR_ALL
    except (OSError, AttributeError):
        return None
    return MKL_BRANCHES.get(code, str(code)) + (",STRICT" if strict else "")


def in_use() -> dict[str, Any]:
    """The kernels and thread counts the libraries already loaded in this process actually use.

    Only loaded libraries are asked (loading one here would change nothing but this process's start-up time).
    """
    found: dict[str, Any] = {}
    if "numpy" in sys.modules:
        try:
            from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
            found["numpy_simd"] = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]
        except ImportError:  # numpy < 2 keeps them in numpy.core
            pass
        try:
            from threadpoolctl import threadpool_info

            pools = threadpool_info()
            found["openblas"] = sorted({f"{Path(p['filepath']).name}: {p.get('architecture')}, "
                                        f"{p['num_threads']} threads" for p in pools
                                        if p.get("internal_api") == "openblas"})
            found["openmp_threads"] = sorted({p["num_threads"] for p in pools if p.get("user_api") == "openmp"})
        except ImportError:
            pass
    if "torch" in sys.modules:
        import torch

        found["aten"] = torch.backends.cpu.get_cpu_capability()
        found["torch_threads"] = torch.get_num_threads()
        found["mkl_cbwr"] = _mkl_branch()
        # oneDNN has no query for its ISA short of its verbose log; what it was allowed is what it uses at most
        found["onednn_max_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    return found


def report() -> dict[str, Any]:
    """The status and what is in use, for the run log."""
    return {**(STATUS or pin()), "in_use": in_use()}
