"""Heads on a large feature cache: wall time, peak memory and val accuracy, against the textbook sweep.

Writes a synthetic cache laid out like extraction's (N rows of D features, avg + max, K classes, train/val) with the
pipeline's own HDF5 writer (pipeline/core/features/resume.py), then runs, each in a fresh process so that its peak RSS is
its own:

- `logreg`: the real heads code (`fit_head`), logistic regression on avg pooling (solver `auto`: torch at this size);
- `logreg-stream`: the same with `in_memory_gb: 0` (features streamed from the file block by block);
- `mlp` / `mlp-stream`: the MLP head on [avg, max], in memory and streamed, `--mlp-epochs` epochs;
- `textbook`: `h5py` arrays loaded whole, scikit-learn StandardScaler + LogisticRegression for the same C grid,
  best C on val.

For each: wall time, peak RSS above the process's baseline (after imports, before any data), the bytes of features
it reads, their ratio, and val accuracy; then the logreg / textbook speed ratio. The machine is named in the output.

    python bench/heads.py --n 100000 --k 100
    python bench/heads.py --n 1280000 --d 1280 --k 1000 --runs logreg mlp --dir /tmp --json /tmp/heads.json  # GPU

On a GPU (the heads' `device: auto`) each torch-run head also reports its peak GPU memory
(`torch.cuda.max_memory_allocated`, reset before the fit); `peak_gpu_bytes` is None on a CPU and for `textbook`.
The GPU command is issue 27's ImageNet-sized case (1.28 M rows, 1,280 features, 1,000 classes): its cache holds avg,
max and pre_logits, 3 x 1.28 M x 1,280 float32 = ~18.3 GiB (19.7 GB) on disk under --dir (/tmp: mind the disk), and
writing it takes minutes before the first head starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

C_GRID = [0.01, 0.1, 1.0]
RUNS = ("logreg", "logreg-stream", "mlp", "mlp-stream", "textbook")


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_cache(path: Path, n: int, k: int, d: int, val_fraction: float, seed: int = 0) -> None:
    """A cache with class structure: non-negative features (post-ReLU pooling) around per-class centres in a
    low-rank subspace, so classes overlap as real features do (val accuracy well below 100 %)."""
    import h5py

    from pipeline.core.features.resume import create_datasets, write_rows

    rng = np.random.default_rng(seed)
    n_val = int(n * val_fraction)
    labels = rng.integers(0, k, size=n)
    rows = [{"split": "train" if i < n - n_val else "val", "label": int(labels[i]), "id": i} for i in range(n)]
    basis = rng.normal(size=(64, d)).astype(np.float32) / 8.0
    centres = rng.normal(size=(k, 64)).astype(np.float32) * 0.4
    with h5py.File(path, "w", track_order=True) as f:
        f.attrs["classes"] = json.dumps([f"c{i:04d}" for i in range(k)])
        ranges = create_datasets(f, rows, {"avg": d, "max": d, "pre_logits": d}, "float32")
        for start in range(0, n, 16384):
            y = labels[start:start + 16384]
            latent = centres[y] + rng.normal(size=(len(y), 64)).astype(np.float32)
            avg = np.maximum(latent @ basis + 0.3 * rng.normal(size=(len(y), d)).astype(np.float32) + 0.2, 0)
            mx = avg * 2.0 + np.abs(rng.normal(size=avg.shape).astype(np.float32)) * 0.5
            avg = avg.astype(np.float32)  # a CNN's pre_logits is its average pooling
            write_rows(f, ranges, start, {"avg": avg, "max": mx.astype(np.float32), "pre_logits": avg})


def child(run: str, features: Path, mlp_epochs: int, textbook_max_iter: int) -> dict:
    """One measured run, in this process; returns its figures."""
    import h5py
    import torch  # imported before the baseline, like the stage does
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.core.heads.fitting import fit_head
    from pipeline.infra.config import LogregConfig, MlpConfig
    from pipeline.infra.runtime import pin_torch_threads

    pin_torch_threads()
    with h5py.File(features) as f:
        n_tr, d = f["train/avg"].shape
        n_va = f["val/avg"].shape[0]
    # the heads' `device: auto` puts the torch solver and the MLP on the GPU when there is one: its peak memory is
    # the figure there (RSS no longer holds the work); the CUDA context is made before the RSS baseline
    cuda = run != "textbook" and torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_now_bytes()
    t0 = time.perf_counter()
    if run == "textbook":
        with h5py.File(features) as f:
            xtr, ytr = f["train/avg"][...], f["train/labels"][...]
            xva, yva = f["val/avg"][...], f["val/labels"][...]
        accs = []
        for c in C_GRID:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=textbook_max_iter))
            accs.append(float((model.fit(xtr, ytr).predict(xva) == yva).mean()))
        acc, read = max(accs), (n_tr + n_va) * d * 4
        detail = {"val_accuracy_per_C": accs}
    else:
        head = run.split("-")[0]
        memory = 0.0 if run.endswith("stream") else 64.0
        solver = "torch" if run.endswith("stream") else "auto"  # streaming is the torch solver's
        cfg = (LogregConfig(C=list(C_GRID), in_memory_gb=memory, solver=solver) if head == "logreg"
               else MlpConfig(epochs=mlp_epochs, patience=mlp_epochs, batch_size=256, in_memory_gb=memory))
        _, spec, metrics = fit_head(head, features, cfg)
        acc = metrics["val"]["accuracy"]
        read = (n_tr + n_va) * spec.in_features * 4
        detail = {"C": spec.fit.get("C"), "solver": spec.fit.get("solver"),
                  "val_accuracy_per_C": [r["val_accuracy"] for r in spec.fit.get("search", [])]}
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"run": run, "wall_s": wall, "peak_rss_above_baseline": _rss_peak_bytes() - base,
            "baseline_rss": base, "feature_bytes": read, "val_accuracy": acc,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "gpu": torch.cuda.get_device_name() if cuda else None, **detail}


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}; torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="rows in all (train + val)")
    ap.add_argument("--k", type=int, default=100, help="classes")
    ap.add_argument("--d", type=int, default=1280, help="features per pooling")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    ap.add_argument("--mlp-epochs", type=int, default=2)
    ap.add_argument("--textbook-max-iter", type=int, default=2000,
                    help="LogisticRegression max_iter for the textbook sweep (the heads use 2000 and tol 1e-4)")
    ap.add_argument("--dir", type=Path, help="where to write the cache (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.child:
        print(json.dumps(child(args.child, args.features, args.mlp_epochs, args.textbook_max_iter)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        features = Path(tmp) / "features.h5"
        t0 = time.perf_counter()
        write_cache(features, args.n, args.k, args.d, args.val_fraction)
        print(f"machine: {machine()}")
        print(f"cache: N={args.n:,} (val {args.val_fraction:g}), K={args.k}, D={args.d} per pooling, "
              f"{features.stat().st_size / 2**30:.2f} GiB, written in {time.perf_counter() - t0:.0f} s")
        results = []
        for run in args.runs:
            proc = subprocess.run([sys.executable, __file__, "--child", run, "--features", str(features),
                                   "--mlp-epochs", str(args.mlp_epochs),
                                   "--textbook-max-iter", str(args.textbook_max_iter)],
                                  capture_output=True, text=True)
            if args.json:  # the child's log (solver iterations, warnings) beside the figures
                args.json.with_suffix(f".{run}.log").write_text(proc.stderr)
            if proc.returncode:
                print(f"{run}: failed\n{proc.stderr[-2000:]}")
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(_row(results[-1]), flush=True)
    _summary(results)
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "k": args.k, "d": args.d, "machine": machine(),
                                         "results": results}, indent=1))


def _row(r: dict) -> str:
    gib = 2**30
    return (f"{r['run']:<14} wall {r['wall_s']:8.1f} s  peak RSS above baseline {r['peak_rss_above_baseline'] / gib:6.2f}"
            f" GiB  features read {r['feature_bytes'] / gib:6.2f} GiB  ratio "
            f"{r['peak_rss_above_baseline'] / r['feature_bytes']:5.2f}x  "
            + (f"peak GPU {r['peak_gpu_bytes'] / gib:6.2f} GiB  " if r.get("peak_gpu_bytes") is not None else "")
            + f"val accuracy {r['val_accuracy']:.4f}"
            f"  {json.dumps({k: v for k, v in r.items() if k in ('C', 'solver', 'val_accuracy_per_C')})}")


def _summary(results: list[dict]) -> None:
    by = {r["run"]: r for r in results}
    if "logreg" in by and "textbook" in by:
        a, b = by["logreg"], by["textbook"]
        print(f"logreg C sweep vs textbook: {b['wall_s'] / a['wall_s']:.2f}x faster, val accuracy "
              f"{a['val_accuracy']:.4f} vs {b['val_accuracy']:.4f} ({100 * (a['val_accuracy'] - b['val_accuracy']):+.2f} "
              "points)")


if __name__ == "__main__":
    main()
