"""The dataset index: an ImageFolder root scanned into `index.csv` (+ classes, skipped files, duplicates), and
reading it back.

The root holds one subfolder per class, or split folders (`train/`, `val/` or `valid/` or `validation/`, optionally
`test/`) that each hold one subfolder per class. Without split folders the split is a deterministic stratified draw:
each file's place is decided by a hash of the seed and its relative path, so adding one image never reshuffles the
others. Every file is decoded once, in full, with the loader extraction uses, so a file in the index can be read later;
the train images' sizes are recorded in classes.json (`image_sizes`), for `backbone.image_size: auto`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.core.data.index import IMAGE_SIZES_KEY, INDEX_FIELDS, SPLITS, DataSourceError
from pipeline.core.data.scan_cache import ScanCache
from pipeline.infra.artifacts import sha256_file, write_csv, write_json
from pipeline.infra.config import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS, DataConfig
from pipeline.infra.runtime import progress_disabled

log = logging.getLogger(__name__)

# Folder names read as the val split: val/ (torchvision tutorials), valid/ (fastai, Kaggle), validation/ (Keras).
VAL_FOLDERS = ("val", "valid", "validation")
# pipeline.core.data.images (and PIL) are imported inside the functions that read images, not here: they
# take ~0.4 s to import, which what only needs the folder rules (IMAGE_EXTENSIONS for predict) skips.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DUPLICATE_FIELDS = ("sha256", "path", "class", "split")
HIDDEN = "hidden"  # reasons starting with this are listed but never an error under data.on_bad_file: error
LOG_EXAMPLES = 5


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the source root, POSIX separators
    cls: str
    split: str
    sha256: str


@dataclass(frozen=True)
class Candidate:
    """A file with an image extension, found in a class folder, not yet decoded."""

    path: str
    cls: str
    split: str | None  # None: no split folders; the stratified draw decides


@dataclass
class ScanResult:
    """What :func:`scan` found: the classes, usable images, files left out (path, reason) and warnings."""

    classes: list[str]
    entries: list[Entry]
    skipped: list[tuple[str, str]]
    warnings: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    image_sizes: dict = field(default_factory=dict)  # see image_size_stats


@dataclass(frozen=True)
class Checked:
    """One candidate after decoding: its sha256 and (width, height) when usable, else the reason it is not."""

    sha256: str | None = None
    reason: str | None = None
    size: tuple[int, int] | None = None


def _printable(rel: str) -> str:
    """A path that can be written as UTF-8 even when the file name is not (undecodable bytes shown as escapes)."""
    return rel.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as lone surrogates
        return False
    return True


# Never scanned, whatever data.follow_links says: the whole file system, or kernel and device trees whose "files"
# are endless or block (a walk of / ended in a PermissionError traceback; /proc never ends).
SYSTEM_FOLDERS = ("/", "/proc", "/sys", "/dev", "/run")
FOLLOW_LINKS = "data.follow_links"


def _system_folder(real: str) -> str | None:
    """The system folder `real` (a resolved path) is, or lies under; None for an ordinary folder."""
    if real == "/":
        return "/"
    return next((s for s in SYSTEM_FOLDERS[1:] if real == s or real.startswith(s + os.sep)), None)


def _inside(real: str, root_real: str) -> bool:
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def link_refusal(path: Path | str, root_real: str, policy: str, kind: str = "folder") -> str | None:
    """Why the symlinked folder (or file) `path` must not be followed under `policy`, or None when it may be.

    Why a policy at all: a link inside a class folder to a system folder put foreign images into a class with
    exit 0, and DVC does not hash files behind a symlinked folder (files added there never rerun prepare). `inside`
    (the default) follows links only to what lies under data.source, so prepare never reads outside it unless
    `all` allows it; a link into a system folder (/dev/zero, /proc/...) is never followed.
    """
    if not os.path.islink(path):
        return None
    real = os.path.realpath(path)
    system = _system_folder(real)
    if system is not None:
        where = f"the system folder {system}" if real == system else f"{real} in the system folder {system}"
        return f"symlinked {kind} to {where}; never {'scanned' if kind == 'folder' else 'read'}"
    if policy == "none":
        return f"symlinked {kind}; not followed ({FOLLOW_LINKS}: none)"
    if policy == "inside" and not _inside(real, root_real):
        return (f"symlinked {kind} leads outside data.source (to {real}); not followed: copy the images in, or set "
                f"{FOLLOW_LINKS}: all (DVC does not see changes behind such a link)")
    return None


def _walk_class(class_dir: Path, root: Path, cls: str, split: str | None,
                skipped: list[tuple[str, str]], follow_links: str = "inside") -> list[Candidate]:
    """Files with an image extension anywhere under `class_dir` (nested folders and symlinked folders included).

    Hidden files and folders, broken symlinks, other extensions and undecodable names are added to `skipped`.
    Symlinked folders are followed once, and only as `follow_links` allows (:func:`link_refusal`): a link back up
    the tree, outside the root or to a system folder is listed, not followed.
    """
    root_real = os.path.realpath(root)
    found: list[Candidate] = []
    visited: set[str] = set()
    top = os.path.realpath(class_dir)
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        rel_dir = Path(os.path.relpath(dirpath, root)).as_posix()
        if real in visited:
            skipped.append((rel_dir + "/", "symlinked folder already scanned; not scanned again"))
            dirnames[:] = []
            continue
        visited.add(real)
        keep = []
        for d in sorted(dirnames):
            target = os.path.realpath(os.path.join(dirpath, d))
            refusal = link_refusal(os.path.join(dirpath, d), root_real, follow_links)
            if d.startswith("."):
                skipped.append((f"{rel_dir}/{d}/", f"{HIDDEN} folder; not scanned"))
            elif refusal:
                skipped.append((f"{rel_dir}/{d}/", refusal))
            elif top == target or top.startswith(target + os.sep):  # would rescan the class (or other classes)
                skipped.append((f"{rel_dir}/{d}/", "symlinked folder loops back to a folder above it; not scanned"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            rel = f"{rel_dir}/{name}"
            path = Path(dirpath) / name
            # a broken link is reported as such, wherever it pointed
            reason = (path.exists() and link_refusal(path, root_real, follow_links, "file")) or _file_reason(path, name)
            if reason:
                skipped.append((rel, reason))
            else:
                found.append(Candidate(rel, cls, split))
    return found


def _file_reason(path: Path, name: str) -> str | None:
    """Why a file is left out before decoding, or None when it is worth decoding."""
    if name.startswith("."):
        return f"{HIDDEN} file"
    if not path.exists():
        return "broken symlink (its target does not exist)"
    if not path.is_file():
        return "not a regular file"
    if not _is_utf8(name):
        return "file name is not valid UTF-8; rename it"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (extension '{path.suffix or '(none)'}'; allowed: " \
               f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
    return None


def _class_dirs(folder: Path, root: Path, skipped: list[tuple[str, str]], follow_links: str = "inside") -> list[Path]:
    """Class folders of `folder`; hidden folders, loose files and refused symlinked folders are listed in `skipped`."""
    dirs = []
    root_real = os.path.realpath(root)
    for p in sorted(folder.iterdir()):
        rel = Path(os.path.relpath(p, root)).as_posix()
        if p.is_dir():
            refusal = link_refusal(p, root_real, follow_links)
            if p.name.startswith("."):
                skipped.append((rel + "/", f"{HIDDEN} folder; not scanned"))
            elif refusal:
                skipped.append((rel + "/", refusal))
            else:
                dirs.append(p)
        elif p.name.startswith("."):
            skipped.append((rel, f"{HIDDEN} file"))
        else:
            skipped.append((rel, "not in a class folder (images must be in <class>/ subfolders)"))
    return dirs


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders of `root` by split (`val` from any of VAL_FOLDERS); empty when it holds class folders.

    valid/ and validation/ count only beside a train/ folder: without one they are more likely classes (a `valid` vs
    `invalid` classifier) than a split layout missing its train part. val/ and test/ alone stay an error, as before.
    """
    found = {name: root / name for name in ("train", *VAL_FOLDERS, "test") if (root / name).is_dir()}
    if "train" not in found:
        strict = sorted(f"{name}/" for name in found if name in ("val", "test"))
        if strict:
            raise DataSourceError(f"data.source '{root}' has {' and '.join(strict)} but no train/ folder; add "
                                  "train/ (split folders), or put every class folder directly under the root")
        return {}
    vals = [name for name in VAL_FOLDERS if name in found]
    if len(vals) > 1:
        raise DataSourceError(f"data.source '{root}' has both {' and '.join(f'{v}/' for v in vals)}: both would be "
                              "the val split; keep one (merge them or move one out of the root)")
    dirs = {"train": found["train"]}
    if vals:
        dirs["val"] = found[vals[0]]
    if "test" in found:
        dirs["test"] = found["test"]
    return dirs


