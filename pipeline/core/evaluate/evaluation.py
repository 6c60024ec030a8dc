"""Scoring the selected head and the fine-tuned model on val (and test), and writing the plots and the report.

Outputs: confusion-matrix rows (`actual,predicted` per image) of each model on the test split when there is one, else
on val; `heads.csv` (val accuracy per head); `misclassified.png`; and `report.md` with its figures, including the
few-shot table and figure when given the `fewshot` stage's metrics (read, never recomputed here).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps
from torch.utils.data import DataLoader

from pipeline.core.data.images import ImageDataset, eval_transform, load_rgb
from pipeline.core.data.index import ImageLimits, image_limits, read_index
from pipeline.core.evaluate import report
from pipeline.core.evaluate.fewshot_report import fewshot_section, plot_fewshot
from pipeline.core.features.cache import read_attrs, read_split
from pipeline.core.finetune.network import load_finetuned, predict_logits
from pipeline.core.heads.fitting import head_logits, load_head
from pipeline.core.heads.metrics import confusion_matrix, row_scores, split_metrics
from pipeline.infra import runlog
from pipeline.infra.artifacts import read_json, write_csv
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import resolve_device

log = logging.getLogger(__name__)


@dataclass
class Scores:
    """One model's metrics per split, and its labels and predictions per split (for plots)."""

    metrics: dict = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    predicted: dict[str, np.ndarray] = field(default_factory=dict)
    losses: dict[str, np.ndarray] = field(default_factory=dict)  # per-image cross-entropy, to show the worst first

    def add(self, split: str, logits: np.ndarray, labels: np.ndarray) -> None:
        self.metrics[split] = split_metrics(logits, labels)
        rows = row_scores(torch.from_numpy(logits), torch.from_numpy(labels))
        self.labels[split], self.predicted[split], self.losses[split] = labels, rows["predicted"], rows["loss"]


def score_head(features: Path, head_dir: Path, splits: list[str]) -> Scores:
    """The selected head on the cached features of each split (a kNN head on the GPU when there is one: it compares
    every row with every train row; the others on the CPU, where their bytes are pinned)."""
    head, spec = load_head(head_dir)
    if getattr(head, "score_on_accelerator", False):
        head = head.to(resolve_device("auto"))
    scores = Scores()
    for split in splits:
        feats = read_split(features, split)
        scores.add(split, head_logits(head, spec, feats), feats.labels)
    return scores


def score_finetuned(finetuned: Path, rows: list[dict], source: str, splits: list[str],
                    limits: ImageLimits = ImageLimits()) -> Scores:
    """The fine-tuned network on the images of each split (eval transform, GPU when there is one)."""
    net, pre, _ = load_finetuned(finetuned)
    device = resolve_device("auto")
    runlog.note(device=str(device), precision="fp32")  # for verify's provenance (pipeline/infra/provenance.py)
    net = net.to(device, memory_format=torch.channels_last)
    scores = Scores()
    for split in splits:
        split_rows = [r for r in rows if r["split"] == split]
        loader = DataLoader(ImageDataset(source, split_rows, eval_transform(pre), limits=limits), batch_size=64)
        scores.add(split, predict_logits(net, loader, device, split), np.array([int(r["label"]) for r in split_rows]))
    return scores


def evaluate(index_dir: Path, features: Path, heads_dir: Path, selected: Path, finetuned: Path | None,
             plots: Path, report_dir: Path | None = None, fewshot: Path | None = None) -> dict:
    """Scores both models on every evaluation split present; writes plots and the report; returns the metrics.

    `fewshot`: the `fewshot` stage's metrics file; the report gains its table and figure (None: no such section).
    """
    rows, meta = read_index(index_dir)
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    choice = read_json(selected)
    models = {"head": score_head(features, heads_dir / choice["head"], splits)}
    if finetuned is not None:
        models["finetune"] = score_finetuned(finetuned, rows, meta["source"], splits, image_limits(meta))
    result: dict = {"plot_split": splits[-1], "best_head": {"name": choice["head"], **models["head"].metrics}}
    if "finetune" in models:
        result["finetune"] = models["finetune"].metrics
    write_plots(plots, meta, rows, choice, models, splits[-1])
    if fewshot is not None and not Path(fewshot).is_file():
        raise PipelineError(f"{fewshot} not found: it is written by the `fewshot` stage; run `dvc repro fewshot`, "
                            "or pass --fewshot none to leave the few-shot section out of the report")
    if report_dir is not None:
        write_report(report_dir, meta, read_attrs(features), choice, result, models, splits[-1], finetuned,
                     read_json(fewshot) if fewshot is not None else None)
    return result


