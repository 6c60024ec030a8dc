"""Where a run's numbers came from: CPU, instruction sets in use, pinned or not, threads, GPU, TF32, precision.

`pipeline.verify` prints it for both sides of its comparison, so a `within tolerance` or `different` verdict comes
with its likely cause (another CPU, native numerics, TF32 on, bf16...). The current side is read from the run log
(`runs/<DVC stage>.json`, written by each stage that `dvc repro` ran; a command run by hand never stands in for it),
or, where no stage has run here, from this process's own environment. The committed side is
`reference/provenance.json`, which `verify --record` writes from the run log after a reference run and which is
committed with the rest of `reference/`; verify reads it from git HEAD, like the committed metrics. It holds no
times and no host names, so rerunning the reference run on the same kind of machine rewrites it byte for byte; it is
not a DVC output and no stage depends on it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.infra import runlog

# the DVC stages whose numbers verify compares
STAGES = ("extract", "heads@logreg", "heads@mlp", "heads@knn", "finetune", "evaluate")
LIVE = "live"  # the key of the verify process's own environment, where no stage has run here
PACKAGES = ("torch", "numpy", "scikit-learn", "timm")
ISA_ORDER = ("openblas", "numpy", "aten", "mkl", "onednn")  # a fixed order: the JSON file sorts its keys
# Fields that, when they differ between the two sides, explain last-bit (or larger) differences in the numbers.
DECISIVE = ("cpu", "numerics", "isa", "threads", "device", "gpu", "tf32", "precision", "packages")


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """The part of one run-log record (or of runlog.environment()) that decides its numbers; no time, no host."""
    numerics = record.get("numerics") or {}
    in_use = numerics.get("in_use") or {}
    isa = {}
    if in_use.get("openblas"):  # "libscipy_openblas64_-...so: Haswell, 2 threads" -> Haswell
        isa["openblas"] = "/".join(sorted({s.split(": ", 1)[-1].split(",")[0] for s in in_use["openblas"]}))
    if in_use.get("numpy_simd"):
        isa["numpy"] = "+".join(in_use["numpy_simd"])
    for key, name in (("aten", "aten"), ("mkl_cbwr", "mkl"), ("onednn_max_isa", "onednn")):
        if in_use.get(key):
            isa[name] = in_use[key]
    mode = numerics.get("mode")
    if mode == "portable":
        mode = f"portable {numerics.get('baseline') or '(instruction sets not pinned)'}"
    summary = {
        "cpu": record.get("cpu"),
        "numerics": mode,
        "not_pinned": numerics.get("not_pinned") or [],
        "isa": isa,
        "threads": in_use.get("torch_threads", record.get("torch_threads")),
        "device": record.get("device"),
        "gpu": record.get("gpu"),
        "tf32": record.get("tf32") if record.get("gpu") else None,  # TF32 only means something on a GPU
        "precision": record.get("precision"),
        "packages": {k: v for k in PACKAGES if (v := (record.get("packages") or {}).get(k))},
    }
    return {k: v for k, v in summary.items() if v not in (None, [], {})}


def current(run_dir: Path | None = None) -> dict[str, Any]:
    """{stage: summary} from the run log; {"live": this process's environment} where no stage record exists."""
    folder = run_dir or runlog.run_dir()
    found = {}
    for stage in STAGES:
        if (record := runlog.stage_record(stage, folder)) is not None:
            found[stage] = summarize(record)
    if not found:
        # Nothing ran here: say what this machine would use. The libraries report their kernels only once loaded,
        # and loading them after `pipeline` (which pinned first) is what every stage does.
        import numpy  # noqa: F401
        import torch  # noqa: F401

        found[LIVE] = summarize(runlog.environment())
    return found


def describe(summary: dict[str, Any]) -> str:
    """One line: CPU; numerics; instruction sets; threads; device, GPU, TF32, precision; package versions."""
    parts = [summary.get("cpu", "?"), summary.get("numerics", "?")]
    if summary.get("not_pinned"):
        parts[-1] += f" (not pinned: {'; '.join(summary['not_pinned'])})"
    if summary.get("isa"):
        parts.append(", ".join(f"{k} {summary['isa'][k]}" for k in ISA_ORDER if k in summary["isa"]))
    if "threads" in summary:
        parts.append(f"{summary['threads']} threads")
    device = [summary.get("device"), summary.get("gpu"), summary.get("precision")]
    if "tf32" in summary:
        device.append("TF32 " + ("on" if any(summary["tf32"].values()) else "off"))
    if any(device):
        parts.append(" ".join(str(d) for d in device if d))
    if summary.get("packages"):
        parts.append(" ".join(f"{k} {summary['packages'][k]}" for k in PACKAGES if k in summary["packages"]))
    return "; ".join(parts)


def differences(committed: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The decisive fields that differ between two summaries, in DECISIVE order."""
    return [key for key in DECISIVE if committed.get(key) != here.get(key)]


def report_lines(committed: dict[str, Any] | None, here: dict[str, Any]) -> list[str]:
    """The provenance block verify prints: per stage, the committed side and this side, and what differs.

    A side without a record for a stage stands in with its live environment, when it has one.
    """
    lines = ["provenance (how each side's numbers were made):"]
    if committed is None:
        lines.append("  committed: none (after a reference run, `python -m pipeline.verify --record` writes "
                     "reference/provenance.json; commit it)")
        committed = {}
    stages = [s for s in STAGES if s in committed or s in here] or [LIVE]
    width = max(len(s) for s in stages)
    for stage in stages:
        then, now = committed.get(stage, committed.get(LIVE)), here.get(stage, here.get(LIVE))
        then_label = "committed (live):" if stage not in committed and then else "committed:"
        now_label = "here (live):" if stage not in here and now else "here:"
        lines.append(f"  {stage:<{width}}  {then_label:<17} {describe(then) if then else '-'}")
        lines.append(f"  {'':<{width}}  {now_label:<17} {describe(now) if now else '-'}")
        if then and now and (diff := differences(then, now)):
            lines.append(f"  {'':<{width}}  differs in: {', '.join(diff)} (expect last-bit differences or more)")
    return lines
