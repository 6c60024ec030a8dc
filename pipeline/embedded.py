"""Stage `embedded`: writes the offline default data set as an ImageFolder tree.

The default is scikit-learn's bundled handwritten digits (UCI optdigits test set: 1,797 real scans, 10 classes,
8x8 pixels, 17 grey levels). It ships inside scikit-learn, which the heads already need, so `dvc repro` runs on a
machine with no network at all. Images are written at their native 8x8 resolution; the backbone's preprocessing
upsamples them like any other small image.

    python -m pipeline.embedded --out data/digits
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import run_main
from pipeline.runtime import setup_logging

log = logging.getLogger("pipeline.embedded")


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.embedded",
        description="Write scikit-learn's bundled handwritten digits (1,797 images, 10 classes) as an ImageFolder "
                    "tree of 8x8 PNGs: the default data set, available with no network.")
    parser.add_argument("--out", type=Path, default=Path("data/digits"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    n = write_digits(args.out)
    log.info("embedded: wrote %d digit images to %s", n, args.out)


if __name__ == "__main__":
    run_main(main, "embedded")
