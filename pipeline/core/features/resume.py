"""Checkpoints of an unfinished extraction, and the assembly of the final HDF5 file from them.

Rows are grouped into checkpoints of a fixed size counted from row 0 (whatever the batch size or the number of
torchrun ranks). Each finished checkpoint is its own small HDF5 file in `<out>.partial/`, written under a temporary
name and renamed, so it is complete or absent; `fingerprint.json` there says which settings made them, and a partial
extraction from other settings is discarded. The final file is always assembled fresh from the checkpoints, in the
same order, so its bytes do not depend on how the checkpoints came about (interrupted, resumed, several ranks).
Each checkpoint carries the SHA-256 of its arrays: a resume recomputes any checkpoint whose content no longer matches
(damaged on disk) instead of merging it into the features file.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from pipeline.core.models.feature_sets import FEATURE_SETS
from pipeline.infra.artifacts import atomic_path, check_free_space, read_json, write_json
from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)

CHUNK_ROWS = 256  # HDF5 chunk rows of the final file (full width: one row read never touches two chunks)
CHECKSUM_ATTR = "sha256"  # checkpoint attribute: SHA-256 of the feature sets (FEATURE_SETS order), then ids
_CHECKPOINT_NAME = re.compile(r"rows-(\d{10})-(\d{10})\.h5")


class CheckpointError(PipelineError, ValueError):
    """A checkpoint is missing or holds other rows than its name says; the message says what to do."""


def partial_dir(out: Path | str) -> Path:
    """Where the checkpoints of an unfinished extraction into `out` live (kept when a run is killed)."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def checkpoint_spans(n_rows: int, rows_per: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the checkpoints: fixed multiples of `rows_per` from row 0, whatever the ranks."""
    return [(start, min(start + rows_per, n_rows)) for start in range(0, n_rows, rows_per)]


def checkpoint_path(partial: Path, span: tuple[int, int]) -> Path:
    return partial / f"rows-{span[0]:010d}-{span[1]:010d}.h5"


HDF5_OVERHEAD = 1 << 20  # headers, B-trees, attributes: far below a MiB for any index, a margin on top


def features_bytes(n_rows: int, widths: dict[str, int], dtype: str) -> int:
    """Bytes that `n_rows` rows of features take on disk: every feature set, plus int64 labels and ids."""
    return n_rows * (sum(widths.values()) * np.dtype(dtype).itemsize + 16) + HDF5_OVERHEAD


def check_space_for_extraction(out: Path, rows_to_do: int, n_rows: int, widths: dict[str, int], dtype: str) -> int:
    """Raises DiskFullError unless the checkpoints still to write and the final file fit; returns the estimate.

    Both live on the same file system until the end (the checkpoints are deleted only once the file is in place).
    """
    needed = features_bytes(rows_to_do, widths, dtype) + features_bytes(n_rows, widths, dtype)
    check_free_space(out, needed, f"the features file ({n_rows:,} rows x {sum(widths.values()):,} {dtype}) and its "
                                  "checkpoints")
    return needed


def checkpoint_checksum(arrays: dict[str, np.ndarray], ids: np.ndarray) -> str:
    """SHA-256 of a checkpoint's arrays (C order bytes), so that damage on disk is seen before a merge."""
    digest = hashlib.sha256()
    for array in [arrays[k] for k in FEATURE_SETS] + [ids]:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def read_checkpoint(path: Path, span: tuple[int, int]) -> dict[str, np.ndarray]:
    """The feature sets of a checkpoint whose rows and checksum are what they should be.

    Raises:
        CheckpointError: unreadable, other rows than its name says, or content that does not match its checksum.
    """
    try:
        with h5py.File(path, "r") as c:
            arrays = {k: c[k][...] for k in FEATURE_SETS}
            ids = c["ids"][...]
            recorded = c.attrs.get(CHECKSUM_ATTR)
    except (OSError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc})") from None
    if not np.array_equal(ids, np.arange(*span)):
        raise CheckpointError(f"checkpoint {path} holds other rows than its name says")
    if recorded is None or str(recorded) != checkpoint_checksum(arrays, ids):
        raise CheckpointError(f"checkpoint {path} does not match its checksum (damaged on disk)")
    return arrays