def _find_candidates(root: Path, follow_links: str = "inside"
                     ) -> tuple[dict[str, Path], list[str], list[Candidate], list[tuple[str, str]]]:
    """Walks the ImageFolder tree; returns split folders, class folder names, candidates and skipped files.

    Raises:
        DataSourceError: the root is missing, a file, a system folder (/, /proc, ...) or holds no class folders.
    """
    if not root.exists():
        raise DataSourceError(f"data.source '{root}' does not exist; point it at an ImageFolder root "
                              "(one subfolder per class, or train/ val/ [test/] folders of class subfolders)")
    if not root.is_dir():
        raise DataSourceError(f"data.source '{root}' is a file; it must be a folder of class subfolders")
    system = _system_folder(os.path.realpath(root))
    if system is not None:
        raise DataSourceError(f"data.source '{root}' is the system folder {os.path.realpath(root)}; it is never "
                              "scanned: point data.source at the folder that holds your class folders")
    split_dirs = _split_folders(root)
    split_names = {folder.name for folder in split_dirs.values()}
    skipped: list[tuple[str, str]] = []
    candidates: list[Candidate] = []
    class_names: set[str] = set()
    if split_dirs:
        for p in sorted(root.iterdir()):
            if p.name not in split_names:
                kind = "folder" if p.is_dir() else "file"
                why = (f"{HIDDEN} {kind}" if p.name.startswith(".")
                       else f"{kind} beside the train/val/test folders; not scanned")
                skipped.append((Path(os.path.relpath(p, root)).as_posix() + ("/" if p.is_dir() else ""), why))
        for split, folder in split_dirs.items():
            for cdir in _class_dirs(folder, root, skipped, follow_links):
                class_names.add(cdir.name)
                candidates += _walk_class(cdir, root, cdir.name, split, skipped, follow_links)
    else:
        for cdir in _class_dirs(root, root, skipped, follow_links):
            class_names.add(cdir.name)
            candidates += _walk_class(cdir, root, cdir.name, None, skipped, follow_links)
    if not class_names:
        loose = sum(1 for path, _ in skipped if Path(path).suffix.lower() in IMAGE_EXTENSIONS)
        detail = (f"its {loose} image files lie directly in it" if loose else "it holds no folders")
        raise DataSourceError(f"data.source '{root}' has no class subfolders ({detail}); put each class's images in "
                              "its own subfolder: <source>/<class>/<image>, or <source>/train/<class>/<image>")
    return split_dirs, sorted(class_names), candidates, skipped


