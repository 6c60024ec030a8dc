"""The cost of portable CPU numerics (pipeline/infra/numerics.py): each stage pinned vs `PIPELINE_NUMERICS=native`.

Runs the pipeline's own stages as subprocesses, side by side in one run: extract, heads@logreg, heads@mlp, select
and a short fine-tune, once pinned (`portable`, the default) and once `native`, each mode on its own copy of the
chain, the two modes taking turns stage by stage so that a change in the machine's load hits both alike. The data
is scikit-learn's digits (the default data set; the first `--per-class` of each digit, 400 images by default) at the
default params (96 px), with `finetune.epochs` set to `--epochs`. For every stage it prints, pinned / native: the
process's wall time (start-up and imports included), the stage's own time from its run-log record
(`runs/<stage>.json`), and the CPU time; and whether the two modes' outputs are byte-identical (they differ where
this CPU's native kernels are not the pinned ones).

This is a benchmark script, not a test:

    python bench/numerics.py                      # about 2 minutes on 2 idle cores
    python bench/numerics.py --repeats 3          # the fastest of 3 runs per stage and mode
    python bench/numerics.py --per-class 0        # all 1797 images
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = ("portable", "native")
# Every knob pipeline/infra/numerics.py pins: stripped from the children's environment, so that `native` means this CPU's
# own choice even when this script runs under a shell or parent process that already holds the pins.
KNOBS = ("OPENBLAS_CORETYPE", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
         "NPY_DISABLE_CPU_FEATURES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_DYNAMIC",
         "OMP_DYNAMIC", "PIPELINE_NUMERICS")

log = logging.getLogger("bench.numerics")


def _env(mode: str, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(PYTHONPATH=str(REPO), PIPELINE_NUMERICS=mode, PIPELINE_RUN_DIR=str(work / "runs"))
    return env


def _stages(work: Path, params: Path, index: Path) -> list[tuple[str, str, list[str], list[Path]]]:
    """(label, run-log name, arguments, outputs) of each stage, in order, for the chain in `work`."""
    feats, heads = work / "features.h5", work / "heads"
    common = ["--params", str(params), "--index", str(index), "--features", str(feats)]
    return [
        ("extract", "extract", ["pipeline.extract", "--params", str(params), "--index", str(index), "--out",
                                str(feats)], [feats]),
        *[(f"heads@{h}", "heads", ["pipeline.heads", h, *common, "--out", str(heads / h),
                                   "--metrics", str(work / "metrics" / f"{h}.json")],
           [heads / h / "head.safetensors", work / "metrics" / f"{h}.json"]) for h in ("logreg", "mlp")],
        ("select", "select", ["pipeline.select", "--heads", "logreg", "mlp",
                              "--metrics-dir", str(work / "metrics"), "--out", str(work / "selected.json")],
         [work / "selected.json"]),
        ("finetune", "finetune", ["pipeline.finetune", *common, "--heads-dir", str(heads), "--selected",
                                  str(work / "selected.json"), "--out", str(work / "finetune"), "--metrics",
                                  str(work / "metrics" / "finetune.json"), "--live", "none"],
         [work / "finetune" / "model.safetensors", work / "metrics" / "finetune.json"]),
    ]


def _run(args: list[str], env: dict[str, str], record: Path) -> tuple[float, float, float]:
    """Runs one stage; returns its process's wall seconds, its stage's own seconds (from its run-log record, so
    without start-up and imports) and the CPU seconds (user + system) of the process and its DataLoader workers.

    CPU seconds are the figure to trust on a shared machine: other work stretches wall time, hardly CPU time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, float(json.loads(record.read_text())["seconds"]), cpu


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _prepare(root: Path, per_class: int | None, epochs: int) -> tuple[Path, Path]:
    """The digits as PNGs (all, or the first `per_class` of each), a params file, and prepare's index."""
    env = _env("portable", root)
    subprocess.run([sys.executable, "-m", "pipeline.embedded", "--out", str(root / "digits")], env=env, cwd=REPO,
                   check=True, capture_output=True)
    if per_class:
        for folder in (root / "digits").iterdir():
            for extra in sorted(folder.iterdir())[per_class:]:
                extra.unlink()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(root / "digits")
    params["finetune"]["epochs"] = epochs
    params["extract"]["store"] = None  # every repeat extracts: rows reused from the feature store would time nothing
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(root / "params.yaml"), "--out",
                    str(root / "prepared")], env=env, cwd=REPO, check=True, capture_output=True)
    return root / "params.yaml", root / "prepared"


def _cpu() -> str:
    # The same as pipeline.infra.numerics.cpu_model, written again on purpose: importing `pipeline` here would write
    # the portable pins into this process's environment, and the `native` runs below inherit it.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--per-class", type=int, default=40,
                        help="digits per class; 0 for all 1797 images (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per stage and mode; the fastest counts")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_numerics_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        params, index = _prepare(root, args.per_class, args.epochs)
        chains = {m: _stages(root / m, params, index) for m in MODES}
        rows = []
        for i, (label, record, _, _) in enumerate(chains[MODES[0]]):
            best: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for mode in MODES:  # the modes take turns, so a change in load hits both
                    _, _, stage_args, _ = chains[mode][i]
                    times = _run(stage_args, _env(mode, root / mode), root / mode / "runs" / f"{record}.json")
                    best[mode] = [min(a, b) for a, b in zip(best.get(mode, times), times)]  # each figure's best
            same = _digest(chains["portable"][i][3]) == _digest(chains["native"][i][3])
            rows.append((label, best["portable"], best["native"], same))
            log.info("%s: wall / stage / CPU seconds: pinned %.1f / %.1f / %.1f, native %.1f / %.1f / %.1f", label,
                     *best["portable"], *best["native"])
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    images = "all 1797 digits" if not args.per_class else f"{args.per_class} digits per class"
    print(f"\nportable (pinned) vs native numerics | {_cpu()}, {os.cpu_count()} cores, {platform.machine()} | "
          f"{images}, default params, finetune {args.epochs} epoch(s) | best of {args.repeats}")
    print("seconds pinned / native (ratio): process wall time; the stage's own time (no start-up); CPU time")
    print("| stage | wall | stage | CPU | same bytes |")
    print("|---|---|---|---|---|")
    totals = {mode: [0.0, 0.0, 0.0] for mode in MODES}
    for label, pinned, native, same in rows:
        totals = {"portable": [t + x for t, x in zip(totals["portable"], pinned)],
                  "native": [t + x for t, x in zip(totals["native"], native)]}
        print(f"| {label} | {_cells(pinned, native)} | {'yes' if same else 'no'} |")
    print(f"| all | {_cells(totals['portable'], totals['native'])} | |")


def _cells(pinned: list[float], native: list[float]) -> str:
    """`p / n (ratio)` per figure; a ratio of figures under a tenth of a second is timer noise and is left out."""
    return " | ".join(f"{p:.1f} / {n:.1f} ({p / n:.2f})" if n >= 0.1 else f"{p:.1f} / {n:.1f}"
                      for p, n in zip(pinned, native))


if __name__ == "__main__":
    main()
