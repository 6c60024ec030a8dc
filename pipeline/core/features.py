"""The HDF5 feature cache: layout, fingerprint attributes, and reading it back.

Layout (one group per split present in the index)::

    /<split>/avg     (N, C)  global average pooling of the backbone's last feature map
    /<split>/max     (N, C)  global max pooling of the same map
    /<split>/labels  (N,)    int64 class index into the `classes` attribute
    /<split>/ids     (N,)    int64 row id in data/prepared/index.csv

Concat pooling is `cat(avg, max)` (timm's `catavgmax` order, not fastai's max-first); the MLP head and the
fine-tuned network use the same order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from pipeline.infra.errors import PipelineError

log = logging.getLogger("pipeline.features")

POOLINGS = ("avg", "catavgmax")
# What each checked attribute follows in params.yaml, for messages that say what to look at.
_SOURCE_OF = {"backbone": "backbone.name", "weights": "backbone.weights",
              "preprocess": "backbone.name / backbone.image_size (auto: the train images' sizes)",
              "precision": "extract.precision", "dtype": "extract.dtype", "decode": "extract.decode",
              "index_sha256": "the dataset index (index.csv)"}
RERUN = "run `dvc repro` (or `python -m pipeline.extract`) to extract them again"


class FeaturesFileError(PipelineError, OSError):
    """The features file is missing, unreadable or locked; the message says what to do."""


class NonFiniteFeaturesError(PipelineError, ValueError):
    """The features file holds NaN or inf values: damaged on disk, or a backbone that overflowed."""


class StaleFeaturesError(PipelineError, ValueError):
    """The features file was made with other settings than the current params (or another index)."""


def _is_lock_error(exc: OSError) -> bool:
    # HDF5 reports flock() failures as "unable to lock file, errno = 11 (EAGAIN) / 37 (ENOLCK) / 38 (ENOSYS)";
    # whole words only, since other messages mention e.g. "sblock->base_addr"
    return re.search(r"\block(ing|ed)?\b", str(exc), flags=re.IGNORECASE) is not None


@contextlib.contextmanager
def open_features(path: Path | str, mode: str = "r") -> Iterator[h5py.File]:
    """Opens the HDF5 features file, turning the usual failures into one actionable message.

    Raises:
        FeaturesFileError: missing file, not an HDF5 file (e.g. left half-written by an old run), or a lock that
            cannot be taken: held by a writer, or not supported by a network file system (then the message names
            HDF5_USE_FILE_LOCKING=FALSE).
    """
    path = Path(path)
    try:
        f = h5py.File(path, mode)
    except FileNotFoundError:
        raise FeaturesFileError(f"features file '{path}' not found; {RERUN.replace('again', 'first')}") from None
    except OSError as exc:
        if _is_lock_error(exc):
            raise FeaturesFileError(
                f"cannot lock HDF5 file '{path}' ({exc}). Another process may be writing it (wait for it to "
                "finish), or the file system (NFS, SMB, some FUSE mounts) does not support HDF5's file locking: "
                "there, set HDF5_USE_FILE_LOCKING=FALSE in the environment and run again") from None
        raise FeaturesFileError(f"'{path}' cannot be read as an HDF5 features file ({exc}); {RERUN}") from None
    with f:
        yield f


@dataclass
class SplitFeatures:
    avg: np.ndarray
    max: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def inputs(self, pooling: str) -> np.ndarray:
        """Head inputs for a pooling: `avg` (C) or `catavgmax` = [avg, max] (2C), as float32."""
        if pooling == "avg":
            return self.avg.astype(np.float32)
        if pooling == "catavgmax":
            return np.concatenate([self.avg, self.max], axis=1).astype(np.float32)
        raise ValueError(f"unknown pooling '{pooling}'; choose one of {POOLINGS}")


def read_attrs(path: Path | str) -> dict:
    """The fingerprint attributes of a features file, JSON strings decoded."""
    with open_features(path) as f:
        return {k: _decode(v) for k, v in f.attrs.items()}


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_split(path: Path | str, split: str) -> SplitFeatures | None:
    """Loads one split into memory, or None when the file has no such split.

    Raises:
        NonFiniteFeaturesError: a feature is NaN or inf. Checked on every read because a few damaged bytes
            otherwise train a head on garbage (or keep its initial weights) and still exit 0.
    """
    with open_features(path) as f:
        if split not in f:
            return None
        g = f[split]
        features = SplitFeatures(avg=g["avg"][...], max=g["max"][...], labels=g["labels"][...], ids=g["ids"][...])
    for name in ("avg", "max"):
        check_finite_rows(getattr(features, name), f"{path}: split '{split}', dataset '{name}'")
    return features


def check_finite_rows(values: np.ndarray, where: str) -> None:
    """Raises NonFiniteFeaturesError naming `where` and how many rows hold NaN or inf."""
    bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if bad.any():
        raise NonFiniteFeaturesError(
            f"{where} has {int(bad.sum())} of {len(values)} rows with NaN or inf values (first at row "
            f"{int(np.flatnonzero(bad)[0])}); the file is damaged or the backbone overflowed: delete it and {RERUN}")


def splits_in(path: Path | str) -> list[str]:
    with open_features(path) as f:
        return [s for s in ("train", "val", "test") if s in f]


def canonical_json(value: Any) -> str:
    """Compares JSON-like values by content (tuples and lists alike, key order ignored)."""
    return json.dumps(value, sort_keys=True, default=str)


def expected_fingerprint(backbone, extract, index_dir: Path | str | None = None) -> dict[str, Any]:
    """The fingerprint attributes that extraction with these params would write (weights hash aside).

    Cheap: no weights are loaded (the preprocessing is resolved from the architecture's config). The index hash is
    included only when `index_dir` holds an index.csv. `backbone.image_size` must be resolved (not `auto`): see
    :func:`resolve_for_check`.
    """
    from pipeline.core.backbone import resolve_preprocess
    from pipeline.infra.artifacts import sha256_file

    expected: dict[str, Any] = {"backbone": backbone.name, "weights": backbone.weights,
                                "precision": extract.precision, "dtype": extract.dtype}
    if getattr(extract, "decode", None) is not None:  # decode path: PIL or torchvision JPEG, not bitwise the same
        expected["decode"] = extract.decode
    expected["preprocess"] = resolve_preprocess(backbone).to_dict()
    if index_dir is not None and (Path(index_dir) / "index.csv").is_file():
        expected["index_sha256"] = sha256_file(Path(index_dir) / "index.csv")
    return expected


def check_fingerprint(path: Path | str, attrs: dict, expected: dict) -> None:
    """Raises StaleFeaturesError naming the first attribute whose recorded value differs from `expected`."""
    for key, want in expected.items():
        have = attrs.get(key)
        if canonical_json(have) != canonical_json(want):
            detail = ""
            if isinstance(have, dict) and isinstance(want, dict):
                diff = sorted(k for k in set(have) | set(want)
                              if canonical_json(have.get(k)) != canonical_json(want.get(k)))
                detail = " (" + ", ".join(f"{k}: {have.get(k)!r} vs {want.get(k)!r}" for k in diff) + ")"
            raise StaleFeaturesError(
                f"{path} is stale: its attribute '{key}' is {have!r}, but {_SOURCE_OF.get(key, key)} now gives "
                f"{want!r}{detail}. The features were extracted with other settings; {RERUN}")


def resolve_for_check(backbone, index_dir: Path | str | None, attrs: dict) -> tuple[Any, str]:
    """`backbone` with `image_size` resolved as extraction resolved it, and why, for checking a features file.

    With the index's image sizes (classes.json), `auto` is resolved exactly as extraction does. Without them (a heads
    run given no index) the images are unknown: the features' own size is accepted when it is one `auto` can give
    (the weights' own, or a multiple of 32 from 96 below it), and the rest of the preprocessing (resize, mean, std,
    interpolation) is still compared; any other size is compared with the weights' own, and so reported stale.
    """
    from pipeline.core.backbone import auto_sizes, native_size, resolve_image_size
    from pipeline.core.dataset import read_image_sizes

    sizes = read_image_sizes(index_dir) if index_dir is not None else None
    if backbone.image_size != "auto" or sizes is not None:
        return resolve_image_size(backbone, sizes)
    native = native_size(backbone.name)
    pre = attrs.get("preprocess")
    recorded = pre.get("size") if isinstance(pre, dict) else None
    if recorded in auto_sizes(native):
        return (dataclasses.replace(backbone, image_size=recorded),
                f"backbone.image_size: auto, no index to read the train images' sizes from; the features' "
                f"{recorded} px is a size auto gives for these weights")
    return (dataclasses.replace(backbone, image_size=native),
            "backbone.image_size: auto, no index to read the train images' sizes from; compared with the weights' own")


def verify_features(path: Path | str, backbone, extract, index_dir: Path | str | None = None) -> dict:
    """Checks the features file against the current params (and index); returns its attributes.

    `backbone` and `extract` are the params' BackboneConfig and ExtractConfig; `backbone.image_size: auto` is
    resolved from the index's image sizes (:func:`resolve_for_check`), and the size used is logged.
    """
    attrs = read_attrs(path)
    resolved, why = resolve_for_check(backbone, index_dir, attrs)
    if backbone.image_size != resolved.image_size:  # a rule (auto, null) was resolved: say to what
        log.info("stale-features check: image size %d px (%s)", resolved.image_size, why)
    check_fingerprint(path, attrs, expected_fingerprint(resolved, extract, index_dir))
    return attrs