def _split_key(seed: int, rel_path: str) -> str:
    return hashlib.sha256(f"{seed}:{rel_path}".encode()).hexdigest()


def _stratified(files: list[str], cfg: DataConfig) -> dict[str, str]:
    """Assigns each file of one class to a split; at least one file always stays in train."""
    order = sorted(files, key=lambda f: _split_key(cfg.seed, f))
    n = len(order)
    n_test = min(round(cfg.test_fraction * n), max(n - 1, 0))
    n_val = min(round(cfg.val_fraction * n), max(n - 1 - n_test, 0))
    return {f: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, f in enumerate(order)}


def check_image(path: Path, max_pixels: int, max_aspect: float = DEFAULT_MAX_ASPECT_RATIO,
                cache: ScanCache | None = None) -> Checked:
    """The sha256 and size (as loaded: EXIF rotation applied) of a usable image, or why a file cannot be used.

    Decodes every pixel with the loader extraction uses: a header check alone passes truncated files. With a
    `cache` (pipeline/core/data/scan_cache.py), a file with unchanged size, mtime, ctime and inode is not opened, and
    content decoded before is not decoded again.
    """
    try:
        st = path.stat()
        if st.st_size == 0:
            return Checked(reason="empty file (0 bytes)")
        hit = cache.lookup(path, st) if cache is not None else None
        if hit is not None:
            return Checked(sha256=hit[0] if not hit[2] else None, size=hit[1], reason=hit[2])
        digest = sha256_file(path)
    except OSError as exc:
        return Checked(reason=f"cannot read: {exc.strerror or exc}")
    known = cache.known(digest) if cache is not None else None
    if known is not None:
        size, reason = known
    else:
        from pipeline.core.data.images import BadImageError, load_rgb  # see the note above IMAGE_EXTENSIONS

        try:
            size, reason = load_rgb(path, max_pixels, max_aspect).size, None
        except BadImageError as exc:
            size, reason = None, exc.reason
    if cache is not None:
        cache.remember(path, st, digest, size, reason, decoded=known is None)
    return Checked(reason=reason) if reason else Checked(sha256=digest, size=size)


def _decode_all(root: Path, candidates: list[Candidate], max_pixels: int,
                max_aspect: float = DEFAULT_MAX_ASPECT_RATIO, cache: ScanCache | None = None) -> list[Checked]:
    """check_image over every candidate, in threads (PIL and hashlib release the GIL while they work)."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda c: check_image(root / c.path, max_pixels, max_aspect, cache), candidates)
        return list(tqdm(results, total=len(candidates), desc="prepare: decoding", unit="file",
                         disable=progress_disabled()))


def _duplicates(entries: list[Entry]) -> tuple[dict[str, list[Entry]], dict[str, int]]:
    """Groups of byte-identical files, and counts: files leaking into a later split, label conflicts, and the rest."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(e.sha256, []).append(e)
    groups = {sha: g for sha, g in groups.items() if len(g) > 1}
    across = conflicts = within = 0
    for g in groups.values():
        first = min(SPLITS.index(e.split) for e in g)
        # a val/test image whose bytes are also in an earlier split is scored on what the model trained (or chose) on
        across += sum(1 for e in g if SPLITS.index(e.split) > first)
        within += len(g) - len({e.split for e in g})
        conflicts += len({e.cls for e in g}) > 1
    return groups, {"across_splits": across, "within_split": within, "label_conflicts": conflicts}


def image_size_stats(sizes: list[tuple[int, int]], split: str = "train") -> dict:
    """Short and long side (pixels: min, median, max) of a split's images, for `backbone.image_size: auto`.

    The median, not the mean: a few huge or tiny files among ordinary photos should not move the crop size.
    """
    stats: dict = {"split": split, "images": len(sizes)}
    for name, pick in (("short_side", min), ("long_side", max)):
        sides = [pick(size) for size in sizes]
        stats[name] = ({"min": min(sides), "median": float(statistics.median(sides)), "max": max(sides)}
                       if sides else None)
    return stats


def _no_val_message(root: Path, split_dirs: dict[str, Path], cfg: DataConfig) -> str:
    """Why there are no val images, with the fix that applies: split folders ignore data.val_fraction."""
    accepted = ", ".join(f"{name}/" for name in VAL_FOLDERS)
    if "val" in split_dirs:
        return (f"no val images: the {split_dirs['val'].name}/ folder of data.source '{root}' holds no usable images "
                "(see skipped.csv); put class folders of images in it")
    if split_dirs:
        found = ", ".join(f"{folder.name}/" for folder in split_dirs.values())
        return (f"no val images: data.source '{root}' has split folders ({found}) but no val folder; add one named "
                f"any of {accepted} (with split folders, data.val_fraction is not used)")
    return (f"no val images: data.val_fraction = {cfg.val_fraction} (with data.test_fraction = {cfg.test_fraction}) "
            f"leaves no class a val image; raise data.val_fraction, add images, or use split folders (train/ and "
            f"one of {accepted})")


