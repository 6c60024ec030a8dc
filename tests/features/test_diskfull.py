"""Disk full: extract checks free space before any work, and ENOSPC while writing (JSON/CSV, HDF5 checkpoints,
safetensors) is one line naming the path and the bytes, with no temporary left. Built on a real, small tmpfs (root
only: skipped where mounting is not allowed)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_digit_folder, write_params

from pipeline.infra.artifacts import DiskFullError, write_json


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path, leave: int) -> None:
    """Fills the file system of `folder` until about `leave` bytes are free."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "ballast", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_enospc_in_atomic_writes_is_one_line_and_leaves_no_temporary(tmp_path):
    with _tmpfs(tmp_path / "small", "256k") as small:
        _fill(small, 8192)
        with pytest.raises(DiskFullError, match=r"no space left on the device while writing '.*big.json': it needs "
                                                r"more than the [\d,]+ bytes written, [\d,]+ bytes are free"):
            write_json(small / "big.json", {"x": "y" * 100_000})
        assert sorted(p.name for p in small.iterdir()) == ["ballast"]  # no temporary left

        from pipeline.core.heads.fitting import save_head

        with pytest.raises(DiskFullError, match=r"'.*head.safetensors': it needs about 400,\d{3} bytes"):
            save_head(small / "head", torch.nn.Linear(1000, 100), {"head": "logreg"})
        assert not list((small / "head").glob("*.tmp")) and not (small / "head" / "head.safetensors").exists()

        from pipeline.core.features.resume import CheckpointWriter

        widths = {"avg": 1280, "max": 1280, "pre_logits": 1280}
        writer = CheckpointWriter(small / "partial", [(0, 64)], widths, "float32")
        (small / "partial").mkdir()
        with pytest.raises(DiskFullError, match=r"rows-0000000000-0000000064.h5': it needs about"):
            writer.add(np.arange(64), {k: np.ones((64, w), np.float32) for k, w in widths.items()})
        assert not list((small / "partial").iterdir())


@pytest.mark.slow
def test_extract_checks_free_space_before_any_work(tmp_path):
    """It used to segfault inside h5py while assembling (exit 139, no message, a temporary left)."""
    from pipeline import prepare

    digits = write_digit_folder(tmp_path / "digits", classes=3, per_class=20)
    params = write_params(tmp_path / "params.yaml", data={"source": str(digits)}, backbone={"image_size": 32},
                          extract={"workers": 0, "batch_size": 16})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "prepared")])
    with _tmpfs(tmp_path / "small", "1m") as small:
        out = small / "features.h5"
        proc = subprocess.run([sys.executable, "-m", "pipeline.extract", "--params", str(params), "--index",
                               str(tmp_path / "prepared"), "--out", str(out)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs"),
                                   "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert (f"extract: error: not enough free space for the features file (60 rows x 3,840 float32) and its "
                f"checkpoints '{out}': it needs about ") in proc.stderr
        assert "are free on its file system" in proc.stderr
        assert not list(small.glob("*.h5")) and not list(small.glob("*.partial/rows-*"))


@pytest.mark.slow
def test_dvc_failing_to_cache_an_output_is_reported(tmp_path):
    """A DVC cache on a full disk: `dvc repro` cannot store a directory output, prints 'failed to transfer' and still
    exits 0. `python -m pipeline.verify --cache` (run by `make repro` after `dvc repro`) names the output and the fix
    and exits 1; once there is room, `dvc commit --force` stores it and the check passes."""
    import yaml
    from conftest import dvc, run_cmd

    repo = tmp_path / "repo"
    repo.mkdir()
    run_cmd(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    write = ("import os; os.makedirs('outdir', exist_ok=True); "
             "[open(f'outdir/{i}.bin', 'wb').write(os.urandom(100_000)) for i in range(6)]; "
             "open('small.json', 'w').write('{}')")
    stage = {"cmd": f'python -c "{write}"', "outs": ["outdir"], "metrics": [{"small.json": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    verify = [sys.executable, "-m", "pipeline.verify", "--cache"]
    with _tmpfs(tmp_path / "cache", "256k") as cache:
        dvc(repo, "cache", "dir", str(cache))
        proc = dvc(repo, "repro", check=False)
        assert proc.returncode == 0, proc.stderr  # what the check exists for: DVC's exit status says all is well
        assert "failed to transfer" in proc.stdout + proc.stderr
        check = run_cmd(verify, repo, check=False)
        assert check.returncode == 1, check.stdout
        assert "dvc cache: outdir is NOT in the DVC cache (" in check.stdout
        assert "`dvc commit --force`" in check.stdout and "small.json" not in check.stdout
        subprocess.run(["umount", "-l", str(cache)], check=True)  # room again: a plain folder at the same path
        dvc(repo, "commit", "--force")
        check = run_cmd(verify, repo, check=False)
        assert check.returncode == 0 and "every cached output of dvc.lock is stored" in check.stdout, check.stdout
