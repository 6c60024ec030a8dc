"""The feature store: every row ever extracted, keyed by the extraction fingerprint and the image's content hash.

Why: an image folder grows (500 photos added to 50,000) and the index changes, so DVC reruns `extract`. With the
store, only images whose content hash has no row under the same fingerprint go through the backbone; the others are
copied from the store, and the features file comes out byte-identical to a from-scratch extraction (a row's bits do
not depend on its batch: pipeline/core/extraction.py). Removed images simply drop out of the new file.

Layout: `<extract.store>/<key>/shard-*.h5`, `key` = the first 16 hex digits of the SHA-256 of the fingerprint
(backbone, weights, preprocessing, precision, storage dtype, decoder, library versions, device type: everything a
row's bits depend on; not the index, so rows survive index changes). Each shard holds `sha256` (the images' content
hashes), the feature sets (`avg`, `max`, `pre_logits`) and `digest` (SHA-256 of each row's feature bytes), with the
fingerprint as an attribute.
Shards are written whole under a temporary name and renamed, by whichever process computed the rows, so a killed run
keeps what it finished. Nothing in a shard is trusted unchecked: a shard that cannot be read or was made with another
fingerprint is reported in one line and ignored, and a row whose digest does not match is recomputed.

The store lives outside DVC's outputs (DVC sees a deterministic stage) and is never pruned: delete the folder to
reclaim its space; the next extraction rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.features import FEATURE_SETS
from pipeline.infra.artifacts import atomic_path

log = logging.getLogger("pipeline.extract")

SHARD_GLOB = "shard-*.h5"


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
        """Lists the usable shards under `root` for this fingerprint (reading only their hashes)."""
        store = cls(Path(root) / store_key(fingerprint), fingerprint)
        expected = json.dumps(fingerprint, sort_keys=True)
        # oldest first, so that a row recomputed after damage (in a newer shard) is the one used next time
        for shard in sorted(store.folder.glob(SHARD_GLOB), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            try:
                with h5py.File(shard, "r") as f:
                    made_with = f.attrs.get("fingerprint")
                    hashes = [h.decode() for h in f["sha256"][...]]
                    n_rows = len(f["avg"])
            except (OSError, KeyError, ValueError) as exc:
                log.warning("feature store: %s cannot be read (%s); removed, its rows will be recomputed", shard,
                            str(exc).splitlines()[0])
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
        return store

    def read(self, hashes: list[str], widths: dict[str, int],
             dtype: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(feature sets, ok) for the rows of `hashes`, in that order; `ok[i]` is False where a row's digest does not
        match (damaged on disk): such rows must be recomputed."""
        by_shard: dict[Path, list[int]] = {}
        for i, h in enumerate(hashes):
            by_shard.setdefault(self.rows[h].shard, []).append(i)
        arrays = {k: np.zeros((len(hashes), widths[k]), dtype) for k in FEATURE_SETS}
        ok = np.ones(len(hashes), dtype=bool)
        for shard, positions in by_shard.items():
            wanted = np.array([self.rows[hashes[i]].row for i in positions])
            order = np.argsort(wanted)  # h5py reads rows by increasing index
            try:
                with h5py.File(shard, "r") as f:
                    got = {k: f[k][wanted[order]] for k in (*FEATURE_SETS, "digest")}
            except (OSError, KeyError, ValueError) as exc:
                log.warning("feature store: %s cannot be read (%s); recomputing its %d rows", shard,
                            str(exc).splitlines()[0], len(positions))
                ok[positions] = False
                continue
            targets = np.array(positions)[order]
            for k in FEATURE_SETS:
                arrays[k][targets] = got[k]
            bad = [j for j in range(len(order))
                   if row_digest(*(got[k][j] for k in FEATURE_SETS)) != bytes(got["digest"][j])]
            if bad:
                log.warning("feature store: %d rows of %s do not match their digest (damaged on disk); recomputing "
                            "them", len(bad), shard)
                ok[targets[bad]] = False
        return arrays, ok


class ShardWriter:
    """Collects newly computed rows and writes them to the store as shards of `rows_per_shard` rows."""

    def __init__(self, store: FeatureStore, rows_per_shard: int, dtype: str):
        self.store = store
        self.rows_per_shard = max(1, rows_per_shard)
        self.dtype = np.dtype(dtype)
        self._hashes: list[str] = []
        self._arrays: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_SETS}
        self.written = 0

    def add(self, hashes: list[str], arrays: dict[str, np.ndarray]) -> None:
        self._hashes += hashes
        for k in FEATURE_SETS:  # the storage dtype, as in the features file
            self._arrays[k].append(np.asarray(arrays[k], dtype=self.dtype))
        if len(self._hashes) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._hashes:
            return
        arrays = {k: np.concatenate(v) for k, v in self._arrays.items()}
        self.store.folder.mkdir(parents=True, exist_ok=True)
        path = self.store.folder / f"shard-{uuid.uuid4().hex}.h5"
        with atomic_path(path, sum(a.nbytes for a in arrays.values()) + (1 << 20)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = json.dumps(self.store.fingerprint, sort_keys=True)
            f.create_dataset("sha256", data=np.array([h.encode() for h in self._hashes], dtype="S64"))
            for k in FEATURE_SETS:
                f.create_dataset(k, data=arrays[k])
            digests = [row_digest(*(arrays[k][i] for k in FEATURE_SETS)) for i in range(len(self._hashes))]
            f.create_dataset("digest", data=np.array(digests, dtype="S64"))
        for i, h in enumerate(self._hashes):
            self.store.rows[h] = _Location(path, i)
        self.written += len(self._hashes)
        self._hashes, self._arrays = [], {k: [] for k in FEATURE_SETS}


def store_size(folder: Path) -> int:
    """Bytes the store's shards take (for the log)."""
    return sum(os.path.getsize(p) for p in Path(folder).glob(SHARD_GLOB))
