"""What prepare learnt about each file, kept between runs, so that a grown folder re-reads only new or modified files.

Why: prepare decodes every image (a header check passes truncated files) and hashes it; on 50,000 photos that is
minutes, repeated in full whenever one photo is added. The file's size, modification time, change time (ctime) and
inode are the hint: when all four are unchanged, the recorded content hash and decode result are used without
opening the file. Size and mtime alone are not enough: `cp -p`, `rsync -t` and `touch -r` put another file of the
same size in place with the old mtime, and its old hash would be reused. ctime cannot be set back by any user tool
and every write or rename sets it (git's index keys files on it for the same reason); a replaced-by-rename file also
has a new inode. Otherwise the
file is hashed again, and the content hash is the truth: a file whose bytes were decoded before (renamed, copied,
touched) is not decoded again. Results depend on `data.max_image_pixels`, `data.max_aspect_ratio` and the image
library, so a cache made with other values of those is not used.

The cache is one JSON file outside DVC's outputs (`data.scan_cache`; `auto`: `scan_cache.json` beside the index
folder). One that cannot be read is reported in one line and ignored; delete it at any time.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.infra.artifacts import write_json

log = logging.getLogger(__name__)

VERSION = 2  # 2: files keyed on ctime and inode too (a version-1 cache is not used)


@dataclass
class ScanCache:
    """Per file: [size, mtime_ns, sha256, size, reason, ctime_ns, inode]; per content hash: (size, reason)."""

    path: Path | None
    settings: dict
    files: dict[str, list] = field(default_factory=dict)
    hashes: dict[str, list] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"unchanged": 0, "known_content": 0, "decoded": 0})
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path | None, settings: dict) -> "ScanCache":
        cache = cls(path, settings)
        if path is None or not path.is_file():
            return cache
        try:
            data = json.loads(path.read_text())
            if data.get("version") != VERSION or data.get("settings") != settings:
                log.info("prepare: scan cache %s was made with other settings; not used", path)
                return cache
            cache.files = {k: list(v) for k, v in data["files"].items()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            log.warning("prepare: scan cache %s cannot be read (%s); ignored, every file is read again", path,
                        type(exc).__name__)
            return cache
        cache.hashes = {v[2]: v[3:] for v in cache.files.values() if v[2]}
        return cache

    def lookup(self, path: Path, st: os.stat_result) -> tuple[str | None, tuple | None, str | None] | None:
        """(sha256, size, reason) recorded for this file if its size, mtime, ctime and inode are unchanged, else None."""
        hit = self.files.get(str(path))
        if hit and len(hit) == 7 and hit[:2] == [st.st_size, st.st_mtime_ns] and hit[5:] == [st.st_ctime_ns, st.st_ino]:
            self._count("unchanged")
            return hit[2], tuple(hit[3]) if hit[3] else None, hit[4]
        return None

    def known(self, digest: str) -> tuple[tuple | None, str | None] | None:
        """(size, reason) of content decoded before (under any name), else None."""
        hit = self.hashes.get(digest)
        if hit is None:
            return None
        self._count("known_content")
        return tuple(hit[0]) if hit[0] else None, hit[1]

    def remember(self, path: Path, st: os.stat_result, digest: str | None, size: tuple | None,
                 reason: str | None, decoded: bool) -> None:
        with self._lock:
            self.files[str(path)] = [st.st_size, st.st_mtime_ns, digest, list(size) if size else None, reason,
                                     st.st_ctime_ns, st.st_ino]
            if digest:
                self.hashes[digest] = [list(size) if size else None, reason]
            if decoded:
                self.counts["decoded"] += 1

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def save(self, seen: set[str]) -> None:
        """Writes the cache, keeping only the files of this scan (removed files drop out)."""
        if self.path is None:
            return
        files = {k: v for k, v in self.files.items() if k in seen}
        write_json(self.path, {"version": VERSION, "settings": self.settings, "files": files})
