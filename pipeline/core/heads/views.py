"""Cached augmented views as extra train rows of a head (`heads.*.views`; the file: pipeline/core/features/views.py).

A head with `views: n` trains on its plain train rows plus the first n views of every train image; its train metrics,
val and test stay on the plain view. The views file must come from the same backbone, preprocessing, precision,
dtype and index as the plain features (its pixels always come through PIL, so `decode` may differ), and hold at
least n views per image: anything else is refused with the key to change, before any fit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.features.cache import StaleFeaturesError, canonical_json, open_features, read_attrs, read_inputs
from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)

# The plain fingerprint a views file must share with the features it extends (decode aside: views are PIL's).
SHARED_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "precision", "dtype", "index_sha256")
SETTING_KEYS = ("views_seed", "views_augment", "views_hflip", "views_crop_scale")


class ViewsError(PipelineError, ValueError):
    """The views a head asks for are not in the views file; the message names the key to change."""


@dataclass(frozen=True)
class TrainViews:
    """The view rows a head adds to its train rows, and what they are (for the head's record)."""

    inputs: np.ndarray  # float32 (rows, features) in the head's pooling
    labels: np.ndarray  # int64 (rows,)
    record: dict  # views per image, rows, and the augmentation settings of the views file


def load_train_views(path: Path | str, features_attrs: dict, pooling: str, count: int, key: str) -> TrainViews:
    """The first `count` views of every train image from the views file `path`, in the head's `pooling`.

    Args:
        features_attrs: the plain features file's attributes, which the views file must share (:data:`SHARED_KEYS`).
        key: the head's param (`heads.mlp.views`), for the messages.

    Raises:
        ViewsError: the file holds fewer than `count` views per image.
        StaleFeaturesError: the views were extracted with other settings or from another index than the features.
    """
    attrs = read_attrs(path)
    have = int(attrs.get("views", 0))
    if count > have:
        raise ViewsError(f"{key}: {count}, but {path} holds {have} augmented views per train image: set "
                         f"extract.views to {count} or more and run `dvc repro` (or lower {key})")
    for name in SHARED_KEYS:
        if canonical_json(attrs.get(name)) != canonical_json(features_attrs.get(name)):
            raise StaleFeaturesError(f"{path} was extracted with '{name}' = {attrs.get(name)!r}, but the features have "
                                     f"{features_attrs.get(name)!r}; run `dvc repro` to extract the views again")
    x = read_inputs(path, "train", pooling)
    with open_features(path) as f:
        view, labels = f["train"]["view"][...], f["train"]["labels"][...].astype(np.int64, copy=False)
    keep = view < count
    if not keep.all():  # the first `count` of each image's views: a copy of that many rows
        x, labels = x[keep], labels[keep]
    record = {"per_image": count, "rows": int(len(labels)), **{k: attrs.get(k) for k in SETTING_KEYS}}
    log.info("views: %d augmented train rows (%d per image, %s%s) from %s", len(labels), count,
             attrs.get("views_augment"), ", hflip" if attrs.get("views_hflip") else "", path)
    return TrainViews(x, labels, record)

