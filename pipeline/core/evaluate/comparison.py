"""The backbone comparison: val accuracy (and its 95 % interval) per head and backbone, crop size and feature width,
extraction speed.

The main pipeline's backbone is always the first row, read from its heads' metrics (`metrics/heads/<head>.json`):
comparing costs no second extraction of it. Each other backbone of `sweep.backbones` (opt-in; empty by default) adds a
row from its sweep stages' metrics (`metrics/heads/sweep/<backbone>/<head>.json`). Every heads metrics file names the
features it was fitted on (backbone, weights, crop size, pooling, width), so the comparison reads nothing else.
Gathered into one metrics file (`dvc exp show` and `dvc metrics show` list it), one CSV for `dvc plots` and a figure.
Extraction speed is the one machine-dependent figure, different on every run: it is never in a tracked file (a fresh
`dvc repro` must leave `git status` clean). It comes from the run log of each extraction stage (`runs/`,
pipeline/infra/runlog.py) and goes to `runs/sweep.md`, the table with a speed column.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Sequence

from pipeline.infra import runlog
from pipeline.infra.artifacts import atomic_path
from pipeline.infra.errors import PipelineError

HEADS = ("logreg", "mlp", "knn")  # every head the pipeline fits (dvc.yaml's heads foreach), cheapest first
SWEEP_FOLDER = "sweep"  # under the heads' metrics folder: one subfolder per sweep backbone

log = logging.getLogger(__name__)


class SweepResultsError(PipelineError, ValueError):
    """A sweep stage's results are missing; the message names the file and the stage that writes it."""


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise SweepResultsError(f"{path} not found: it is written by the `{stage}` stage; run `dvc repro compare`")
    return json.loads(path.read_text())


def _row(fits: dict[str, dict], extract_stage: str) -> dict:
    first = next(iter(fits.values()))["features"]
    return {
        "weights": first["weights"],
        "image_size": first["image_size"],
        "val_accuracy": {h: m["val"]["accuracy"] for h, m in fits.items()},
        # Wilson 95 % interval of each val accuracy (None in a metrics file written before intervals)
        "val_accuracy_ci95": {h: m["val"].get("accuracy_ci95") for h, m in fits.items()},
        "val_loss": {h: m["val"]["loss"] for h, m in fits.items()},
        "features": {h: f"{m['features']['pooling']} {m['features']['in_features']}" for h, m in fits.items()},
        "extract_stage": extract_stage,
    }


def collect(heads_dir: Path, backbones: Sequence[str], heads: Sequence[str] = HEADS) -> dict:
    """{backbone: weights, crop size, val accuracy and loss and features per head, extraction stage}: the main
    backbone first (from `heads_dir/<head>.json`), then each of `backbones` in the params' order. A sweep backbone
    that is the main one (same name and weights) is not listed twice: its row is the main pipeline's."""
    main = {h: _read(heads_dir / f"{h}.json", f"heads@{h}") for h in heads}
    name = main[heads[0]]["features"]["backbone"]
    out = {name: _row(main, "extract")}
    for other in backbones:
        folder = heads_dir / SWEEP_FOLDER / other
        fits = {h: _read(folder / f"{h}.json", f"sweep_heads@{other}-{h}") for h in heads}
        row = _row(fits, f"sweep_extract@{other}")
        if other == name and row["weights"] == out[name]["weights"]:
            log.info("compare: %s is the main backbone: its row is the main pipeline's", other)
            continue
        out[other if other not in out else f"{other} ({row['weights']})"] = row
    return out


def speeds(results: dict, run_dir: Path | None = None) -> dict[str, dict]:
    """{backbone: img/s and device} of its extraction stage's latest run here, when that run extracted images
    (absent: not run here under `dvc repro`, e.g. results pulled from git, or every row came from the feature store,
    which times nothing)."""
    found = {}
    for name, row in results.items():
        record = runlog.stage_record(row["extract_stage"], run_dir)
        if record and record.get("images_extracted") and record.get("img_per_s"):
            found[name] = {"img_per_s": record["img_per_s"], "device": record.get("device")}
    return found


def write_plot_rows(path: Path, results: dict) -> None:
    """One row per (backbone, head) for `dvc plots`: val accuracy."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["backbone", "head", "val_accuracy"])
        for name, r in results.items():
            for head, acc in r["val_accuracy"].items():
                writer.writerow([name, head, f"{acc:.6f}"])


def best(results: dict) -> tuple[str, str, float]:
    """(backbone, head, val accuracy) of the best pair; ties go to the earlier backbone and head in the params'
    order (logreg, the cheapest head, first), never to speed, which is the machine's, not the result's."""
    pairs = [(acc, -i, -j, name, head) for i, (name, r) in enumerate(results.items())
             for j, (head, acc) in enumerate(r["val_accuracy"].items())]
    acc, _, _, name, head = max(pairs)
    return name, head, acc


def plot_sweep(path: Path, results: dict) -> None:
    """Val accuracy per head and backbone (grouped bars, image size beside each backbone)."""
    from pipeline.core.evaluate.report import plt, save_figure

    names = list(results)
    heads = list(next(iter(results.values()))["val_accuracy"])
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.6 * len(names) * len(heads) / 2 + 1))
    height = 0.8 / len(heads)
    for j, head in enumerate(heads):
        ys = [i + j * height for i in range(len(names))]
        acc = [results[n]["val_accuracy"][head] for n in names]
        bars = ax.barh(ys, acc, height=height, label=head)
        ax.bar_label(bars, labels=[f"{a:.4f}" for a in acc], padding=2, fontsize=7)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))],
                  [f"{n}\n{results[n]['image_size']} px" for n in names], fontsize=8)
    low = min(min(r["val_accuracy"].values()) for r in results.values())
    ax.set_xlim(max(0.0, low - 0.1), 1.0)
    ax.invert_yaxis()
    ax.set_xlabel("val accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("heads per backbone", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def accuracy_cell(accuracy: float, interval: list[float] | None) -> str:
    """`97.50 % [95.12, 98.76]`: a val accuracy in percent and its 95 % interval when known."""
    text = f"{100 * accuracy:.2f} %"
    return text if not interval else f"{text} [{100 * interval[0]:.2f}, {100 * interval[1]:.2f}]"


def sweep_table(results: dict, speed: dict[str, dict] | None = None) -> list[str]:
    """The comparison as a markdown table, each val accuracy with its Wilson 95 % interval; with `speed` (from
    :func:`speeds`), an extraction img/s column."""
    heads = list(next(iter(results.values()))["val_accuracy"])
    header = ["backbone", "image size", *[f"val acc {h}" for h in heads], f"features ({' / '.join(heads)})"]
    if speed is not None:
        header.append("extract img/s (this machine)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (name, r) in enumerate(results.items()):
        row = [f"`{name}`" + (" (main)" if i == 0 else ""), f"{r['image_size']} px",
               *[accuracy_cell(r["val_accuracy"][h], r.get("val_accuracy_ci95", {}).get(h)) for h in heads],
               " / ".join(r["features"][h] for h in heads)]
        if speed is not None:
            row.append(f"{speed[name]['img_per_s']:.1f} ({speed[name]['device']})" if name in speed else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines
