"""Shared fixtures: real images only (scikit-learn's digits written as PNGs, and hymenoptera when present)."""
from __future__ import annotations

# First import: pins the CPU numerics (pipeline/infra/numerics.py) before numpy, scipy or torch load in this process, so
# the in-process tests compute with the same kernels and thread count as the stages' own subprocesses.
import pipeline  # noqa: F401  (imported for its side effect)

# isort: split
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = Path(os.environ.get("HYMENOPTERA_DIR", REPO.parent / "shared" / "data" / "hymenoptera_data"))


def write_digit_folder(root: Path, classes: int = 3, per_class: int = 10, size: int | None = None) -> Path:
    """An ImageFolder of real handwritten digits (the first `per_class` of each of the first `classes` digits).

    `size` upsamples the 8x8 images (nearest) so that tests can exercise crops larger than the source.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.target == c)[:per_class]:
            im = Image.fromarray(pixels[i])
            if size:
                im = im.resize((size, size), Image.NEAREST)
            im.save(root / str(c) / f"{i:04d}.png")
    return root


@pytest.fixture
def digit_folder(tmp_path: Path) -> Path:
    return write_digit_folder(tmp_path / "digits")


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not (HYMENOPTERA / "train").is_dir() or not (HYMENOPTERA / "val").is_dir():
        pytest.skip(f"hymenoptera data set not found at {HYMENOPTERA} (set HYMENOPTERA_DIR to its location)")
    return HYMENOPTERA


def copy_hymenoptera_slice(src: Path, dst: Path, per_class: int) -> Path:
    """The first `per_class` files of each class in each split of hymenoptera, same layout."""
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            files = sorted(p for p in (src / split / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
            for p in files[:per_class]:
                shutil.copy2(p, dst / split / cls / p.name)
    return dst


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package), for tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_params(path: Path, **sections: dict) -> Path:
    """A params.yaml: the repository's, with the given sections' keys overridden."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        for key, value in values.items():
            node = params.setdefault(section, {})
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


TINY = dict(
    data={"val_fraction": 0.25, "test_fraction": 0.25},
    backbone={"image_size": 32},
    extract={"workers": 0, "batch_size": 16},
    heads={"mlp.epochs": 30, "mlp.patience": 5, "mlp.hidden": [32]},
    finetune={"epochs": 1, "batch_size": 8, "workers": 0},
    sweep={"backbones": []},  # the default: no sweep; test_compare.py runs it
)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> dict[str, Path]:
    """prepare + extract, through the stages' own entry points, on 3 digit classes x 16 images at 32 px."""
    from pipeline import extract, prepare  # the stages' own entry points

    root = tmp_path_factory.mktemp("tiny")
    digits = write_digit_folder(root / "digits", classes=3, per_class=16)
    params = write_params(root / "params.yaml", **{**TINY, "data": {**TINY["data"], "source": str(digits)}})
    prepare.main(["--params", str(params), "--out", str(root / "prepared")])
    extract.main(["--params", str(params), "--index", str(root / "prepared"), "--out", str(root / "features.h5")])
    return {"root": root, "params": params, "index": root / "prepared", "features": root / "features.h5"}


def dvc_env() -> dict[str, str]:
    """Environment for DVC subprocesses: this interpreter's bin first (stage commands say `python`), a git identity."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
               GIT_COMMITTER_EMAIL="test@example.com", DVC_NO_ANALYTICS="1", PYTHONPATH=str(REPO))
    return env


def run_cmd(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=dvc_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cmd([str(Path(sys.executable).parent / "dvc"), *args], repo, check)


def make_dvc_repo(root: Path, **sections: dict) -> Path:
    """A fresh git + DVC repository holding this project's pipeline, dvc.yaml and params (overridden), committed."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy2(REPO / name, root / name)
    write_params(root / "params.yaml", **sections)
    run_cmd(["git", "init", "-q", "-b", "main"], root)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.autostage", "true")
    run_cmd(["git", "add", "-A"], root)
    run_cmd(["git", "commit", "-qm", "pipeline"], root)
    return root


def finetune_run(params: Path, index: Path, features: Path, heads_dir: Path, selected: Path, out: Path,
                 metrics: Path, live: Path | None = None) -> dict:
    """The fine-tune stage's work with the sections of `params` (what `python -m pipeline.finetune` does)."""
    from pipeline.core.finetune.training import run_finetune
    from pipeline.infra.config import load_section

    return run_finetune(load_section("finetune", params), load_section("backbone", params),
                        load_section("extract", params), index, features, heads_dir, selected, out, metrics, live)


@pytest.fixture(autouse=True)
def _pipeline_info_logs(caplog):
    """The stages' INFO lines (counts, choices) are part of what tests check; `run_main` sets this up for real runs."""
    import logging

    caplog.set_level(logging.INFO, logger="pipeline")