def discard_damaged(partial: Path, spans: Sequence[tuple[int, int]]) -> list[Path]:
    """Deletes the checkpoints that fail :func:`read_checkpoint`, so a resume recomputes them; returns them.

    Run by one process (rank 0) before any rank lists the checkpoints: never two processes deleting.
    """
    removed = []
    for span in sorted(completed_spans(partial, spans)):
        path = checkpoint_path(partial, span)
        try:
            read_checkpoint(path, span)
        except CheckpointError as exc:
            log.warning("extract: %s; recomputing its rows %d-%d", exc, *span)
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _split_ranges(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Each split's [start, stop) range in index order (splits are contiguous: the index is sorted by split)."""
    ranges: dict[str, tuple[int, int]] = {}
    for i, row in enumerate(rows):
        start, _ = ranges.get(row["split"], (i, i))
        ranges[row["split"]] = (start, i + 1)
    return ranges


def create_datasets(f: h5py.File, rows: list[dict], widths: dict[str, int], dtype: str) -> dict[str, tuple[int, int]]:
    """Preallocates every split's datasets; returns each split's [start, stop) range in index order."""
    ranges = _split_ranges(rows)
    for split, (start, stop) in ranges.items():
        n = stop - start
        g = f.create_group(split)
        for name in FEATURE_SETS:  # full-width chunks: one row read never touches two chunks
            g.create_dataset(name, shape=(n, widths[name]), dtype=dtype, chunks=(min(n, CHUNK_ROWS), widths[name]))
        g.create_dataset("labels", data=np.array([int(r["label"]) for r in rows[start:stop]], dtype=np.int64))
        g.create_dataset("ids", data=np.array([int(r["id"]) for r in rows[start:stop]], dtype=np.int64))
        if "view" in rows[start]:  # a views file (pipeline/core/features/views.py): each row's view number
            g.create_dataset("view", data=np.array([int(r["view"]) for r in rows[start:stop]], dtype=np.int64))
    return ranges


def write_rows(f: h5py.File, ranges: dict[str, tuple[int, int]], pos: int, arrays: dict[str, np.ndarray]) -> None:
    """Writes rows [pos, pos + n) of the index to their splits (a block may straddle two splits)."""
    end = pos + len(arrays["avg"])
    for split, (start, stop) in ranges.items():
        lo, hi = max(pos, start), min(end, stop)
        if lo < hi:
            for name in FEATURE_SETS:
                f[split][name][lo - start:hi - start] = arrays[name][lo - pos:hi - pos]


@dataclass
class _Buffer:
    arrays: dict[str, np.ndarray]
    filled: int = 0


class CheckpointWriter:
    """Collects rows into their checkpoint's buffer; writes each checkpoint file as soon as it is complete."""

    def __init__(self, partial: Path, spans: Sequence[tuple[int, int]], widths: dict[str, int], dtype: str):
        self.partial = partial
        self.rows_per = spans[0][1] - spans[0][0] if spans else 1
        self.spans = {s[0] // self.rows_per: s for s in spans}
        self.widths = dict(widths)
        self.dtype = np.dtype(dtype)
        self._buffers: dict[int, _Buffer] = {}
        self.written = 0

    def add(self, ids: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        which = ids // self.rows_per
        for c in np.unique(which):
            start, stop = self.spans[int(c)]
            sel = which == c
            buf = self._buffers.get(int(c))
            if buf is None:
                buf = self._buffers[int(c)] = _Buffer({k: np.zeros((stop - start, w), self.dtype)
                                                       for k, w in self.widths.items()})
            for k in FEATURE_SETS:
                buf.arrays[k][ids[sel] - start] = arrays[k][sel]  # the cast to the storage dtype happens here, once
            buf.filled += int(sel.sum())
            if buf.filled == stop - start:
                self._write((start, stop), self._buffers.pop(int(c)))

    def _write(self, span: tuple[int, int], buf: _Buffer) -> None:
        needed = features_bytes(span[1] - span[0], self.widths, self.dtype.name)
        with atomic_path(checkpoint_path(self.partial, span), needed) as tmp, h5py.File(tmp, "w") as f:
            ids = np.arange(*span, dtype=np.int64)
            for k in FEATURE_SETS:
                f.create_dataset(k, data=buf.arrays[k])
            f.create_dataset("ids", data=ids)
            f.attrs[CHECKSUM_ATTR] = checkpoint_checksum(buf.arrays, ids)
        self.written += 1
        log.debug("checkpoint rows %d-%d written", *span)

    def check_complete(self) -> None:
        if self._buffers:
            raise RuntimeError(f"extract: checkpoints {sorted(self._buffers)} were left incomplete")


def prepare_partial(partial: Path, fingerprint: dict) -> None:
    """Keeps a partial extraction made with the same fingerprint; discards one made any other way."""
    fp_file = partial / "fingerprint.json"
    if partial.exists() and not partial.is_dir():
        partial.unlink()
    if partial.is_dir():
        try:
            old = read_json(fp_file)
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            differs = sorted(k for k in set(fingerprint) | set(old or {}) if (old or {}).get(k) != fingerprint.get(k))
            log.info("extract: discarding the partial extraction in %s: it was made with other settings "
                     "(differs in: %s)", partial, ", ".join(differs) if old else "unreadable fingerprint")
            shutil.rmtree(partial)
    if not partial.is_dir():
        partial.mkdir(parents=True)
        write_json(fp_file, fingerprint)


def completed_spans(partial: Path, spans: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    """Checkpoints already on disk (each was renamed into place only once complete)."""
    wanted = set(spans)
    found = set()
    for p in partial.glob("rows-*.h5"):
        m = _CHECKPOINT_NAME.fullmatch(p.name)
        if m and (int(m.group(1)), int(m.group(2))) in wanted:
            found.add((int(m.group(1)), int(m.group(2))))
    return found


def assemble(out: Path, partial: Path, spans: Sequence[tuple[int, int]], rows: list[dict], attrs: dict,
              widths: dict[str, int], dtype: str) -> None:
    """Writes the features file from the checkpoints, one checkpoint in memory at a time, and renames it into place.

    Always a fresh file written in the same order, so its bytes do not depend on how the checkpoints came about.
    """
    with atomic_path(out, features_bytes(len(rows), widths, dtype)) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            for key in sorted(attrs):
                f.attrs[key] = attrs[key]
            ranges = create_datasets(f, rows, widths, dtype)
            for span in spans:
                path = checkpoint_path(partial, span)
                if not path.is_file():
                    raise CheckpointError(f"checkpoint {path} is missing. Under multi-node torchrun, --out must be on "
                                       "a file system all nodes share; otherwise delete the folder and rerun")
                try:
                    arrays = read_checkpoint(path, span)
                except CheckpointError as exc:  # damaged after the resume check: the next run recomputes it
                    path.unlink(missing_ok=True)
                    raise CheckpointError(f"{exc}; it was deleted: rerun to recompute it") from None
                write_rows(f, ranges, span[0], arrays)
