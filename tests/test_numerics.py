"""Portable CPU numerics (pipeline/infra/numerics.py): the pins take effect, override the environment, and make the heads
and the fine-tune byte-identical under settings that would otherwise select other kernels ("another CPU").

The stages run as real subprocesses (`python -m pipeline.<stage>`), because the pins act when the libraries load.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO

from pipeline.core.heads.selection import select_head
from pipeline.infra import numerics
from pipeline.infra.artifacts import write_json

# Settings another machine, or a user's shell, might have: each selects other kernels or another thread count.
ANOTHER_CPU = {
    "OPENBLAS_CORETYPE": "Sandybridge",  # OpenBLAS's AVX (no AVX2/FMA) kernels
    "ATEN_CPU_CAPABILITY": "default",  # ATen without SIMD
    "MKL_CBWR": "SSE4_2",  # MKL's SSE4.2 branch on Intel; AUTO elsewhere
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",  # numpy's loops at its x86-64-v2 baseline
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
}
KNOBS = (*ANOTHER_CPU, numerics.MODE_VAR, "DNNL_MAX_CPU_ISA", "MKL_DYNAMIC", "OMP_DYNAMIC")
V3_CPU = {"avx", "avx2", "fma", "sse4_2"}
HERE_IS_V3 = (platform.machine().lower() in numerics.X86_64
              and set(numerics.REQUIRED_FLAGS) <= (numerics.cpu_flags() or set()))
needs_v3 = pytest.mark.skipif(not HERE_IS_V3, reason="needs an x86-64 CPU with AVX2 and FMA")


def _env(mode: str, **extra: str) -> dict[str, str]:
    """This process's environment without any numerics knob (the pytest process itself is pinned), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(PYTHONPATH=str(REPO), PIPELINE_NUMERICS=mode, **extra)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- the decision alone -------------------------------------------------------------------------------------------

