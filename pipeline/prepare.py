"""Stage `prepare`: builds the dataset index from an ImageFolder root.

The root holds one subfolder per class, or `train/`, `val/` (and optionally `test/`) folders that each hold one
subfolder per class. Without split folders the split is a deterministic stratified draw: each file's place is
decided by a hash of the seed and its relative path, so adding one image never reshuffles the others.

Outputs (in `--out`): `index.csv` (id, path, class, label, split, sha256 of the file's bytes, sorted by split then
path), `classes.json` (class list, source, counts) and `skipped.csv` (every file left out, and why).

    python -m pipeline.prepare --params params.yaml --out data/prepared
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.errors import run_main
from pipeline.errors import PipelineError
from pipeline.artifacts import atomic_path, sha256_file, write_json
from pipeline.config import DataConfig, load_section
from pipeline.runtime import progress_disabled, setup_logging

log = logging.getLogger("pipeline.prepare")

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
INDEX_FIELDS = ("id", "path", "class", "label", "split", "sha256")


class DataSourceError(PipelineError, ValueError):
    """The data source cannot be read as an ImageFolder tree; the message says what to fix."""


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the source root, POSIX separators
    cls: str
    split: str
    sha256: str


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _split_key(seed: int, rel_path: str) -> str:
    return hashlib.sha256(f"{seed}:{rel_path}".encode()).hexdigest()


def _stratified(files: list[str], cfg: DataConfig) -> dict[str, str]:
    """Assigns each file of one class to a split; at least one file always stays in train."""
    order = sorted(files, key=lambda f: _split_key(cfg.seed, f))
    n = len(order)
    n_test = min(round(cfg.test_fraction * n), max(n - 1, 0))
    n_val = min(round(cfg.val_fraction * n), max(n - 1 - n_test, 0))
    return {f: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, f in enumerate(order)}


def _check_image(path: Path) -> str | None:
    """Returns why the file cannot be used as an image, or None when PIL can decode its header."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for bad files; all mean "not an image we can read"
        return f"unreadable image: {type(exc).__name__}: {exc}"
    return None


def scan(root: Path, cfg: DataConfig) -> tuple[list[str], list[Entry], list[tuple[str, str]]]:
    """Lists classes, usable images with their split and hash, and skipped files with the reason."""
    if not root.exists():
        raise DataSourceError(f"data.source '{root}' does not exist; point it at an ImageFolder root "
                              "(one subfolder per class, or train/ val/ [test/] folders of class subfolders)")
    if not root.is_dir():
        raise DataSourceError(f"data.source '{root}' is a file; it must be a folder of class subfolders")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise DataSourceError(f"data.source '{root}' has {sorted(split_dirs)} folders but no train/ folder")
    files: list[tuple[str, str, str | None]] = []  # (rel path, class, split or None)
    if split_dirs:
        for split, folder in split_dirs.items():
            for cdir in _class_dirs(folder):
                files += [(p.relative_to(root).as_posix(), cdir.name, split) for p in _image_files(cdir)]
    else:
        for cdir in _class_dirs(root):
            files += [(p.relative_to(root).as_posix(), cdir.name, None) for p in _image_files(cdir)]
    classes = sorted({c for _, c, _ in files})
    if not classes:
        raise DataSourceError(f"data.source '{root}' holds no class subfolders with images "
                              f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")

    entries, skipped = [], []
    for rel, cls, split in tqdm(files, desc="prepare: hashing", unit="file", disable=progress_disabled()):
        path = root / rel
        reason = _check_image(path)
        if reason:
            skipped.append((rel, reason))
            continue
        entries.append(Entry(rel, cls, split or "", sha256_file(path)))

    if not split_dirs:
        by_class: dict[str, list[str]] = {}
        for e in entries:
            by_class.setdefault(e.cls, []).append(e.path)
        assign = {}
        for cls_files in by_class.values():
            assign.update(_stratified(cls_files, cfg))
        entries = [Entry(e.path, e.cls, assign[e.path], e.sha256) for e in entries]
    entries.sort(key=lambda e: (SPLITS.index(e.split), e.path))
    return classes, entries, skipped


def write_index(out: Path, source: str, classes: list[str], entries: list[Entry],
                skipped: list[tuple[str, str]]) -> None:
    """Writes index.csv, classes.json and skipped.csv; each file appears atomically."""
    label = {c: i for i, c in enumerate(classes)}
    with atomic_path(out / "index.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(INDEX_FIELDS)
            for i, e in enumerate(entries):
                w.writerow((i, e.path, e.cls, label[e.cls], e.split, e.sha256))
    with atomic_path(out / "skipped.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(("path", "reason"))
            w.writerows(sorted(skipped))
    counts = {s: {c: sum(1 for e in entries if e.split == s and e.cls == c) for c in classes}
              for s in SPLITS if any(e.split == s for e in entries)}
    write_json(out / "classes.json", {"classes": classes, "source": source, "counts": counts,
                                      "skipped": len(skipped)})


def read_index(index_dir: Path) -> tuple[list[dict[str, str]], dict]:
    """Reads index.csv rows (as dicts) and classes.json."""
    with open(Path(index_dir) / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    meta = json.loads((Path(index_dir) / "classes.json").read_text())
    return rows, meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.prepare", description=__doc__.split("\n\n")[0],
        epilog="Params (params.yaml, section data): source, val_fraction, test_fraction, seed.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("data/prepared"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg: DataConfig = load_section("data", args.params)
    try:
        classes, entries, skipped = scan(Path(cfg.source), cfg)
    except DataSourceError as exc:
        raise SystemExit(f"prepare: {exc}") from None
    write_index(args.out, cfg.source, classes, entries, skipped)
    counts = {s: sum(1 for e in entries if e.split == s) for s in SPLITS}
    log.info("prepare: %d classes, %d images (train %d, val %d, test %d), %d skipped (see %s)",
             len(classes), len(entries), counts["train"], counts["val"], counts["test"], len(skipped),
             args.out / "skipped.csv")
    if counts["val"] == 0:
        raise SystemExit("prepare: no val images; add a val/ folder or raise data.val_fraction")


if __name__ == "__main__":
    run_main(main, "prepare")
