"""Stage `embedded`: writes the offline default data set as an ImageFolder tree.

The default is scikit-learn's bundled handwritten digits (UCI optdigits test set: 1,797 real scans, 10 classes,
8x8 pixels, 17 grey levels). It ships inside scikit-learn, which the heads already need, so `dvc repro` runs on a
machine with no network at all. Images are written at their native 8x8 resolution; the backbone's preprocessing
upsamples them like any other small image.

    python -m pipeline.embedded --out data/digits
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.data.digits import write_digits
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.embedded")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.embedded", __doc__, params=False)
    parser.add_argument("--out", type=Path, default=Path("data/digits"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    n = write_digits(args.out)
    log.info("embedded: wrote %d digit images to %s", n, args.out)


if __name__ == "__main__":
    run_main(main, "embedded")
