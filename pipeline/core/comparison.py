"""The backbone sweep's comparison: val accuracy per head and backbone, features per image, extraction speed.

Read from what the sweep's stages wrote (`metrics/sweep/<backbone>/{extract,logreg,mlp}.json`), gathered into one
metrics file (`dvc exp show` and `dvc metrics show` list it), one CSV for `dvc plots`, and a table and a figure in the
report. Extraction speed is the one machine-dependent figure, different on every run: it is never in a tracked file
(a fresh `dvc repro` must leave `git status` clean). It comes from the run log of each `sweep_extract@<backbone>`
stage (`runs/`, pipeline/infra/runlog.py) and goes to `runs/sweep.md`, the sweep table with a speed column.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from pipeline.infra import runlog
from pipeline.infra.artifacts import atomic_path
from pipeline.infra.errors import PipelineError

HEADS = ("logreg", "mlp")


class SweepResultsError(PipelineError, ValueError):
    """A sweep stage's results are missing; the message names the file and the stage that writes it."""


def _read(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise SweepResultsError(f"{path} not found: it is written by the `{stage}` stage; run `dvc repro compare`")
    return json.loads(path.read_text())


def collect(sweep_dir: Path, backbones: Sequence[str], heads: Sequence[str] = HEADS) -> dict:
    """{backbone: val accuracy and loss per head, features per image, image size}, in the params' order."""
    out = {}
    for name in backbones:
        ext = _read(sweep_dir / name / "extract.json", f"sweep_extract@{name}")
        fits = {h: _read(sweep_dir / name / f"{h}.json", f"sweep_heads@{name}-{h}") for h in heads}
        out[name] = {
            "val_accuracy": {h: fits[h]["val"]["accuracy"] for h in heads},
            "val_loss": {h: fits[h]["val"]["loss"] for h in heads},
            "features_per_image": ext["features_per_image"],
            "image_size": ext["image_size"],
        }
    return out


def speeds(backbones: Sequence[str], run_dir: Path | None = None) -> dict[str, dict]:
    """{backbone: img/s and device} of its latest `sweep_extract@<backbone>` run here (absent: not run here under
    `dvc repro`, e.g. results pulled from git)."""
    found = {}
    for name in backbones:
        record = runlog.stage_record(f"sweep_extract@{name}", run_dir)
        if record and record.get("img_per_s"):
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
    order (logreg, the cheaper head, before mlp), never to speed, which is the machine's, not the result's."""
    pairs = [(acc, -i, -j, name, head) for i, (name, r) in enumerate(results.items())
             for j, (head, acc) in enumerate(r["val_accuracy"].items())]
    acc, _, _, name, head = max(pairs)
    return name, head, acc


def plot_sweep(path: Path, results: dict) -> None:
    """Val accuracy per head and backbone (grouped bars, image size beside each backbone)."""
    from pipeline.core.report import plt, save_figure

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


def sweep_table(results: dict, speed: dict[str, dict] | None = None) -> list[str]:
    """The sweep as a markdown table; with `speed` (from :func:`speeds`), an extraction img/s column."""
    heads = list(next(iter(results.values()))["val_accuracy"])
    header = ["backbone", "image size", *[f"val acc {h}" for h in heads], "features per image (avg / pre_logits)"]
    if speed is not None:
        header.append("extract img/s (this machine)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        feats = r["features_per_image"]
        row = [f"`{name}`", f"{r['image_size']} px", *[f"{100 * r['val_accuracy'][h]:.2f} %" for h in heads],
               f"{feats['avg']} / {feats['pre_logits']}"]
        if speed is not None:
            row.append(f"{speed[name]['img_per_s']:.1f} ({speed[name]['device']})" if name in speed else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def sweep_section(results: dict, figure: str | None) -> list[str]:
    """The report's "Backbone sweep" section: one table row per backbone, and the figure (no speeds: the report is
    tracked, and speeds change on every run; `runs/sweep.md` has them)."""
    name, head, acc = best(results)
    out = ["## Backbone sweep", f"Each backbone of `sweep.backbones` extracted once and both heads fitted on its cache "
           f"(`dvc repro compare`); best: `{name}` with {head}, val accuracy {100 * acc:.2f} %. Extraction speed on "
           "the machine that ran the sweep: `runs/sweep.md` (untracked, written by the compare stage).", "",
           *sweep_table(results), ""]
    if figure:
        out += [f"![backbone sweep]({figure})", ""]
    return out
