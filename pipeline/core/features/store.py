"""The feature store: every row ever extracted, keyed by the extraction fingerprint and the image's content hash.

Why: an image folder grows (500 photos added to 50,000) and the index changes, so DVC reruns `extract`. With the
store, only images whose content hash has no row under the same fingerprint go through the backbone; the others are
copied from the store, and the features file comes out byte-identical to a from-scratch extraction (a row's bits do
not depend on its batch: pipeline/core/features/extraction.py). Removed images simply drop out of the new file.

Layout: `<extract.store>/<key>/shard-*.h5`, `key` = the first 16 hex digits of the SHA-256 of the fingerprint
(backbone, weights, preprocessing, precision, storage dtype, decoder, library versions, device type: everything a
row's bits depend on; not the index, so rows survive index changes). Each shard holds `sha256` (the images' content
hashes), the feature sets (`avg`, `max`, `pre_logits`) and `digest` (SHA-256 of each row's feature bytes), with the
fingerprint as an attribute.
Shards are written whole under a temporary name and renamed, by whichever process computed the rows, so a killed run
keeps what it finished. Nothing in a shard is trusted unchecked: a shard that cannot be read or was made with another
fingerprint is reported in one line and ignored, and a row whose digest does not match is recomputed.

Copies of one image (the same content hash several times in an index) are stored once and read once per read
(h5py reads a list of rows only when it is strictly increasing). The store is a cache: nothing that happens inside
it (an h5py error reading or writing a shard, a shard removed by another run) stops an extraction; the rows are
recomputed and the features file is the same.

The store lives outside DVC's outputs (DVC sees a deterministic stage). `extract.store_max_gb` caps it by removing
the least recently used settings (pipeline/core/features/store_space.py); `python -m pipeline.store` lists and removes them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.models.feature_sets import FEATURE_SETS
from pipeline.infra.artifacts import atomic_path

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.h5"
SETTINGS_FILE = "settings.json"  # the fingerprint; its mtime says when the settings were last used


def store_key(fingerprint: dict) -> str:
    """The store folder of a fingerprint: stable across runs and machines (sorted JSON)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def row_digest(*rows: np.ndarray) -> bytes:
    """SHA-256 (hex, as bytes) of one row's feature sets (FEATURE_SETS order) in their storage dtype."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(np.ascontiguousarray(row).tobytes())
    return digest.hexdigest().encode()


@dataclass
class _Location:
    shard: Path
    row: int


@dataclass
class FeatureStore:
    """The rows stored under one fingerprint; `rows` maps a content hash to where its row is."""

    folder: Path
    fingerprint: dict
    rows: dict[str, _Location] = field(default_factory=dict)

    @classmethod
    def open(cls, root: Path, fingerprint: dict) -> "FeatureStore":
        """Lists the usable shards under `root` for this fingerprint (reading only their hashes).

        Never raises for what it finds on disk: a shard that vanishes while listed (another run evicting these
        settings) is skipped, and one that cannot be read, whatever h5py raises, is reported in one line and left
        out, so a broken store costs recomputation, never a run."""
        store = cls(Path(root) / store_key(fingerprint), fingerprint)
        expected = json.dumps(fingerprint, sort_keys=True)
        # oldest first, so that a row recomputed after damage (in a newer shard) is the one used next time
        for shard in _shards_oldest_first(store.folder):
            try:
                with h5py.File(shard, "r") as f:
                    made_with = f.attrs.get("fingerprint")
                    hashes = [h.decode() for h in f["sha256"][...]]
                    n_rows = len(f["avg"])
            except FileNotFoundError:  # removed since it was listed: another run evicted these settings
                continue
            except Exception as exc:  # noqa: BLE001  (h5py raises OSError, KeyError, TypeError, RuntimeError, ...)
                log.warning("feature store: %s cannot be read (%s); removed, its rows will be recomputed", shard,
                            _reason(exc))
                with contextlib.suppress(OSError):
                    shard.unlink(missing_ok=True)
                continue
            if made_with != expected:
                log.warning("feature store: %s was made with another fingerprint; ignored", shard)
                continue
            if len(hashes) != n_rows:
                log.warning("feature store: %s holds %d hashes for %d rows; ignored", shard, len(hashes), n_rows)
                continue
            for i, h in enumerate(hashes):
                store.rows[h] = _Location(shard, i)
        if store.rows:
            mark_used(store.folder, fingerprint)
        return store

    def read(self, hashes: list[str], widths: dict[str, int],
             dtype: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(feature sets, ok) for the rows of `hashes`, in that order; `ok[i]` is False where the row could not be
        used: its digest does not match (damaged on disk) or its shard could not be read. Such rows must be
        recomputed; nothing here raises for what is on disk.

        `hashes` may repeat (byte-identical images anywhere in the index): each stored row is read once and handed
        to every position that asks for it, since h5py reads a list of rows only when it is strictly increasing.
        """
        by_shard: dict[Path, list[int]] = {}
        for i, h in enumerate(hashes):
            by_shard.setdefault(self.rows[h].shard, []).append(i)
        arrays = {k: np.zeros((len(hashes), widths[k]), dtype) for k in FEATURE_SETS}
        ok = np.ones(len(hashes), dtype=bool)
        for shard, listed in by_shard.items():
            positions = np.array(listed)
            stored, inverse = np.unique([self.rows[hashes[i]].row for i in listed], return_inverse=True)
            try:
                with h5py.File(shard, "r") as f:
                    got = {k: f[k][stored] for k in (*FEATURE_SETS, "digest")}
                good = np.array([row_digest(*(got[k][j] for k in FEATURE_SETS)) == bytes(got["digest"][j])
                                 for j in range(len(stored))])
                for k in FEATURE_SETS:
                    arrays[k][positions] = got[k][inverse]
            except Exception as exc:  # noqa: BLE001  (any failure of h5py or of the shard's shapes: recompute)
                log.warning("feature store: %s cannot be read (%s); recomputing its %d rows", shard, _reason(exc),
                            len(positions))
                ok[positions] = False
                continue
            ok[positions] = good[inverse]
            if not good.all():
                log.warning("feature store: %d rows of %s do not match their digest (damaged on disk); recomputing "
                            "them", int((~good).sum()), shard)
        return arrays, ok


