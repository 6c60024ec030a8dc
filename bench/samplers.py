"""TPE against random draws and against a grid, same budget, for the MLP head on the cache (issue: Bayesian tuning).

For each data set, the same space for every sampler: `lr` log-uniform in [1e-4, 1e-2] and `dropout` uniform in
[0.0, 0.6] (the other keys are params.yaml's heads.mlp). The grid is the 30 points 5 x 6 spread evenly over the same
ranges (lr on the log axis); random and TPE draw `--trials` points from the ranges, once per seed. Every fit is
`pipeline.search`'s own (pipeline/core/heads/search.py, through a study journal in a temporary folder). Prints and
writes, per data set and sampler: the val accuracy of the best point of each search (mean, median, min, max over the
seeds; the grid has no seed and is run once), the median trial's val accuracy, and the best-so-far curve (median over
seeds) to a figure.

Data sets: `digits` is the default pipeline's features (a copy of data/features.h5 after `dvc repro`); `hymenoptera` is
extracted here once (prepare + extract through the stages' entry points, bundled Lite0 at 224 px, cached in --work).
Each search keeps its study journal in --work, so a run cut short resumes; time figures then cover the rest only.

    python bench/samplers.py                                   # digits + hymenoptera, 30 trials, 5 seeds
    python bench/samplers.py --data digits --trials 12 --seeds 2
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))

from probes import features_224  # noqa: E402

from pipeline.core.heads.search import open_study, run_search  # noqa: E402
from pipeline.infra.config import load_section  # noqa: E402
from pipeline.infra.space import parse_space  # noqa: E402
from pipeline.infra.study import budget  # noqa: E402

HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
RANGES = ["lr=log(1e-4,1e-2)", "dropout=(0.0,0.6)"]
GRID = ["lr=[1.0e-4,3.1623e-4,1.0e-3,3.1623e-3,1.0e-2]", "dropout=[0.0,0.12,0.24,0.36,0.48,0.6]"]  # 30 points


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def hymenoptera_features(work: Path) -> Path:
    """Hymenoptera's features at the bundled Lite0's own 224 px, extracted once into `work` (bench/probes.py's)."""
    features = features_224(HYMENOPTERA, work / "hymenoptera")
    if features is None:
        raise SystemExit(f"{HYMENOPTERA} is absent: run with --data digits")
    return features


def search(features: Path, base, specs: list[str], sampler: str, seed: int, trials: int | None,
           out: Path) -> list[dict]:
    """One search's rows (val accuracy per trial, in trial order), through pipeline.search's own code; its study
    journal in `out`, so a run cut short resumes where it stopped (the trials are the same either way)."""
    space = parse_space(specs, base, "heads.mlp")
    total = budget(space, sampler, trials)
    study = open_study(out, "mlp", base, features, space, sampler, seed)
    rows, _ = run_search("mlp", features, base, study, total)
    return rows


def digits_features(work: Path) -> Path:
    """A copy of the default pipeline's features (a `dvc repro` running meanwhile replaces data/features.h5)."""
    src, copy = REPO / "data" / "features.h5", work / "digits" / "features.h5"
    if not src.exists():
        raise SystemExit(f"{src} is absent: run `dvc repro` first")
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, copy)
    return copy


def best_so_far(rows: list[dict]) -> list[float]:
    curve, best = [], -math.inf
    for row in rows:
        best = max(best, row["val_accuracy"])
        curve.append(best)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["digits", "hymenoptera"], choices=["digits", "hymenoptera"])
    parser.add_argument("--trials", type=int, default=30, help="fits per search (the grid has 30)")
    parser.add_argument("--seeds", type=int, default=5, help="searches per random/TPE sampler")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_samplers",
                        help="where hymenoptera's features are kept between runs (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "samplers_cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = load_section("heads", REPO / "params.yaml").mlp  # read once: params.yaml may change during the run
    results: dict = {"machine": machine(), "trials": args.trials, "seeds": args.seeds, "ranges": RANGES,
                     "grid": GRID, "data": {}}
    for name in args.data:
        features = digits_features(args.work) if name == "digits" else hymenoptera_features(args.work)
        runs: dict = {}
        t0 = time.perf_counter()
        studies = args.work / name / "studies"
        runs["grid"] = [search(features, base, GRID, "grid", 0, None, studies / "grid")]
        for sampler in ("random", "tpe"):
            runs[sampler] = [search(features, base, RANGES, sampler, seed, args.trials, studies / f"{sampler}-{seed}")
                             for seed in range(args.seeds)]
        results["data"][name] = {
            s: {"best": [max(r["val_accuracy"] for r in rows) for rows in rs],
                "median_trial": [statistics.median(r["val_accuracy"] for r in rows) for rows in rs],
                "best_so_far": [best_so_far(rows) for rows in rs],
                "best_point": [min(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["point"]))
                               for rows in rs]}
            for s, rs in runs.items()}
        results["data"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {results['data'][name]['seconds']} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    table = report(results)
    args.out.with_suffix(".md").write_text(table)
    plot(results, args.out.with_suffix(".png"))
    print(table)


def report(results: dict) -> str:
    lines = [f"# Samplers on the cache: MLP head, {results['trials']} fits per search",
             "", f"Machine: {results['machine']}. Command: `python bench/samplers.py`. Space: "
             f"{', '.join(results['ranges'])} (grid: the 5 x 6 points {', '.join(results['grid'])}). Random and TPE: "
             f"{results['seeds']} seeds each (0..{results['seeds'] - 1}); the grid has no seed.", "",
             "| data | sampler | best val acc: mean | median | min | max | median trial's val acc (median over seeds) |",
             "|---|---|---|---|---|---|---|"]
    for name, data in results["data"].items():
        for sampler in ("grid", "random", "tpe"):
            best, med = data[sampler]["best"], data[sampler]["median_trial"]
            lines.append(f"| {name} | {sampler} | {statistics.mean(best):.4f} | {statistics.median(best):.4f} | "
                         f"{min(best):.4f} | {max(best):.4f} | {statistics.median(med):.4f} |")
    lines += ["", "Time per data set (all searches, this machine): " +
              ", ".join(f"{n} {d['seconds']} s" for n, d in results["data"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["data"]), figsize=(5 * len(results["data"]), 3.6), squeeze=False)
    for ax, (name, data) in zip(axes[0], results["data"].items()):
        for sampler in ("grid", "random", "tpe"):
            curves = data[sampler]["best_so_far"]
            median = [statistics.median(c[i] for c in curves) for i in range(len(curves[0]))]
            ax.plot(range(1, len(median) + 1), median, label=sampler)
        ax.set(title=f"{name}: best val accuracy so far", xlabel="fits", ylabel="val accuracy (median over seeds)")
        ax.legend()
    fig.suptitle(f"MLP head, {results['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