def _check_classes(classes: list[str], class_names: list[str], entries: list[Entry], root: Path) -> list[str]:
    """Raises on class sets a classifier cannot use; returns warnings for the ones it can, with gaps."""
    warnings: list[str] = []
    empty = [c for c in class_names if c not in classes]
    if empty:
        warnings.append(f"class folders with no usable images, left out: {', '.join(empty)}")
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise DataSourceError(f"data.source '{root}' has {found} of its class folders with usable images; "
                              "a classifier needs at least 2 classes")
    present = {s: {e.cls for e in entries if e.split == s} for s in SPLITS}
    untrained = [c for c in classes if c not in present["train"]]
    if untrained:
        raise DataSourceError(f"classes {untrained} have images in val/test but none in train; a classifier cannot "
                              "learn them: add train images or remove those folders")
    for split in ("val", "test"):
        if present[split]:
            missing = [c for c in classes if c not in present[split]]
            if missing:
                warnings.append(f"classes absent from {split} (their {split} accuracy is not measured): "
                                f"{', '.join(missing)}")
    return warnings


def _check_candidates(root: Path, candidates: list[Candidate], cfg: DataConfig, cache_file: Path | None) -> list:
    """Each candidate decoded (or its check taken from the scan cache): hash, size, or why it is unusable."""
    import PIL  # see the note above IMAGE_EXTENSIONS

    cache = ScanCache.load(cache_file, {"max_image_pixels": cfg.max_image_pixels,
                                        "max_aspect_ratio": cfg.max_aspect_ratio, "pillow": PIL.__version__})
    checks = _decode_all(root, candidates, cfg.max_image_pixels, cfg.max_aspect_ratio, cache)
    if cache_file is not None:
        cache.save({str(root / c.path) for c in candidates})
        log.info("prepare: %d files unchanged since the last scan (size, mtime, ctime, inode), %d with content seen "
                 "before, %d decoded (scan cache %s)", cache.counts["unchanged"], cache.counts["known_content"],
                 cache.counts["decoded"], cache_file)
    return checks


def _usable(candidates: list[Candidate], checks: list, skipped: list[tuple[str, str]]
            ) -> tuple[list[Entry], dict[str, tuple[int, int]], list[tuple[str, str]]]:
    """The usable images (entries, their sizes) and every skipped file with its reason, sorted."""
    entries, sizes = [], {}
    for c, checked in zip(candidates, checks):
        if checked.reason:
            skipped.append((c.path, checked.reason))
        else:
            entries.append(Entry(c.path, c.cls, c.split or "", checked.sha256))
            sizes[c.path] = checked.size
    return entries, sizes, sorted((_printable(p), r) for p, r in skipped)


def _refuse_bad_files(root: Path, skipped: list[tuple[str, str]], cfg: DataConfig) -> None:
    """Under `data.on_bad_file: error`, any unusable file (not a hidden one) stops prepare, listing a few."""
    bad = [(p, r) for p, r in skipped if not r.startswith(HIDDEN)]
    if bad and cfg.on_bad_file == "error":
        listed = "; ".join(f"{p} ({r})" for p, r in bad[:LOG_EXAMPLES])
        more = f" and {len(bad) - LOG_EXAMPLES} more" if len(bad) > LOG_EXAMPLES else ""
        raise DataSourceError(f"{len(bad)} files under '{root}' cannot be used and data.on_bad_file is 'error': "
                              f"{listed}{more}. Fix or remove them, or set data.on_bad_file: skip")


def _split_by_hash(entries: list[Entry], cfg: DataConfig) -> list[Entry]:
    """Without split folders: a stratified split per class, decided by a hash of each path (see _stratified)."""
    by_class: dict[str, list[str]] = {}
    for e in entries:
        by_class.setdefault(e.cls, []).append(e.path)
    assign = {}
    for cls_files in by_class.values():
        assign.update(_stratified(cls_files, cfg))
    return [Entry(e.path, e.cls, assign[e.path], e.sha256) for e in entries]


