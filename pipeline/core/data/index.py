"""Reading the dataset index prepare wrote (data/prepared): index.csv rows, classes.json, and what classes.json
records for later stages (the train images' sizes, the image limits).

Apart from building the index (pipeline/core/data/scan.py), so that what only reads it (extraction, the heads'
stale-features check, evaluation) imports no folder walking and no image decoding.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.infra.artifacts import read_csv_rows
from pipeline.infra.config import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS
from pipeline.infra.errors import PipelineError

SPLITS = ("train", "val", "test")


IMAGE_SIZES_KEY = "image_sizes"  # classes.json: size statistics of the train images


INDEX_FIELDS = ("id", "path", "class", "label", "split", "sha256")


class DataSourceError(PipelineError, ValueError):
    """The data source cannot be read as an ImageFolder tree; the message says what to fix."""


@dataclass(frozen=True)
class ImageLimits:
    """Which images a stage accepts: at most `max_pixels` (width x height: the decompression-bomb guard) and a long
    side / short side of at most `max_aspect`, both checked from the header before any pixel is decoded.

    prepare takes them from params (`data.max_image_pixels`, `data.max_aspect_ratio`) and records them in
    classes.json; every later stage passes the recorded ones (:func:`image_limits`), so
    it refuses exactly what prepare skipped. Passed explicitly, never process-wide state: a DataLoader worker, forked
    or spawned, gets them with its dataset.
    """

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT_RATIO


def read_image_sizes(index_dir: Path | str) -> dict | None:
    """The train images' size statistics prepare recorded in classes.json, or None without them.

    None when the folder has no classes.json, or one written before prepare recorded sizes.
    """
    path = Path(index_dir) / "classes.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get(IMAGE_SIZES_KEY)


def read_index(index_dir: Path) -> tuple[list[dict[str, str]], dict]:
    """Reads index.csv rows (as dicts) and classes.json. Nothing else: the image limits the images were vetted under
    are in `meta` (:func:`image_limits`), for the caller to pass to whatever loads the images."""
    index_dir = Path(index_dir)
    if not (index_dir / "classes.json").is_file() or not (index_dir / "index.csv").is_file():
        raise DataSourceError(f"no dataset index in '{index_dir}' (index.csv and classes.json); run "
                              "`dvc repro prepare` (or `python -m pipeline.prepare`) first")
    rows = read_csv_rows(index_dir / "index.csv")  # undoes the formula escaping of class names and paths
    meta = json.loads((index_dir / "classes.json").read_text(encoding="utf-8"))
    return rows, meta


def image_limits(meta: dict) -> ImageLimits:
    """The limits prepare vetted the images under, as recorded in classes.json (`meta` from :func:`read_index`), so
    that every later stage loads exactly the images prepare accepted (older indexes: the params' defaults)."""
    return ImageLimits(int(meta.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)),
                       float(meta.get("max_aspect_ratio", DEFAULT_MAX_ASPECT_RATIO)))
