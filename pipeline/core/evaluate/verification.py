"""Comparing this checkout's pipeline outputs with the committed ones: same bytes, within tolerance, or different.

One verdict per artefact: each stage's inputs (command, params, code and source data in `dvc.lock`) and each output
in `dvc.lock` against the committed `dvc.lock` (git HEAD).
- `same`: identical bytes;
- `within tolerance`: bytes differ where they cannot match (a GPU on either side, other package versions, numerics
  not pinned: :func:`bytes_must_match` reads both sides' provenance), and the numbers agree within the bounds of
  pipeline/core/evaluate/tolerance.py (metrics files) or `allclose` (the feature sample in reference/);
- `different`: anything else. On two pinned CPU runs with the same packages any byte that differs is `different`:
  every kernel there is portable (README "Portable numerics").
"""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from pipeline.core.evaluate.tolerance import Tolerances, differences, headline, split_sizes
from pipeline.core.features.cache import read_attrs, read_split, splits_in
from pipeline.infra import provenance
from pipeline.infra.artifacts import atomic_path, sha256_file, write_json
from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)

SAMPLE_ROWS = 64
SAME, CLOSE, DIFFERENT = "same", "within tolerance", "different"


def _git_show(path: str, rev: str = "HEAD") -> str | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def _outs(lock: dict) -> dict[str, str]:
    """{output path: hash} for every stage output in a dvc.lock mapping."""
    found = {}
    for stage, body in (lock.get("stages") or {}).items():
        for out in body.get("outs", []):
            found[out["path"]] = out.get("md5") or out.get("hash", "")
    return found


def _overlaps(a: str, b: str) -> bool:
    """Whether paths `a` and `b` are the same, or one lies inside the other."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _inputs(lock: dict) -> dict[str, dict]:
    """{stage: its cmd, params and the hashes of deps that no stage writes (code, data source)}."""
    produced = set(_outs(lock))
    inputs = {}
    for stage, body in (lock.get("stages") or {}).items():
        # a dep that is, lies inside, or holds another stage's output (compare's metrics/sweep folder) is a result,
        # judged with the outputs, not an input
        deps = {d["path"]: d.get("md5") or d.get("hash", "") for d in body.get("deps", [])
                if not any(_overlaps(d["path"], o) for o in produced)}
        inputs[stage] = {"cmd": body.get("cmd"), "params": body.get("params", {}), "deps": deps}
    return inputs


def compare_inputs(current: dict, committed: dict) -> Iterator[tuple[str, str, str]]:
    """What each stage ran from (command, params, code and source data) must be identical: unlike outputs, inputs do
    not depend on the CPU, so any difference means the committed results were not made from this checkout."""
    now, then = _inputs(current), _inputs(committed)
    for stage in sorted(set(now) | set(then)):
        a, b = then.get(stage), now.get(stage)
        if a == b:
            yield f"inputs: {stage}", SAME, ""
            continue
        if a is None or b is None:
            detail = "stage present in only one of the two lock files"
        else:
            changed = [k for k in ("cmd", "params") if a[k] != b[k]]
            changed += [f"deps {p}" for p in sorted(set(a["deps"]) | set(b["deps"])) if a["deps"].get(p) != b["deps"].get(p)]
            detail = "changed: " + ", ".join(changed[:6])
        yield f"inputs: {stage}", DIFFERENT, detail + " (the committed results come from other code or params: " \
                                                       "run `dvc repro` and commit dvc.lock and the results)"


def bytes_must_match(committed: dict | None, here: dict) -> tuple[bool, str]:
    """Whether the two sides' outputs must be byte-identical, and why (or why not), from their provenance.

    Portable numerics make every x86-64 CPU compute the same bytes with the same packages (the fine-tune included:
    pipeline/core/finetune/portable_conv.py), so `different` is the only word for a difference there. Bytes cannot match,
    and the tolerances apply, only where a side ran on a GPU, with other package versions, or without the pins.
    """
    if not committed:
        return True, "no committed provenance: assuming the reference run was a pinned CPU run"
    reasons = []
    for stage in sorted(set(committed) & set(here)):
        then, now = committed[stage], here[stage]
        for side, summary in (("committed", then), ("here", now)):
            if summary.get("gpu") or str(summary.get("device", "cpu")).startswith("cuda"):
                reasons.append(f"{stage} ran on a GPU ({side})")
            if not str(summary.get("numerics", "")).startswith("portable x86-64") or summary.get("not_pinned"):
                reasons.append(f"{stage} numerics not pinned ({side}: {summary.get('numerics')})")
        if then.get("packages") != now.get("packages"):
            reasons.append(f"{stage} package versions differ")
        if then.get("threads") != now.get("threads"):
            reasons.append(f"{stage} thread counts differ")
    if reasons:
        return False, "; ".join(dict.fromkeys(reasons))
    return True, "both sides CPU, portable numerics, same packages and threads"


def compare_metrics(now: dict, then: dict, sizes: dict[str, int], tol: Tolerances, strict: bool
                    ) -> tuple[str, str]:
    """A metrics file whose bytes differ: `different` when bytes must match, else judged by :mod:`tolerance`."""
    diffs = list(differences(now, then, sizes, tol))
    if not diffs:  # same numbers, other bytes (key order, formatting)
        return (DIFFERENT if strict else CLOSE), "same numbers, other bytes"
    within = all(d[3] for d in diffs)
    return (CLOSE if within and not strict else DIFFERENT), headline(diffs)


def feature_sample(path: Path) -> dict[str, np.ndarray]:
    """The first SAMPLE_ROWS rows of every split's feature sets, and all labels and ids."""
    sample = {}
    for split in splits_in(path):
        s = read_split(path, split)
        sample[f"{split}/avg"] = np.asarray(s.avg[:SAMPLE_ROWS], dtype=np.float32)
        sample[f"{split}/max"] = np.asarray(s.max[:SAMPLE_ROWS], dtype=np.float32)
        if s.pre_logits is not None:
            sample[f"{split}/pre_logits"] = np.asarray(s.pre_logits[:SAMPLE_ROWS], dtype=np.float32)
        sample[f"{split}/labels"] = np.asarray(s.labels)
        sample[f"{split}/ids"] = np.asarray(s.ids)
    return sample


