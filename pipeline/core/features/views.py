"""Cached augmented views: K seeded augmentations of every train image, extracted once like the plain view.

DINOv2's linear evaluation trains its heads on augmented crops, recomputed each epoch; here the views are extracted
once (`extract.views: K`) into a file of their own (data/views.h5, dvc.yaml's `extract_views` stage) and any head can
add them to its train rows (`heads.*.views`), val and test always staying the plain view. A separate file, not more
rows in data/features.h5: adding or changing views then never invalidates the plain features, nor the fine-tune that
depends on them.

Each view is a row of the extraction, so it goes through the same checkpoints (resume), torchrun shares and feature
store as the plain rows. Its store key is a digest of the image's SHA-256 with the view's number and augmentation
settings (:func:`view_digest`), and its random crop and flip are seeded from that digest: a view depends on the
image's content, not on its row number, so a grown data set or a larger K reuses every view extracted before, and
duplicate images share their views.

Layout of the views file: a features file (pipeline/core/features/cache.py) whose `train` group holds the view rows,
image by image (all K views of the first train image, then the next's), with `ids` the image's row id in the index
and `view` the view's number; the attributes are the plain file's fingerprint plus the `views*` settings.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
from PIL import Image
from torchvision.transforms import Compose
from torchvision.transforms import functional as TF

from pipeline.core.data.images import train_geometry
from pipeline.core.data.preprocess import Preprocess
from pipeline.infra.artifacts import atomic_path
from pipeline.infra.config import ExtractConfig

log = logging.getLogger(__name__)

# The attributes a views file adds to the plain file's fingerprint (and the only ones a file without views has).
VIEW_KEYS = ("views", "views_seed", "views_augment", "views_hflip", "views_crop_scale")


def view_settings(cfg: ExtractConfig) -> dict:
    """The `views*` settings that change a view's pixels (and the count), as the views file records them.
    `views_crop_scale` only matters to `resized_crop`: under `shift` it is recorded as None, so changing it there
    reuses every view."""
    return {"views": cfg.views, "views_seed": cfg.views_seed, "views_augment": cfg.views_augment,
            "views_hflip": cfg.views_hflip,
            "views_crop_scale": cfg.views_crop_scale if cfg.views_augment == "resized_crop" else None}


def view_digest(image_sha256: str, view: int, settings: dict) -> str:
    """The store key of one view: SHA-256 of the image's content hash, the view's number and the settings that
    shape its pixels (the count K is left out, so view v of K = 4 is view v of K = 8)."""
    shape = {k: v for k, v in settings.items() if k != "views"}
    payload = json.dumps({"image": image_sha256, "view": view, **shape}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def view_seed(digest: str) -> int:
    """The torch seed of a view's augmentation (60 bits of its digest)."""
    return int(digest[:15], 16)


def view_rows(rows: list[dict], cfg: ExtractConfig) -> list[dict]:
    """The rows of the views file: for each train row of the index, in index order, its `cfg.views` views.

    Each keeps the image's path, label and row id (`id`); `sha256` is the view's digest (the store key), `view` its
    number and `view_seed` the seed of its augmentation. An index without content hashes (an empty column) seeds
    from the row id instead and keys nothing in the store."""
    settings = view_settings(cfg)
    out = []
    for row in rows:
        if row["split"] != "train":
            continue
        for v in range(cfg.views):
            digest = view_digest(row["sha256"] or f"row {row['id']}", v, settings)
            out.append({"id": row["id"], "path": row["path"], "label": row["label"], "split": "train",
                        "sha256": digest if row["sha256"] else "", "view": v, "view_seed": view_seed(digest)})
    return out


@dataclass(frozen=True)
class ViewAugment:
    """The fine-tune's augmentation as PIL steps, applied under a given seed: uint8 (3, S, S) pixels out, which the
    extraction normalises on the device exactly as it does the plain view (ToTensor + Normalize)."""

    steps: Compose

    @classmethod
    def from_config(cls, pre: Preprocess, cfg: ExtractConfig) -> "ViewAugment":
        return cls(Compose(train_geometry(pre, cfg.views_augment, cfg.views_crop_scale, cfg.views_hflip)))

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        # fork_rng: with 0 workers this runs in the main process, whose RNG must stay as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return TF.pil_to_tensor(self.steps(image))


def write_no_views(out: Path) -> None:
    """The views file of `extract.views: 0`: attributes only, so the heads stage always has its dependency and the
    backbone is never built for nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, 4096) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["views"] = 0
    log.info("extract: extract.views is 0: %s records no views (heads train on the plain view)", out)
