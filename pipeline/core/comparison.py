"""The backbone sweep's comparison: val accuracy per head and backbone, extraction speed, features per image.

Read from what the sweep's stages wrote (`metrics/sweep/<backbone>/{extract,logreg,mlp}.json`), gathered into one
metrics file (`dvc exp show` and `dvc metrics show` list it), one CSV for `dvc plots`, and a table and a figure in the
report. Extraction speed is the one machine-dependent figure: it sits under `speed`, which `pipeline.verify` reports
and never compares.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

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
    """{backbone: val accuracy and loss per head, features per image, image size, speed}, in the params' order."""
    out = {}
    for name in backbones:
        ext = _read(sweep_dir / name / "extract.json", f"sweep_extract@{name}")
        fits = {h: _read(sweep_dir / name / f"{h}.json", f"sweep_heads@{name}-{h}") for h in heads}
        out[name] = {
            "val_accuracy": {h: fits[h]["val"]["accuracy"] for h in heads},
            "val_loss": {h: fits[h]["val"]["loss"] for h in heads},
            "features_per_image": ext["features_per_image"],
            "image_size": ext["image_size"],
            "speed": ext["speed"],
        }
    return out


def write_plot_rows(path: Path, results: dict) -> None:
    """One row per (backbone, head) for `dvc plots`: val accuracy, and the backbone's extraction img/s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["backbone", "head", "val_accuracy", "img_per_s"])
        for name, r in results.items():
            for head, acc in r["val_accuracy"].items():
                writer.writerow([name, head, f"{acc:.6f}", r["speed"]["img_per_s"]])


def best(results: dict) -> tuple[str, str, float]:
    """(backbone, head, val accuracy) of the best pair; ties go to the earlier backbone and head in the params'
    order (logreg, the cheaper head, before mlp), never to speed, which is the machine's, not the result's."""
    pairs = [(acc, -i, -j, name, head) for i, (name, r) in enumerate(results.items())
             for j, (head, acc) in enumerate(r["val_accuracy"].items())]
    acc, _, _, name, head = max(pairs)
    return name, head, acc


def plot_sweep(path: Path, results: dict) -> None:
    """Val accuracy per head and backbone (grouped bars), beside each backbone's extraction speed."""
    from pipeline.core.report import plt, save_figure

    names = list(results)
    heads = list(next(iter(results.values()))["val_accuracy"])
    fig, (ax, sp) = plt.subplots(1, 2, figsize=(9, 0.8 + 0.6 * len(names) * len(heads) / 2 + 1),
                                 gridspec_kw={"width_ratios": [3, 2]})
    height = 0.8 / len(heads)
    for j, head in enumerate(heads):
        ys = [i + j * height for i in range(len(names))]
        acc = [results[n]["val_accuracy"][head] for n in names]
        bars = ax.barh(ys, acc, height=height, label=head)
        ax.bar_label(bars, labels=[f"{a:.4f}" for a in acc], padding=2, fontsize=7)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names, fontsize=8)
    low = min(min(r["val_accuracy"].values()) for r in results.values())
    ax.set_xlim(max(0.0, low - 0.1), 1.0)
    ax.invert_yaxis()
    ax.set_xlabel("val accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("heads per backbone", fontsize=10)
    speed = [results[n]["speed"]["img_per_s"] for n in names]
    bars = sp.barh(range(len(names)), speed, color="tab:gray")
    sp.bar_label(bars, labels=[f"{s:.0f}" for s in speed], padding=2, fontsize=7)
    sp.set_yticks(range(len(names)), [f"{results[n]['image_size']} px" for n in names], fontsize=8)
    sp.invert_yaxis()
    device = next(iter(results.values()))["speed"]["device"]
    sp.set_xlabel(f"extraction img/s ({device}, this run)")
    sp.set_title("speed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def sweep_section(results: dict, figure: str | None) -> list[str]:
    """The report's "Backbone sweep" section: one table row per backbone, and the figure."""
    heads = list(next(iter(results.values()))["val_accuracy"])
    rows = []
    for name, r in results.items():
        feats = r["features_per_image"]
        rows.append([f"`{name}`", f"{r['image_size']} px",
                     *[f"{100 * r['val_accuracy'][h]:.2f} %" for h in heads],
                     f"{r['speed']['img_per_s']:.1f}", f"{feats['avg']} / {feats['pre_logits']}"])
    header = ["backbone", "image size", *[f"val acc {h}" for h in heads], "extract img/s",
              "features per image (avg / pre_logits)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    name, head, acc = best(results)
    device = next(iter(results.values()))["speed"]["device"]
    out = ["## Backbone sweep", f"Each backbone of `sweep.backbones` extracted once and both heads fitted on its cache "
           f"(`dvc repro compare`); best: `{name}` with {head}, val accuracy {100 * acc:.2f} %. Extraction speed is "
           f"this run's, on {device} (the only machine-dependent figure in this report).", "", *lines, ""]
    if figure:
        out += [f"![backbone sweep]({figure})", ""]
    return out