def _duplicate_warnings(entries: list[Entry], warnings: list[str]) -> dict[str, int]:
    """Counts of byte-identical images; possible leakage across splits and label conflicts go to `warnings`."""
    _, dup_counts = _duplicates(entries)
    if dup_counts["across_splits"]:
        warnings.append(f"possible leakage: {dup_counts['across_splits']} val/test images are byte-identical to "
                        "images in an earlier split (see duplicates.csv)")
    if dup_counts["label_conflicts"]:
        warnings.append(f"{dup_counts['label_conflicts']} groups of byte-identical images carry different classes "
                        "(see duplicates.csv)")
    return dup_counts


def scan(root: Path, cfg: DataConfig, cache_file: Path | None = None) -> ScanResult:
    """Lists classes, usable images with their split and hash, skipped files with the reason, and warnings.

    `cache_file`: the scan cache (pipeline/core/data/scan_cache.py) read before and written after; None: none.

    Raises:
        DataSourceError: the source is missing, not a folder, has no class subfolders, fewer than 2 usable classes,
            a class with no train images, or (with `data.on_bad_file: error`) any unusable file.
    """
    split_dirs, class_names, candidates, skipped = _find_candidates(root, cfg.follow_links)
    checks = _check_candidates(root, candidates, cfg, cache_file)
    entries, sizes, skipped = _usable(candidates, checks, skipped)
    _refuse_bad_files(root, skipped, cfg)
    if not split_dirs:
        entries = _split_by_hash(entries, cfg)
    entries.sort(key=lambda e: (SPLITS.index(e.split), e.path))
    classes = sorted({e.cls for e in entries})
    warnings = _check_classes(classes, class_names, entries, root)
    dup_counts = _duplicate_warnings(entries, warnings)
    if not any(e.split == "val" for e in entries):
        raise DataSourceError(_no_val_message(root, split_dirs, cfg))
    train_sizes = image_size_stats([sizes[e.path] for e in entries if e.split == "train"])
    return ScanResult(classes, entries, skipped, warnings, dup_counts, train_sizes)


def write_index(out: Path, source: str, result: ScanResult, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                max_aspect: float = DEFAULT_MAX_ASPECT_RATIO) -> None:
    """Writes index.csv, skipped.csv, duplicates.csv and classes.json; each file appears atomically.

    classes.json is written last: a folder that has it has all the others.
    """
    classes, entries = result.classes, result.entries
    label = {c: i for i, c in enumerate(classes)}
    write_csv(out / "index.csv", INDEX_FIELDS,
               ((i, e.path, e.cls, label[e.cls], e.split, e.sha256) for i, e in enumerate(entries)))
    write_csv(out / "skipped.csv", ("path", "reason"), result.skipped)
    groups, _ = _duplicates(entries)
    write_csv(out / "duplicates.csv", DUPLICATE_FIELDS,
               ((sha, e.path, e.cls, e.split) for sha in sorted(groups)
                for e in sorted(groups[sha], key=lambda e: (SPLITS.index(e.split), e.path))))
    counts = {s: {c: sum(1 for e in entries if e.split == s and e.cls == c) for c in classes}
              for s in SPLITS if any(e.split == s for e in entries)}
    write_json(out / "classes.json", {"classes": classes, "source": source, "counts": counts,
                                      "skipped": len(result.skipped), "duplicates": result.duplicates,
                                      "warnings": result.warnings, "max_image_pixels": max_pixels,
                                      "max_aspect_ratio": max_aspect,
                                      IMAGE_SIZES_KEY: result.image_sizes})


def log_summary(result: ScanResult, out: Path) -> None:
    counts = {s: sum(1 for e in result.entries if e.split == s) for s in SPLITS}
    log.info("prepare: %d classes, %d images (train %d, val %d, test %d), %d files skipped (listed in %s)",
             len(result.classes), len(result.entries), counts["train"], counts["val"], counts["test"],
             len(result.skipped), out / "skipped.csv")
    bad = [(p, r) for p, r in result.skipped if not r.startswith(HIDDEN)]
    if bad:
        log.warning("prepare: %d files cannot be used and were skipped, e.g. %s", len(bad),
                    "; ".join(f"{p} ({r})" for p, r in bad[:LOG_EXAMPLES]))
    for warning in result.warnings:
        log.warning("prepare: %s", warning)
