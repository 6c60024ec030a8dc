"""The two locks cannot drift apart, and `make setup` installs the one that fits the machine (tools/cpu_lock.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import cpu_lock  # noqa: E402


def _pins(path: Path) -> dict[str, str]:
    return {cpu_lock.package(line): line for line in path.read_text().splitlines() if cpu_lock.package(line)}


def test_cpu_lock_is_the_full_lock_less_exactly_the_gpu_only_packages():
    full, cpu = _pins(REPO / "requirements.lock"), _pins(REPO / "requirements-cpu.lock")
    assert set(full) - set(cpu) == set(cpu_lock.GPU_ONLY)
    assert all(full.get(name) == line for name, line in cpu.items()), "same versions, nothing the full lock lacks"
    assert cpu_lock.main(["--check"]) == 0, "requirements-cpu.lock drifted (fix: python tools/cpu_lock.py)"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("override", [None, "requirements.lock", "requirements-cpu.lock"])
def test_make_setup_installs_the_lock_that_fits_the_machine(override: str | None):
    """No NVIDIA driver (no /proc/driver/nvidia, no nvidia-smi): the CPU lock, with --no-deps; LOCK= overrides."""
    driver = Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None
    lock = override or ("requirements.lock" if driver else "requirements-cpu.lock")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "LOCK")}
    args = ["make", "-n", "-B", "setup"] + ([f"LOCK={override}"] if override else [])
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    install = next(line for line in out.splitlines() if " -r " in line and "pip install" in line)
    assert install.split()[-1] == lock and ("--no-deps" in install) == (lock == "requirements-cpu.lock"), install
    assert f"touch .venv/.installed.{lock}" in out, out
