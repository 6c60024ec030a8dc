"""Compare this checkout's pipeline outputs with the committed ones, and say how far apart they are.

Run after `dvc repro`. For each artefact it prints a verdict:
- `same`: identical bytes (expected on the same platform: same CPU kind, same packages);
- `within tolerance`: not identical, but features within `allclose(rtol, atol)` and metrics within `--margin`
  (expected across platforms, e.g. GPU vs CPU, with fp32 extraction and TF32 off);
- `different`: beyond the tolerance, with the size of the difference.
What is compared: the outputs' hashes in `dvc.lock` against the committed `dvc.lock` (git HEAD), every metrics file
declared in `dvc.yaml` against its committed version, and the features file against `reference/features.json` +
`reference/features.npz` (a fixed sample of rows), which `--record` writes and you commit.
Before the verdicts it prints where each side's numbers came from (pipeline/provenance.py): CPU model, instruction
sets in use, pinned numerics or not, threads, GPU, TF32 and precision, per stage, from this checkout's run log
(`runs/<stage>.json`) and from the committed `reference/provenance.json` (written by `--record` with the rest).

    python -m pipeline.verify                       # verdicts; exit 1 if anything is `different`
    python -m pipeline.verify --strict              # exit 1 unless everything is `same`
    python -m pipeline.verify --record              # after a reference run: write reference/ (then commit it):
                                                    # the feature sample and provenance.json
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

from pipeline import provenance
from pipeline.artifacts import atomic_path, sha256_file, write_json
from pipeline.errors import PipelineError, run_main
from pipeline.features import read_attrs, read_split, splits_in
from pipeline.runtime import setup_logging

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
    now, then = _outs(current), _outs(committed)
    for path in sorted(set(now) | set(then)):
        if path not in then or path not in now:
            yield f"dvc.lock: {path}", DIFFERENT, "present in only one of the two lock files"
        else:
            yield f"dvc.lock: {path}", SAME if now[path] == then[path] else DIFFERENT, \
                "" if now[path] == then[path] else f"md5 {then[path][:12]} -> {now[path][:12]}"


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def compare_metrics(current: dict, committed: dict, margin: float) -> tuple[str, str]:
    """Floats within `margin` (absolute) are close; anything else that differs is different."""
    now, then = _leaves(current), _leaves(committed)
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
    """The first SAMPLE_ROWS rows of every split's avg and max features, and all labels and ids."""
    sample = {}
    for split in splits_in(path):
        s = read_split(path, split)
        sample[f"{split}/avg"] = np.asarray(s.avg[:SAMPLE_ROWS], dtype=np.float32)
        sample[f"{split}/max"] = np.asarray(s.max[:SAMPLE_ROWS], dtype=np.float32)
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


def _metrics_files(dvc_yaml: Path) -> list[str]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    files = []
    for name, stage in stages.items():
        items = stage["foreach"] if isinstance(stage.get("foreach"), list) else [None]
        body = stage.get("do", stage)
        for item in items:
            for m in body.get("metrics", []):
                path = next(iter(m)) if isinstance(m, dict) else m
                files.append(path.replace("${item}", item) if item else path)
    return files


def verify(features: Path, reference: Path, rtol: float, atol: float, margin: float) -> list[tuple[str, str, str]]:
    results: list[tuple[str, str, str]] = []
    committed_lock = _git_show("dvc.lock")
    if committed_lock is None:
        raise PipelineError("no committed dvc.lock at git HEAD to compare with; commit a reference run first")
    results += list(compare_lock(yaml.safe_load(Path("dvc.lock").read_text()), yaml.safe_load(committed_lock)))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"))
    parser.add_argument("--reference", type=Path, default=Path("reference"), help="committed feature sample")
    parser.add_argument("--rtol", type=float, default=1e-3, help="features: allclose rtol (default: %(default)s)")
    parser.add_argument("--atol", type=float, default=1e-4, help="features: allclose atol (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=0.01,
                        help="metrics: largest absolute difference still 'within tolerance' (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="fail unless every artefact is byte-identical")
    parser.add_argument("--record", action="store_true", help="write the reference feature sample and exit")
    args = parser.parse_args(argv)
    setup_logging()
    if args.record:
        record(args.features, args.reference)
        log.info("verify: wrote %s/features.json, features.npz and provenance.json; commit them", args.reference)
        return
    results = verify(args.features, args.reference, args.rtol, args.atol, args.margin)
    for line in provenance.report_lines(committed_provenance(args.reference), provenance.current()):
        print(line)
    width = max(len(r[0]) for r in results)
    for name, verdict, detail in results:
        print(f"{name:<{width}}  {verdict:<16}  {detail}")
    verdicts = {v for _, v, _ in results}
    overall = DIFFERENT if DIFFERENT in verdicts else CLOSE if CLOSE in verdicts else SAME
    print(f"verdict: {overall}")
    if overall == DIFFERENT or (args.strict and overall != SAME):
        sys.exit(1)


if __name__ == "__main__":
    run_main(main, "verify")
