"""LP-FT evidence: fine-tuning warm-started from the best head vs from a randomly initialised head, same budget.

Runs the pipeline's own stages (prepare, extract, both heads, select, then finetune twice: `warm_start: true` and
`false`, everything else equal) on a data set in a scratch folder, and prints one table with the device named.
This is a benchmark script, not a test; the GPU run is the one the issue asks for:

    python bench/lpft.py --data ../shared/data/hymenoptera_data --epochs 10 --image-size 224 --hflip   # GPU
    python bench/lpft.py --data ../shared/data/hymenoptera_data --epochs 3 --image-size 160 --hflip    # CPU, small
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _stage(*args: str, cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], cwd=cwd, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(cwd / "runs")})
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root")
    parser.add_argument("--work", type=Path, default=Path("build/lpft"), help="scratch folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None, help="crop size (default: the weights' own)")
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument("--bn", default="eval")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--body-lr-ratio", type=float, default=0.1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(args.data.resolve())
    params["backbone"]["image_size"] = args.image_size
    params["extract"]["workers"] = args.workers
    params["finetune"].update(epochs=args.epochs, hflip=args.hflip, bn=args.bn, lr=args.lr,
                              body_lr_ratio=args.body_lr_ratio, precision=args.precision, workers=args.workers)
    times = {}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    times["prepare"] = _stage("pipeline.prepare", "--out", "prepared", cwd=work)
    times["extract"] = _stage("pipeline.extract", "--index", "prepared", "--out", "features.h5", cwd=work)
    for head in ("logreg", "mlp"):
        times[head] = _stage("pipeline.heads", head, "--features", "features.h5", "--index", "prepared",
                             "--out", f"heads/{head}", "--metrics", f"metrics/{head}.json", cwd=work)
    _stage("pipeline.select", "--metrics-dir", "metrics", "--out", "selected.json", cwd=work)
    rows = []
    for warm in (True, False):
        name = "warm" if warm else "random"
        params["finetune"]["warm_start"] = warm
        (work / f"params_{name}.yaml").write_text(yaml.safe_dump(params))
        seconds = _stage("pipeline.finetune", "--params", f"params_{name}.yaml", "--index", "prepared",
                         "--features", "features.h5", "--heads-dir", "heads", "--selected", "selected.json",
                         "--out", f"ft_{name}", "--metrics", f"metrics/ft_{name}.json", "--live", f"live_{name}",
                         cwd=work)
        m = json.loads((work / "metrics" / f"ft_{name}.json").read_text())
        info = json.loads((work / f"ft_{name}" / "model.json").read_text())
        curve = " ".join(f"{h['val_accuracy']:.3f}" for h in info["history"])
        rows.append((f"fine-tune from {'the selected head (LP-FT)' if warm else 'a random head'}",
                     m["start_val"]["accuracy"], m["val"]["accuracy"], m["best_epoch"], seconds, curve))
    selected = json.loads((work / "selected.json").read_text())
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"\ndata {args.data} | {params['backbone']['name']} {params['backbone']['weights']} "
          f"{args.image_size or 'default'} px | {args.epochs} epochs, bn {args.bn}, lr {args.lr}, body x{args.body_lr_ratio},"
          f" {args.precision} | device: {device}")
    print(f"extract {times['extract']:.1f} s; heads logreg {times['logreg']:.1f} s, mlp {times['mlp']:.1f} s\n")
    print("| model | val accuracy at start | best val accuracy | best epoch | seconds | val accuracy per epoch (0 = start) |")
    print("|---|---|---|---|---|---|")
    for r in selected["ranking"]:
        print(f"| head `{r['head']}` (cached features) | - | {r['val_accuracy']:.4f} | - | {times[r['head']]:.1f} | - |")
    for name, start, best, epoch, seconds, curve in rows:
        print(f"| {name} | {start:.4f} | {best:.4f} | {epoch} | {seconds:.1f} | {curve} |")


if __name__ == "__main__":
    main()
