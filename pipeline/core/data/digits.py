"""The offline default data set: scikit-learn's bundled handwritten digits written as an ImageFolder tree of PNGs."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def write_digits(out: Path) -> int:
    """Writes `out/<digit>/<index>.png` for every sample of `load_digits`; returns the number of files.

    The folder is built beside `out` and renamed into place, so an interrupted run leaves no partial tree.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    # load_digits stores intensities 0..16; stretch to 0..255 so the PNGs look like ordinary grey images.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for i, (img, target) in enumerate(zip(pixels, digits.target)):
            class_dir = tmp / str(int(target))
            class_dir.mkdir(exist_ok=True)
            Image.fromarray(img).save(class_dir / f"{i:04d}.png", optimize=False)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return len(pixels)
