"""How much does the default fine-tune swing with its seed? Spread of val/test accuracy and loss over seeds.

Runs the pipeline's own stages in a scratch folder: prepare, extract, both heads and select once, then for each
variant of the `finetune` params and each seed the finetune and evaluate stages, and prints one table per variant
(the head's own test numbers alongside, since the fine-tune must beat them). A benchmark, not a test:

    python bench/finetune_seeds.py                                    # default data (data/digits), default params
    python bench/finetune_seeds.py --variant "lr=0.0003,warmup_epochs=1" --variant ""   # compare two settings
    python bench/finetune_seeds.py --variant "swa_start=0,ema_decay=0.99"      # EMA instead of the tail average
    python bench/finetune_seeds.py --data ../shared/data/hymenoptera_data --image-size null --hflip
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# this checkout first, then whatever PYTHONPATH already held (bench/gpu_check.sh's carried packages)
PYTHONPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def _stage(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": PYTHONPATH, "PIPELINE_RUN_DIR": str(cwd / "runs")})


def _parse_variant(text: str) -> dict:
    """`key=value,key=value` (values as YAML) -> {key: value}; the empty string is the params as they are."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} (min {min(values):.4f}, max {max(values):.4f}, spread {max(values) - min(values):.4f})"


def prepare_work(work: Path, data: Path, image_size: str | None = None, hflip: bool = False) -> None:
    """params.yaml (this repo's, with the data and overrides) in `work`, then prepare, extract, both heads and
    select there, once: the fine-tunes of every variant and seed start from the same head."""
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(data.resolve())
    if image_size is not None:
        params["backbone"]["image_size"] = yaml.safe_load(image_size)
    if hflip:
        params["finetune"]["hflip"] = True
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    if not (work / "selected.json").is_file():
        _stage("pipeline.prepare", "--out", "prepared", cwd=work)
        _stage("pipeline.extract", "--index", "prepared", "--out", "features.h5", cwd=work)
        for head in ("logreg", "mlp"):
            _stage("pipeline.heads", head, "--features", "features.h5", "--out", f"heads/{head}", "--metrics",
                   f"heads/{head}.json", "--index", "prepared", cwd=work)
        _stage("pipeline.select", "--metrics-dir", "heads", "--out", "selected.json", cwd=work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "digits", help="ImageFolder root")
    parser.add_argument("--work", type=Path, default=Path("build/finetune_seeds"), help="scratch folder")
    parser.add_argument("--image-size", default=None, help="backbone.image_size override (YAML: 96, null, auto)")
    parser.add_argument("--hflip", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant", action="append", help="finetune overrides, e.g. 'lr=0.0003,warmup_epochs=1'")
    args = parser.parse_args()
    work = args.work.resolve()
    prepare_work(work, args.data, args.image_size, args.hflip)
    print(f"# fine-tune seed spread: {args.data.name}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, seeds {args.seeds}")
    for text in args.variant or [""]:
        variant = _parse_variant(text)
        rows = []
        for seed in args.seeds:
            name = f"{'_'.join(f'{k}{v}' for k, v in variant.items()) or 'default'}_seed{seed}"
            run = work / "runs_ft" / name
            run.mkdir(parents=True, exist_ok=True)
            p = yaml.safe_load((work / "params.yaml").read_text())
            p["finetune"].update(variant, seed=seed)
            (run / "params.yaml").write_text(yaml.safe_dump(p))
            t0 = time.perf_counter()
            _stage("pipeline.finetune", "--params", str(run / "params.yaml"), "--index", "prepared", "--features",
                   "features.h5", "--heads-dir", "heads", "--selected", "selected.json", "--out", str(run / "model"),
                   "--metrics", str(run / "finetune.json"), "--live", "none", cwd=work)
            _stage("pipeline.evaluate", "--index", "prepared", "--features", "features.h5", "--heads-dir", "heads",
                   "--selected", "selected.json", "--finetuned", str(run / "model"), "--out", str(run / "eval.json"),
                   "--plots", str(run / "plots"), "--report", str(run / "report"), cwd=work)
            result = json.loads((run / "eval.json").read_text())
            split = "test" if "test" in result["finetune"] else "val"
            rows.append({"seed": seed, "val_acc": result["finetune"]["val"]["accuracy"],
                         "val_loss": result["finetune"]["val"]["loss"], "acc": result["finetune"][split]["accuracy"],
                         "loss": result["finetune"][split]["loss"], "head_acc": result["best_head"][split]["accuracy"],
                         "head_loss": result["best_head"][split]["loss"],
                         "best_epoch": json.loads((run / "finetune.json").read_text())["best_epoch"],
                         "seconds": time.perf_counter() - t0})
            r = rows[-1]
            print(f"  {text or 'default'} seed {seed}: val acc {r['val_acc']:.4f} loss {r['val_loss']:.4f} | {split} acc "
                  f"{r['acc']:.4f} loss {r['loss']:.4f} (head {r['head_acc']:.4f} / {r['head_loss']:.4f}) | best "
                  f"epoch {r['best_epoch']} | {r['seconds']:.0f} s", flush=True)
        print(f"variant '{text or 'default'}' ({split}): accuracy {_spread([r['acc'] for r in rows])}; "
              f"loss {_spread([r['loss'] for r in rows])}; loss below the head's for "
              f"{sum(r['loss'] < r['head_loss'] for r in rows)}/{len(rows)} seeds", flush=True)


if __name__ == "__main__":
    main()