def compare_features(path: Path, reference: Path, rtol: float, atol: float) -> tuple[str, str]:
    meta = json.loads((reference / "features.json").read_text())
    if sha256_file(path) == meta["sha256"]:
        return SAME, ""
    ref = np.load(reference / "features.npz")
    now = feature_sample(path)
    if set(ref.files) != set(now):
        return DIFFERENT, f"splits/datasets differ: {sorted(ref.files)} vs {sorted(now)}"
    worst, ok = 0.0, True
    for key in ref.files:
        a, b = ref[key], now[key]
        if a.shape != b.shape:
            return DIFFERENT, f"{key}: shape {a.shape} -> {b.shape}"
        if key.endswith(("labels", "ids")):
            if not np.array_equal(a, b):
                return DIFFERENT, f"{key}: row order or labels differ"
            continue
        worst = max(worst, float(np.abs(a - b).max()))
        ok &= bool(np.allclose(b, a, rtol=rtol, atol=atol))
    detail = f"bytes differ; sampled rows max |difference| {worst:.3g} (allclose rtol={rtol:g}, atol={atol:g})"
    return (CLOSE if ok else DIFFERENT), detail


def record(features: Path, reference: Path, run_dir: Path | None = None) -> None:
    """Writes the reference: a sample of the features' rows, their hash and attributes, and the run's provenance."""
    reference.mkdir(parents=True, exist_ok=True)
    sample = feature_sample(features)
    with atomic_path(reference / "features.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **sample)
    attrs = read_attrs(features)
    write_json(reference / "features.json", {"sha256": sha256_file(features), "rows_per_split": SAMPLE_ROWS,
                                             "attrs": {k: v for k, v in attrs.items() if k != "versions"},
                                             "versions": attrs.get("versions")})
    write_json(reference / "provenance.json", provenance.current(run_dir))


def committed_provenance(reference: Path, rev: str = "HEAD") -> dict | None:
    """reference/provenance.json as committed at `rev`; None where there is none."""
    text = _git_show((reference / "provenance.json").as_posix(), rev)
    return json.loads(text) if text else None


def _metrics_files(dvc_yaml: Path, params: Path = Path("params.yaml")) -> list[str]:
    """Every metrics file dvc.yaml declares, `foreach` and `matrix` stages expanded (matrix lists from params)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    values = yaml.safe_load(params.read_text()) if params.is_file() else {}
    files = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for item in _items(stage, values):
            for m in body.get("metrics", []):
                path = next(iter(m)) if isinstance(m, dict) else m
                for key, value in item.items():
                    path = path.replace("${" + key + "}", str(value))
                files.append(path)
    return files


def _items(stage: dict, values: dict) -> list[dict[str, Any]]:
    """The substitutions of a stage: one empty mapping, `foreach` items as `item`, or the `matrix` product."""
    if isinstance(stage.get("foreach"), list):
        return [{"item": v} for v in stage["foreach"]]
    if isinstance(stage.get("matrix"), dict):
        combos: list[dict[str, Any]] = [{}]
        for key, spec in stage["matrix"].items():
            options = spec
            if isinstance(spec, str) and spec.startswith("${") and spec.endswith("}"):
                options = values
                for part in spec[2:-1].split("."):
                    options = options[part]
            combos = [{**c, f"item.{key}": v} for c in combos for v in options]
        return combos
    return [{}]


PURE_STAGES = ("embedded", "prepare")  # outputs no floating-point kernel touches: bytes must match everywhere


def verify(features: Path, reference: Path, rtol: float, atol: float, tol: Tolerances
           ) -> tuple[list[tuple[str, str, str]], str]:
    """One verdict per stage input set and per output in dvc.lock; returns them and the line saying whether bytes
    had to match (and why)."""
    committed_lock = _git_show("dvc.lock")
    if committed_lock is None:
        raise PipelineError("no committed dvc.lock at git HEAD to compare with; commit a reference run first")
    current, committed = yaml.safe_load(Path("dvc.lock").read_text()), yaml.safe_load(committed_lock)
    strict, why = bytes_must_match(committed_provenance(reference), provenance.current())
    mode = f"bytes must match: {why}" if strict else f"bytes may differ ({why}): tolerances apply"
    results = list(compare_inputs(current, committed))
    metrics = set(_metrics_files(Path("dvc.yaml")))
    documents = {p: (json.loads(Path(p).read_text()) if Path(p).is_file() else None,
                     json.loads(text) if (text := _git_show(p)) else None) for p in metrics}
    sizes = split_sizes(*(d for pair in documents.values() for d in pair if d))
    stage_of = {path: stage for stage, body in (committed.get("stages") or {}).items()
                for path in (o["path"] for o in body.get("outs", []))}
    now, then = _outs(current), _outs(committed)
    for path in sorted(set(now) | set(then)):
        if path not in then or path not in now:
            results.append((path, DIFFERENT, "present in only one of the two lock files"))
        elif now[path] == then[path]:
            results.append((path, SAME, ""))
        elif path in documents and all(d is not None for d in documents[path]):
            results.append((path, *compare_metrics(*documents[path], sizes, tol, strict)))
        elif stage_of.get(path, "").split("@")[0] in PURE_STAGES:
            results.append((path, DIFFERENT, "bytes differ in an output no numerics touch (data or code differ)"))
        elif path == str(features) and (reference / "features.json").is_file():
            verdict, detail = compare_features(features, reference, rtol, atol)
            results.append((path, DIFFERENT if strict else verdict, detail))
        else:
            results.append((path, DIFFERENT if strict else CLOSE,
                            f"bytes differ (md5 {then[path][:12]} -> {now[path][:12]})"
                            + ("" if strict else "; its metrics decide")))
    return results, mode
