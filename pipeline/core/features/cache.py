"""The HDF5 feature cache: layout, fingerprint attributes, and reading it back.

Layout (one group per split present in the index)::

    /<split>/avg         (N, C)  global average pooling of the backbone's last feature map (patch tokens only)
    /<split>/max         (N, C)  global max pooling of the same map
    /<split>/pre_logits  (N, P)  the model's own pooling path up to its classifier (pipeline/core/models/pooling.py)
    /<split>/labels      (N,)    int64 class index into the `classes` attribute
    /<split>/ids         (N,)    int64 row id in data/prepared/index.csv

A head reads one pooling (`avg`, `pre_logits`, or `catavgmax` = cat(avg, max), timm's order, not fastai's max-first;
:data:`POOLINGS`); the fine-tuned network computes the same one (pipeline/core/models/pooling.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from pipeline.core.models.feature_sets import FEATURE_SETS, pooling_datasets
from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)


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
    pre_logits: np.ndarray | None = None

    def inputs(self, pooling: str) -> np.ndarray:
        """Head inputs for a pooling (`avg`, `pre_logits`, or `catavgmax` = [avg, max]), as float32 (no copy for
        one float32 feature set; one allocation for `catavgmax`)."""
        names = pooling_datasets(pooling)
        if len(names) == 1:
            return getattr(self, names[0]).astype(np.float32, copy=False)
        return np.concatenate([getattr(self, n) for n in names], axis=1, dtype=np.float32)


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
        features = SplitFeatures(avg=g["avg"][...], max=g["max"][...], labels=g["labels"][...], ids=g["ids"][...],
                                 pre_logits=g["pre_logits"][...] if "pre_logits" in g else None)
    for name in FEATURE_SETS:
        if getattr(features, name) is not None:
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


# Rows per HDF5 read when a split is read block by block: 16,384 x 1280 float32 is 84 MB, large enough that one
# read amortises HDF5's per-call cost (64 chunks of 256 rows), small enough to be a bounded temporary.
READ_ROWS = 16_384


def split_shape(path: Path | str, split: str, pooling: str) -> tuple[int, int] | None:
    """(rows, input features) of a split's head inputs for `pooling`, or None when the file has no such split."""
    with open_features(path) as f:
        if split not in f:
            return None
        widths = [f[split][name].shape[1] for name in pooling_datasets(pooling)]
        rows = f[split]["avg"].shape[0]
    return rows, sum(widths)


def read_labels(path: Path | str, split: str) -> np.ndarray:
    """A split's int64 labels (8 bytes a row: always read whole)."""
    with open_features(path) as f:
        return f[split]["labels"][...].astype(np.int64, copy=False)


def iter_inputs(path: Path | str, split: str, pooling: str, rows: int | None = None,
                order: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (first row, float32 block of head inputs) for a split, reading only the pooling's datasets.

    Args:
        rows: rows per block; memory is one block, however large the split.
        order: the block starts to read, in this order (a shuffled epoch); default: all blocks in file order.

    Raises:
        NonFiniteFeaturesError: a block holds NaN or inf (checked per block, naming the split and dataset).
    """
    names, rows = pooling_datasets(pooling), rows or READ_ROWS
    with open_features(path) as f:
        g = f[split]
        n, cols = g["avg"].shape[0], _columns(g, names)
        starts = range(0, n, rows) if order is None else order
        for start in starts:
            stop = min(int(start) + rows, n)
            block = np.empty((stop - start, cols[-1][2]), dtype=np.float32)
            for name, lo, hi in cols:
                _read_rows(g[name], block, start, stop, 0, lo)
                check_finite_rows(block[:, lo:hi], f"{path}: split '{split}', dataset '{name}' (rows {start}-{stop - 1})")
            yield int(start), block


def _columns(g: h5py.Group, names: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(dataset, first column, end column) of each dataset in the concatenated head inputs."""
    cols, lo = [], 0
    for name in names:
        cols.append((name, lo, lo + g[name].shape[1]))
        lo += g[name].shape[1]
    return cols


def _read_rows(ds: h5py.Dataset, out: np.ndarray, start: int, stop: int, row: int, col: int) -> None:
    """Reads ds[start:stop] into out[row:, col:col + width] with no temporary for a float32 cache."""
    width = ds.shape[1]
    if ds.dtype == np.float32:  # HDF5 writes straight into the strided destination
        ds.read_direct(out, np.s_[start:stop], np.s_[row:row + stop - start, col:col + width])
    else:  # float16 cache: numpy converts one block
        out[row:row + stop - start, col:col + width] = ds[start:stop]


def read_inputs(path: Path | str, split: str, pooling: str) -> np.ndarray:
    """A split's head inputs for `pooling`, as one float32 array written in place block by block.

    Only the datasets the pooling needs are read (an `avg` head never touches `max`), and each block lands directly
    in its rows of the preallocated result: peak memory is the result plus one block of finiteness flags, not the
    two or three full copies that loading, concatenating and converting would make.

    Raises:
        NonFiniteFeaturesError: a feature is NaN or inf (the message names the split, dataset and row count).
    """
    names = pooling_datasets(pooling)
    with open_features(path) as f:
        g = f[split]
        n, cols = g["avg"].shape[0], _columns(g, names)
        out = np.empty((n, cols[-1][2]), dtype=np.float32)
        for name, lo, hi in cols:
            bad: list[np.ndarray] = []
            for start in range(0, n, READ_ROWS):
                stop = min(start + READ_ROWS, n)
                _read_rows(g[name], out, start, stop, start, lo)
                part = out[start:stop, lo:hi]
                bad.append(start + np.flatnonzero(~np.isfinite(part).all(axis=1)))
            bad_rows = np.concatenate(bad) if bad else np.empty(0, dtype=np.int64)
            if len(bad_rows):
                raise NonFiniteFeaturesError(
                    f"{path}: split '{split}', dataset '{name}' has {len(bad_rows)} of {n} rows with NaN or inf "
                    f"values (first at row {int(bad_rows[0])}); the file is damaged or the backbone overflowed: "
                    f"delete it and {RERUN}")
    return out


@dataclass(frozen=True)
class StreamedInputs:
    """A split's head inputs left in the features file, read block by block: for splits too large for memory."""

    path: Path
    split: str
    pooling: str
    shape: tuple[int, int]

    def __len__(self) -> int:
        return self.shape[0]


def input_blocks(x: np.ndarray | StreamedInputs, rows: int | None = None,
                 order: Any = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 block) over head inputs in memory (views, no copy) or streamed from the file.

    Args:
        rows: rows per block (default :data:`READ_ROWS`, read when called); the same blocks either way, so a
            computation summed block by block gives the same bits in memory and streamed.
        order: block starts (multiples of `rows`) in the order to visit them; default: file order.
    """
    rows = rows or READ_ROWS
    if isinstance(x, StreamedInputs):
        yield from iter_inputs(x.path, x.split, x.pooling, rows, order)
        return
    for start in (range(0, len(x), rows) if order is None else order):
        yield int(start), x[int(start):int(start) + rows]