def _reason(exc: BaseException) -> str:
    """What went wrong, in one line: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _shards_oldest_first(folder: Path) -> list[Path]:
    """The shards of a settings folder, oldest first; one removed while listed (eviction by another run) is left out."""
    found = []
    for path in folder.glob(SHARD_GLOB):
        try:
            found.append((path.stat().st_mtime_ns, path.name, path))
        except OSError:
            continue
    return [path for *_, path in sorted(found)]


class ShardWriter:
    """Collects newly computed rows and writes them to the store as shards of `rows_per_shard` rows.

    A content hash is written once per run, however many images of the index share it. A shard that cannot be
    written (full or read-only disk, a failure inside h5py) is reported in one line and the run goes on without
    adding to the store: the store only saves time, the features file never depends on it.
    """

    def __init__(self, store: FeatureStore, rows_per_shard: int, dtype: str):
        self.store = store
        self.rows_per_shard = max(1, rows_per_shard)
        self.dtype = np.dtype(dtype)
        self._hashes: list[str] = []
        self._arrays: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_SETS}
        self._seen: set[str] = set()
        self.written = 0
        self.failed = False

    def add(self, hashes: list[str], arrays: dict[str, np.ndarray]) -> None:
        keep = []
        for i, h in enumerate(hashes):
            if h not in self._seen:
                self._seen.add(h)
                keep.append(i)
        if not keep or self.failed:
            return
        self._hashes += [hashes[i] for i in keep]
        for k in FEATURE_SETS:  # the storage dtype, as in the features file
            self._arrays[k].append(np.asarray(arrays[k], dtype=self.dtype)[keep])
        if len(self._hashes) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._hashes:
            return
        hashes, arrays = self._hashes, {k: np.concatenate(v) for k, v in self._arrays.items()}
        self._hashes, self._arrays = [], {k: [] for k in FEATURE_SETS}
        path = self.store.folder / f"shard-{uuid.uuid4().hex}.h5"
        try:
            self._write(path, hashes, arrays)
        except Exception as exc:  # noqa: BLE001  (disk full, permissions, h5py: the run goes on without the store)
            log.warning("feature store: cannot write %s (%s); this run adds no more rows to the store (the features "
                        "file is not affected)", path, _reason(exc))
            self.failed = True
            return
        for i, h in enumerate(hashes):
            self.store.rows[h] = _Location(path, i)
        self.written += len(hashes)

    def _write(self, path: Path, hashes: list[str], arrays: dict[str, np.ndarray]) -> None:
        self.store.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, sum(a.nbytes for a in arrays.values()) + (1 << 20)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = json.dumps(self.store.fingerprint, sort_keys=True)
            f.create_dataset("sha256", data=np.array([h.encode() for h in hashes], dtype="S64"))
            for k in FEATURE_SETS:
                f.create_dataset(k, data=arrays[k])
            digests = [row_digest(*(arrays[k][i] for k in FEATURE_SETS)) for i in range(len(hashes))]
            f.create_dataset("digest", data=np.array(digests, dtype="S64"))
        mark_used(self.store.folder, self.store.fingerprint)


def mark_used(folder: Path, fingerprint: dict) -> None:
    """Records that the settings in `folder` were just used: `settings.json` (the fingerprint, for
    `python -m pipeline.store`) is written when missing and its modification time set to now, which is what the
    size cap's least-recently-used eviction reads. A store on a read-only disk still serves rows: failures are
    logged at debug level only."""
    path = Path(folder) / SETTINGS_FILE
    try:
        if not path.is_file():
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(fingerprint, sort_keys=True, indent=1))
        os.utime(path)
    except OSError as exc:
        log.debug("feature store: cannot mark %s as used (%s)", folder, exc)


def store_size(folder: Path) -> int:
    """Bytes the store's shards take (for the log)."""
    return sum(os.path.getsize(p) for p in Path(folder).glob(SHARD_GLOB))
