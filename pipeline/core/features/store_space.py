"""The feature store's disk: what it holds per settings, the size cap and least-recently-used eviction.

Why: every backbone, dtype or preprocessing ever extracted leaves its rows in the store (pipeline/core/features/store.py),
and a growing folder only ever adds rows, so without a cap the store grows until the disk is full. After each
extraction the store is brought under `extract.store_max_gb` by removing whole settings folders, least recently used
first; the settings just used are never removed (a cap smaller than one extraction's rows only says so in the log).
Whole settings, not rows: a settings folder is only worth keeping complete (a half-evicted one still costs a
backbone run for the missing rows), and removing a folder needs no reading or rewriting of shards.

"Last used" is the modification time of the folder's `settings.json` (set by every extraction that reads or writes
rows there), else of its newest shard. Removal is safe against a concurrent run using the same settings: its reads
fail and the rows are recomputed (the features file is unchanged), and its next shard recreates the folder.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py

from pipeline.core.features.store import SETTINGS_FILE, SHARD_GLOB
from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"[0-9a-f]{16}")  # pipeline.core.features.store.store_key
GB = 1e9


@dataclass
class SettingsEntry:
    """One settings folder of the store: its key, what the settings are, and its disk use."""

    key: str
    folder: Path
    settings: dict
    bytes: int
    shards: int
    last_used: float  # seconds since the epoch

    def describe(self) -> str:
        """The settings in a few words: backbone, weights, precision, dtype, image size, device type."""
        s = self.settings
        if not s:
            return "(settings.json missing)"
        size = ""
        try:
            size = f"{json.loads(s.get('preprocess', '{}')).get('size', '?')} px"
        except (TypeError, ValueError):
            pass
        decode = s.get("decode", "?") + (f" ({s['jpeg_decoder']})" if s.get("jpeg_decoder") else "")  # jpeg's choice
        return (f"{s.get('backbone', '?')} weights={s.get('weights', '?')} {size} {s.get('precision', '?')}/"
                f"{s.get('dtype', '?')} decode={decode} on {s.get('device_type', '?')}")


def _settings(folder: Path) -> tuple[dict, float | None]:
    path = folder / SETTINGS_FILE
    try:
        return json.loads(path.read_text()), path.stat().st_mtime
    except (OSError, ValueError):
        return {}, None


def entries(root: Path) -> list[SettingsEntry]:
    """Every settings folder under the store `root`, least recently used first (an absent root holds none)."""
    found = []
    root = Path(root)
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and KEY_PATTERN.fullmatch(p.name)):
        sizes, mtimes = 0, []
        shards = 0
        for shard in folder.glob(SHARD_GLOB):
            try:
                st = shard.stat()
            except OSError:  # removed while listed
                continue
            sizes, shards = sizes + st.st_size, shards + 1
            mtimes.append(st.st_mtime)
        settings, used = _settings(folder)
        last = used if used is not None else max(mtimes, default=folder.stat().st_mtime)
        found.append(SettingsEntry(folder.name, folder, settings, sizes, shards, last))
    return sorted(found, key=lambda e: (e.last_used, e.key))


def count_rows(entry: SettingsEntry) -> int:
    """Distinct content hashes stored for these settings (opens every shard: for listing, not for eviction)."""
    hashes: set[bytes] = set()
    for shard in entry.folder.glob(SHARD_GLOB):
        try:
            with h5py.File(shard, "r") as f:
                hashes.update(f["sha256"][...].tolist())
        except Exception:  # noqa: BLE001  (a damaged shard counts for nothing; extraction reports it when it reads it)
            continue
    return len(hashes)


def remove(entry: SettingsEntry) -> None:
    shutil.rmtree(entry.folder, ignore_errors=True)


def evict(root: Path, max_gb: float | None, keep: Path) -> list[SettingsEntry]:
    """Removes least-recently-used settings folders until the store is at most `max_gb` (None: no cap); never
    `keep` (the settings just used). Returns what was removed; one log line per removal, and one when the kept
    settings alone are over the cap. Failures to list or remove are logged, never raised (the store is a cache)."""
    if max_gb is None:
        return []
    try:
        listed = entries(root)
    except OSError as exc:
        log.warning("feature store: cannot list %s to apply extract.store_max_gb (%s)", root, exc)
        return []
    cap = max_gb * GB
    total = sum(e.bytes for e in listed)
    removed = []
    for entry in listed:
        if total <= cap:
            break
        if entry.folder.resolve() == Path(keep).resolve():
            continue
        remove(entry)
        total -= entry.bytes
        removed.append(entry)
        log.info("feature store: removed the rows of %s (%s, %.1f MB, last used %s) to keep %s under "
                 "extract.store_max_gb = %g", entry.key, entry.describe(), entry.bytes / 1e6,
                 when(entry.last_used), root, max_gb)
    if total > cap:
        log.warning("feature store: %s holds %.2f GB, over extract.store_max_gb = %g, in the settings just used "
                    "alone; kept (raise extract.store_max_gb, or set extract.store: null)", root, total / GB, max_gb)
    return removed


def when(timestamp: float) -> str:
    """A local date and time to the minute, for the log and the listing."""
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


class StoreError(PipelineError, ValueError):
    """A store command that cannot be done as asked (no store, an unknown key); the message says what to do."""


def store_root(store: str | None, index_dir: Path) -> Path:
    """The store folder `extract.store` names (`auto`: `feature_store/` beside the index folder: data/feature_store
    for data/prepared).

    Why beside the index and not beside the features file: every extraction of one index (the main one and each
    sweep backbone, whose files lie in other folders) must share one store, so that a backbone is never extracted
    twice, whichever stage extracts it.

    Raises:
        StoreError: `extract.store` is null (there is no store).
    """
    if store is None:
        raise StoreError("extract.store is null: there is no feature store (give its folder with --store)")
    return Path(index_dir).parent / "feature_store" if store == "auto" else Path(store)


def list_store(root: Path) -> list[str]:
    """The listing of `python -m pipeline.store`: one line per settings, most recently used first, and a total."""
    listed = entries(root)
    if not listed:
        return [f"feature store {root}: empty"]
    lines = [f"feature store {root}: {len(listed)} settings, {sum(e.bytes for e in listed) / 1e6:.1f} MB "
             "(most recently used first)"]
    for e in reversed(listed):
        lines.append(f"  {e.key}  {count_rows(e):>8} rows  {e.bytes / 1e6:>9.1f} MB  last used {when(e.last_used)}  "
                     f"{e.describe()}")
    return lines


def remove_settings(root: Path, keys: list[str], keep_newest: int | None = None) -> list[SettingsEntry]:
    """Removes the settings `keys` and, with `keep_newest`, all but the that many most recently used ones.

    Raises:
        StoreError: a key the store does not hold (nothing is removed then), or a negative `keep_newest`.
    """
    listed = entries(root)
    by_key = {e.key: e for e in listed}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise StoreError(f"the feature store {root} holds no settings {', '.join(unknown)}; it holds "
                         f"{', '.join(by_key) or 'nothing'} (python -m pipeline.store lists them)")
    if keep_newest is not None and keep_newest < 0:
        raise StoreError(f"--remove-all-but {keep_newest}: give a number of settings to keep, 0 or more")
    chosen = {k: by_key[k] for k in keys}
    if keep_newest is not None:
        chosen.update({e.key: e for e in listed[:max(0, len(listed) - keep_newest)]})
    for entry in chosen.values():
        remove(entry)
        log.info("feature store: removed %s (%s, %.1f MB)", entry.key, entry.describe(), entry.bytes / 1e6)
    return list(chosen.values())
