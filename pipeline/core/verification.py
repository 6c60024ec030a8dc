"""Comparing this checkout's pipeline outputs with the committed ones: same bytes, within tolerance, or different.

What is compared: the outputs' hashes in `dvc.lock` against the committed `dvc.lock` (git HEAD), every metrics file
declared in `dvc.yaml` against its committed version, and the features file against `reference/features.json` +
`reference/features.npz` (a fixed sample of rows).
"""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from pipeline.core.features import read_attrs, read_split, splits_in
from pipeline.infra import provenance
from pipeline.infra.artifacts import atomic_path, sha256_file, write_json
from pipeline.infra.errors import PipelineError

log = logging.getLogger("pipeline.verify")

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


def compare_lock(current: dict, committed: dict) -> Iterator[tuple[str, str, str]]:
    """Output hashes, stage by stage. Bytes that differ are not a verdict by themselves: last bits move between CPU
    models where pinning cannot hold; the metrics and the feature sample (compared with tolerances) decide."""
    now, then = _outs(current), _outs(committed)
    for path in sorted(set(now) | set(then)):
        if path not in then or path not in now:
            yield f"dvc.lock: {path}", DIFFERENT, "present in only one of the two lock files"
        elif now[path] == then[path]:
            yield f"dvc.lock: {path}", SAME, ""
        else:
            yield f"dvc.lock: {path}", CLOSE, f"bytes differ (md5 {then[path][:12]} -> {now[path][:12]}); judged by " \
                                              "the metrics and features below"


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


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _timing(key: str) -> bool:
    """Machine-dependent measurements (the sweep's extraction speed) live under a `speed` key: reported, never
    compared, since no two machines (or runs) time the same."""
    return "speed" in key.split(".")


def compare_metrics(current: dict, committed: dict, margin: float) -> tuple[str, str]:
    """Floats within `margin` (absolute) are close; anything else that differs is different; `speed` is skipped."""
    now = {k: v for k, v in _leaves(current).items() if not _timing(k)}
    then = {k: v for k, v in _leaves(committed).items() if not _timing(k)}
    if now == then:
        return SAME, ""
    worst, detail = 0.0, []
    for key in sorted(set(now) | set(then)):
        a, b = then.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
            worst = max(worst, abs(a - b))
            detail.append(f"{key} {a:.4f} -> {b:.4f}")
        else:
            return DIFFERENT, f"{key}: {a!r} -> {b!r}"
    return (CLOSE if worst <= margin else DIFFERENT), f"max |difference| {worst:.4g}: " + "; ".join(detail[:4])


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


def verify(features: Path, reference: Path, rtol: float, atol: float, margin: float) -> list[tuple[str, str, str]]:
    results: list[tuple[str, str, str]] = []
    committed_lock = _git_show("dvc.lock")
    if committed_lock is None:
        raise PipelineError("no committed dvc.lock at git HEAD to compare with; commit a reference run first")
    current, committed = yaml.safe_load(Path("dvc.lock").read_text()), yaml.safe_load(committed_lock)
    results += list(compare_inputs(current, committed))
    results += list(compare_lock(current, committed))
    for path in _metrics_files(Path("dvc.yaml")):
        then = _git_show(path)
        if then is None or not Path(path).is_file():
            results.append((path, DIFFERENT, "missing here or at git HEAD"))
            continue
        results.append((path, *compare_metrics(json.loads(Path(path).read_text()), json.loads(then), margin)))
    if (reference / "features.json").is_file() and features.is_file():
        results.append((str(features), *compare_features(features, reference, rtol, atol)))
    else:
        results.append((str(features), DIFFERENT, f"missing {features} or {reference}/features.json"))
    return results
