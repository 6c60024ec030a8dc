"""Which outputs recorded in `dvc.lock` are missing from the DVC cache.

Why: when DVC cannot store an output (disk full, a read-only or vanished cache folder) it prints "failed to transfer"
and still exits 0, and `dvc status` then reports nothing, since the workspace matches `dvc.lock`. The results look
saved, but `dvc push`, `dvc checkout` and `dvc exp` will not find them later. This reads DVC's own cache layout
(DVC 3: `<cache>/files/md5/<2 hex>/<30 hex>`, a directory as a `.dir` manifest plus one object per file), so it can
say which output is missing and what to do. Outputs declared with `cache: false` in `dvc.yaml` are not expected there,
and neither are those of stages no longer in the pipeline: DVC keeps a removed stage's `dvc.lock` entry (a backbone
dropped from `sweep.backbones`, a head dropped from a `foreach`) until the file is rewritten without it.
"""
from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import yaml


def cache_dir(root: Path) -> Path:
    """The cache folder: `cache.dir` of `.dvc/config.local` or `.dvc/config` (relative to `.dvc/`), else `.dvc/cache`."""
    for name in ("config.local", "config"):
        config = configparser.ConfigParser()
        try:
            config.read(root / ".dvc" / name)
        except configparser.Error:
            continue
        if config.has_option("cache", "dir"):
            return (root / ".dvc" / config.get("cache", "dir").strip("'\"")).resolve()
    return root / ".dvc" / "cache"


def _uncached_patterns(dvc_yaml: Path) -> list[re.Pattern]:
    """Output paths declared `cache: false` (a foreach stage's `${item}` matches any one path component)."""
    patterns = []
    for stage in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for out in body.get(kind) or []:
                if isinstance(out, dict):
                    for path, opts in out.items():
                        if isinstance(opts, dict) and opts.get("cache") is False:
                            patterns.append(re.compile(re.escape(path).replace(r"\$\{item\}", "[^/]+") + r"\Z"))
    return patterns


def _object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _missing(cache: Path, md5: str) -> str | None:
    """Why an output with this hash is not (wholly) in the cache, or None when it is."""
    obj = _object(cache, md5)
    if not obj.is_file():
        return f"no object {obj.relative_to(cache.parent) if cache.parent in obj.parents else obj}"
    if md5.endswith(".dir"):
        try:
            entries = json.loads(obj.read_text())
        except (OSError, ValueError):
            return f"its directory manifest {obj.name} is unreadable"
        absent = [e["relpath"] for e in entries if not _object(cache, e["md5"]).is_file()]
        if absent:
            return f"{len(absent)} of its {len(entries)} files have no object (first: {absent[0]})"
    return None


def pipeline_stages(root: Path) -> set[str] | None:
    """The names of the stages dvc.yaml defines now, `foreach` and `matrix` items expanded from params (DVC's own
    reading, `heads@logreg`, `sweep_extract@tf_efficientnet_lite1`); None where DVC cannot read the pipeline."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            return {stage.name for stage in repo.index.stages}
    except Exception:  # a broken dvc.yaml is reported by DVC itself; check every lock entry then
        return None


def uncached_outputs(root: Path = Path(".")) -> list[tuple[str, str]]:
    """(output path, what is missing) for every cached output of `dvc.lock`'s current stages whose data is not in
    the cache."""
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    skip = _uncached_patterns(root / "dvc.yaml") if (root / "dvc.yaml").is_file() else []
    current = pipeline_stages(root)
    cache = cache_dir(root)
    found = []
    for name, stage in (lock.get("stages") or {}).items():
        if current is not None and name not in current:
            continue  # a removed stage's leftover entry: nothing will check its outputs out again
        for out in stage.get("outs", []):
            if any(p.match(out["path"]) for p in skip):
                continue
            why = _missing(cache, out.get("md5") or "")
            if why:
                found.append((out["path"], why))
    return found


def cache_report(root: Path = Path(".")) -> tuple[bool, list[str]]:
    """(all cached, lines to print): one line per missing output with the fix, or one line saying all is stored."""
    if not (root / "dvc.lock").is_file():
        return False, ["dvc cache: no dvc.lock here; run `dvc repro` first (from the repository root)"]
    missing = uncached_outputs(root)
    if not missing:
        return True, [f"dvc cache: every cached output of dvc.lock is stored in {cache_dir(root)}"]
    lines = [f"dvc cache: {path} is NOT in the DVC cache ({why})" for path, why in missing]
    lines.append(f"dvc cache: {len(missing)} output(s) were not stored, although `dvc repro` exited 0 (it prints "
                 "'failed to transfer' when the cache disk is full): free space, then run `dvc commit --force` to "
                 "store the outputs as they are, or `dvc repro --force` to remake them")
    return False, lines