def write_plots(plots: Path, meta: dict, rows: list[dict], choice: dict, models: dict[str, Scores],
                plot_split: str) -> None:
    """DVC plots: a confusion CSV per model on `plot_split`, val accuracy per head, misclassified val images."""
    classes = meta["classes"]
    for name, scores in models.items():
        write_confusion(plots / f"confusion_{name}.csv", classes, scores.labels[plot_split],
                        scores.predicted[plot_split])
    write_heads_csv(plots / "heads.csv", choice["ranking"])
    # the misclassified grid shows the model the user will deploy: the fine-tuned one when there is one
    shown = "finetune" if "finetune" in models else "head"
    label = "fine-tuned model" if shown == "finetune" else f"head '{choice['head']}'"
    val_rows = [r for r in rows if r["split"] == "val"]
    _plot_misclassified(plots / "misclassified.png", meta, val_rows, label, models[shown].predicted["val"],
                        models[shown].losses["val"])


def write_report(report_dir: Path, meta: dict, attrs: dict, choice: dict, result: dict, models: dict[str, Scores],
                 plot_split: str, finetuned: Path | None, fewshot: dict | None = None) -> None:
    """report.md and its figures (heads bar chart, confusion matrices, fine-tune curves, few-shot curves)."""
    classes = meta["classes"]
    figures = {"heads": "heads.png", "misclassified": "../plots/misclassified.png"}
    report.plot_heads(report_dir / "heads.png", choice["ranking"])
    for name, scores in models.items():
        figures[f"confusion_{name}"] = f"confusion_{name}.png"
        matrix = confusion_matrix(scores.labels[plot_split], scores.predicted[plot_split], len(classes))
        report.plot_confusion(report_dir / f"confusion_{name}.png", matrix, classes,
                              f"{'best head' if name == 'head' else 'fine-tuned'} on {plot_split}")
    info = None
    if finetuned is not None:
        info = read_json(finetuned / "model.json")
        figures["curves"] = "curves.png"
        report.plot_curves(report_dir / "curves.png", info["history"])
    best = models.get("finetune", models["head"])  # the model the per-class tables describe
    matrix = confusion_matrix(best.labels[plot_split], best.predicted[plot_split], len(classes))
    shown = {**result, "classes": classes, "per_class_split": plot_split,
             "most_confused": report.most_confused(matrix, classes)}
    extra: list[str] = []
    if fewshot is not None:
        # drawn again from the metrics into report/, so the report's folder holds every figure it shows
        plot_fewshot(report_dir / "fewshot.png", fewshot)
        extra = fewshot_section(fewshot, "fewshot.png")
    report.write_markdown(report_dir / "report.md", meta=meta, attrs=attrs, selected=choice, result=shown,
                          finetune_info=info, figures=figures, extra=extra)


def write_confusion(path: Path, classes: list[str], labels: np.ndarray, predicted: np.ndarray) -> None:
    """One row per image, for DVC's confusion template."""
    write_csv(path, ("actual", "predicted"), ((classes[a], classes[p]) for a, p in zip(labels, predicted)))


def write_heads_csv(path: Path, ranking: list[dict]) -> None:
    """Val accuracy per head, for DVC's bar plot."""
    write_csv(path, ("head", "val_accuracy"), ((r["head"], f"{r['val_accuracy']:.6f}") for r in ranking))


def _plot_misclassified(path: Path, meta: dict, val_rows: list[dict], model: str, predicted: np.ndarray,
                        losses: np.ndarray, limit: int = 8) -> None:
    """The `limit` worst misclassified val images (highest loss first: the confident mistakes, where label errors
    and confusable classes show), titled with the true and predicted class and the loss."""
    classes = meta["classes"]
    wrong = [(r, int(p), float(v)) for r, p, v in zip(val_rows, predicted, losses) if int(r["label"]) != int(p)]
    n_wrong = len(wrong)
    wrong = sorted(wrong, key=lambda w: -w[2])[:limit]  # stable: equal losses keep index order
    limits = image_limits(meta)
    images = [np.asarray(ImageOps.fit(load_rgb(Path(meta["source"]) / r["path"], limits.max_pixels, limits.max_aspect),
                                      (128, 128))) for r, _, _ in wrong]
    titles = [f"{Path(r['path']).name}\ntrue {r['class']} -> {classes[p]}\nloss {v:.2f}" for r, p, v in wrong]
    report.plot_misclassified(path, images, titles, f"{model}: {n_wrong} of {len(val_rows)} val images wrong"
                              + (f", worst {len(wrong)} shown (highest loss first)" if wrong else ""))
