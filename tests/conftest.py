"""Shared fixtures: real images only (scikit-learn's digits written as PNGs, and hymenoptera when present)."""
from __future__ import annotations

import os
import shutil
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