def test_portable_pins_override_the_environment():
    env = {"OPENBLAS_CORETYPE": "Sandybridge", "OMP_NUM_THREADS": "64"}
    updates, status = numerics.plan(env, "x86_64", V3_CPU, [], "2.4.6")
    assert updates["OPENBLAS_CORETYPE"] == "Haswell" and updates["ATEN_CPU_CAPABILITY"] == "avx2"
    assert updates["MKL_CBWR"] == "COMPATIBLE" and updates["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert updates["NPY_DISABLE_CPU_FEATURES"] == "X86_V4 AVX512_ICL AVX512_SPR"
    assert {updates[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")} == {"2"}
    assert status["pinned"] and status["baseline"] == "x86-64-v3" and status["threads"] == 2
    assert status["overridden"] == {"OPENBLAS_CORETYPE": "Sandybridge", "OMP_NUM_THREADS": "64"}
    assert numerics.status_line(status) is None  # fully pinned: nothing to log
    assert "AVX512_SKX" in numerics.plan({}, "x86_64", V3_CPU, [], "2.2.1")[0]["NPY_DISABLE_CPU_FEATURES"]


def test_native_sets_nothing():
    updates, status = numerics.plan({"PIPELINE_NUMERICS": "native"}, "x86_64", V3_CPU, [], "2.4.6")
    assert updates == {} and status["mode"] == "native" and not status["pinned"]
    assert "native" in numerics.status_line(status)


@pytest.mark.parametrize("machine, flags, loaded, reason", [
    ("aarch64", {"asimd"}, [], "not x86-64 (aarch64)"),
    ("x86_64", {"avx", "sse4_2"}, [], "CPU lacks avx2, fma"),
    ("x86_64", None, [], "CPU flags unreadable"),
    ("x86_64", V3_CPU, ["torch", "numpy"], "imported before the pin, so they keep the kernels and threads they "
                                           "chose: numpy, torch"),
])
def test_what_cannot_be_pinned_is_said(machine, flags, loaded, reason):
    updates, status = numerics.plan({}, machine, flags, loaded, "2.4.6")
    assert not status["pinned"] and reason in numerics.status_line(status)
    assert updates["OMP_NUM_THREADS"] == "2"  # threads are pinned everywhere
    # kernels only where the CPU runs x86-64-v3 code: Haswell kernels on an older CPU would die of SIGILL
    assert ("OPENBLAS_CORETYPE" in updates) == (machine == "x86_64" and flags is not None and "avx2" in flags)


def test_unknown_mode_falls_back_to_portable():
    _, status = numerics.plan({"PIPELINE_NUMERICS": "fast"}, "x86_64", V3_CPU, [], "2.4.6")
    assert status["mode"] == "portable" and "'fast'" in numerics.status_line(status)


# --- the pins in effect -------------------------------------------------------------------------------------------

@needs_v3
@pytest.mark.skipif(numerics.STATUS.get("mode") == "native", reason="PIPELINE_NUMERICS=native: nothing is pinned")
def test_this_pytest_process_is_pinned():
    """conftest imports `pipeline` before numpy: the in-process tests compute pinned too."""
    import numpy  # noqa: F401  (loaded anyway by conftest's imports; here for threadpoolctl to see OpenBLAS)

    report = numerics.report()
    assert report["pinned"], report["not_pinned"]
    assert all(": Haswell, 2 threads" in lib for lib in report["in_use"]["openblas"])


PROBE = """
import pipeline, json, numpy, scipy.linalg, torch, threadpoolctl
from pipeline.infra import numerics
with torch.no_grad():  # a convolution large enough for torch to hand to oneDNN, which logs its ISA on first use
    torch.nn.Conv2d(3, 8, 3)(torch.randn(2, 3, 16, 16))
print("PROBE " + json.dumps({"status": numerics.STATUS, "in_use": numerics.in_use(),
                             "pools": threadpoolctl.threadpool_info(),
                             "aten": torch.backends.cpu.get_cpu_capability()}))
"""


def _probe(env: dict[str, str], tmp_path: Path) -> tuple[dict, str]:
    """Runs PROBE; returns what it printed and oneDNN's verbose lines (its ISA, and the kernel the conv ran)."""
    proc = _run(["-c", PROBE], {**env, "ONEDNN_VERBOSE": "1"}, tmp_path)
    line = next(s for s in proc.stdout.splitlines() if s.startswith("PROBE "))
    onednn = "\n".join(s for s in proc.stdout.splitlines() if "info,cpu,isa:" in s or "exec,cpu,convolution" in s)
    return json.loads(line[len("PROBE "):]), onednn


@pytest.mark.slow
@needs_v3
def test_pins_take_effect_in_a_subprocess(tmp_path):
    """threadpoolctl, torch, MKL and oneDNN report the pinned kernels and threads, whatever the environment says."""
    probe, onednn_isa = _probe(_env("portable", **ANOTHER_CPU), tmp_path)
    openblas = [p for p in probe["pools"] if p["internal_api"] == "openblas"]
    assert openblas and all(p["architecture"] == "Haswell" and p["num_threads"] == 2 for p in openblas)
    assert all(p["num_threads"] == 2 for p in probe["pools"] if p["user_api"] == "openmp")
    assert probe["aten"] == "AVX2" and probe["in_use"]["torch_threads"] == 2
    assert probe["in_use"]["mkl_cbwr"] == "COMPATIBLE"
    assert probe["in_use"]["numpy_simd"] == ["X86_V3"]
    conv = onednn_isa.split("convolution,", 1)[-1].split(",", 1)[0]  # the kernel's name, e.g. jit:avx2
    assert "isa:Intel AVX2\n" in onednn_isa and "avx2" in conv and "avx512" not in conv, onednn_isa
    assert probe["status"]["overridden"]["OPENBLAS_CORETYPE"] == "Sandybridge"

    native, onednn_native = _probe(_env("native", **ANOTHER_CPU), tmp_path)
    assert native["aten"] == "DEFAULT" and native["in_use"]["mkl_cbwr"] != "COMPATIBLE"
    assert {p["architecture"] for p in native["pools"] if p["internal_api"] == "openblas"} == {"Sandybridge"}
    assert "isa:Intel SSE4.1" in onednn_native and native["in_use"]["torch_threads"] == 1


# --- "another CPU": the stages' outputs -------------------------------------------------------------------------

def _chain(cache: dict[str, Path], out: Path, env: dict[str, str], finetune: bool) -> dict[str, bytes]:
    """heads@logreg and heads@mlp (and a one-epoch fine-tune from the better head) as subprocesses; their files."""
    common = ["--params", str(cache["params"]), "--features", str(cache["features"]), "--index", str(cache["index"])]
    env = {**env, "PIPELINE_RUN_DIR": str(out / "runs")}
    stderr = ""
    for head in ("logreg", "mlp"):
        proc = _run(["-m", "pipeline.heads", head, *common, "--out", str(out / "heads" / head),
                     "--metrics", str(out / "metrics" / f"{head}.json")], env, out.parent)
        stderr += proc.stderr
    if finetune:
        metrics = {h: json.loads((out / "metrics" / f"{h}.json").read_text()) for h in ("logreg", "mlp")}
        write_json(out / "selected.json", select_head(metrics))
        proc = _run(["-m", "pipeline.finetune", *common, "--heads-dir", str(out / "heads"),
                     "--selected", str(out / "selected.json"), "--out", str(out / "finetune"),
                     "--metrics", str(out / "metrics" / "finetune.json"), "--live", "none"], env, out.parent)
        stderr += proc.stderr
    (out / "stderr.txt").write_text(stderr)
    skip = {"runs", "stderr.txt"}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not skip & set(p.relative_to(out).parts)}


def _side_by_side(cache: dict[str, Path], here: Path, there: Path, mode: str,
                  finetune: bool) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """:func:`_chain` in this machine's environment and in ANOTHER_CPU's, at the same time (half the wall time).

    Running both at once also checks that the bytes do not depend on how busy the machine is.
    """
    with ThreadPoolExecutor(2) as pool:  # each thread only waits on its subprocesses
        jobs = [pool.submit(_chain, cache, here, _env(mode), finetune),
                pool.submit(_chain, cache, there, _env(mode, **ANOTHER_CPU), finetune)]
        return jobs[0].result(), jobs[1].result()


@pytest.mark.slow
@needs_v3
def test_another_cpu_gives_the_same_bytes_only_when_pinned(tiny_cache, tmp_path):
    """Pinned, every output is byte-identical under another CPU's settings; native, the heads' outputs differ.

    The fine-tune's model.json holds every epoch's train and val loss, so it changes with any bit of the trained
    weights even where the best checkpoint is the warm start (epoch 0) and model.safetensors is the head's.
    """
    plain, other = _side_by_side(tiny_cache, tmp_path / "pinned", tmp_path / "pinned_other", "portable", True)
    expected = {"heads/logreg/head.json", "heads/logreg/head.safetensors", "heads/mlp/head.json",
                "heads/mlp/head.safetensors", "metrics/logreg.json", "metrics/mlp.json", "metrics/finetune.json",
                "finetune/model.safetensors", "finetune/model.json", "selected.json"}
    assert expected <= set(plain) and set(plain) == set(other)
    assert [k for k in plain if plain[k] != other[k]] == []
    assert len(json.loads(plain["finetune/model.json"])["history"]) == 2  # the warm start and one trained epoch

    # the run log says what was pinned and what the environment asked for; the stage logged no numerics line
    record = json.loads((tmp_path / "pinned_other" / "runs" / "manual" / "heads.json").read_text())
    assert record["numerics"]["pinned"] and record["numerics"]["overridden"]["OPENBLAS_CORETYPE"] == "Sandybridge"
    assert record["numerics"]["in_use"]["aten"] == "AVX2"
    assert "numerics:" not in (tmp_path / "pinned_other" / "stderr.txt").read_text()

    native, native_other = _side_by_side(tiny_cache, tmp_path / "native", tmp_path / "native_other", "native", False)
    differ = [k for k in native if native[k] != native_other[k]]
    assert {"heads/logreg/head.safetensors", "heads/mlp/head.safetensors"} & set(differ), \
        "native mode under another CPU's settings gave the same heads: the test cannot tell pinned from not"
    assert "numerics: native" in (tmp_path / "native" / "stderr.txt").read_text()
    native_record = json.loads((tmp_path / "native" / "runs" / "manual" / "heads.json").read_text())
    assert native_record["numerics"]["mode"] == "native"


def test_set_deterministic_turns_torch_deterministic_without_importing_the_inductor():
    """set_deterministic gives what torch.use_deterministic_algorithms(True, warn_only=True) gives, in a fresh
    process, without that call's ~1.1 s import of torch._inductor.config (a flag only torch.compile reads)."""
    code = ("import sys, torch; from pipeline.infra.runtime import set_deterministic; set_deterministic(); "
            "print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), "
            "'torch._inductor.config' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "False"]
