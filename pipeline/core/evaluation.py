"""Scoring the selected head and the fine-tuned model on val (and test), and writing the plots and the report.

Outputs: confusion-matrix rows (`actual,predicted` per image) of each model on the test split when there is one, else
on val; `heads.csv` (val accuracy per head); `misclassified.png`; and `report.md` with its figures.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import ImageOps
from torch.utils.data import DataLoader

from pipeline.core import report
from pipeline.core.dataset import read_index
from pipeline.core.features import read_attrs, read_split
from pipeline.core.heads import head_logits, load_head
from pipeline.core.images import ImageDataset, eval_transform, load_rgb
from pipeline.core.metrics import confusion_matrix, split_metrics
from pipeline.core.network import load_checkpoint, predict_logits
from pipeline.infra.artifacts import read_json, write_csv
from pipeline.infra.runtime import resolve_device

log = logging.getLogger("pipeline.evaluate")


def write_confusion(path: Path, classes: list[str], labels: np.ndarray, predicted: np.ndarray) -> None:
    """One row per image, for DVC's confusion template."""
    write_csv(path, ("actual", "predicted"), ((classes[a], classes[p]) for a, p in zip(labels, predicted)))


def evaluate(index_dir: Path, features: Path, heads_dir: Path, selected: Path, finetuned: Path | None,
             plots: Path, report_dir: Path | None = None) -> dict:
    """Scores both models on every evaluation split present; writes plots and the report; returns the metrics."""
    rows, meta = read_index(index_dir)
    classes = meta["classes"]
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    plot_split = splits[-1]
    choice = read_json(selected)
    head, spec = load_head(heads_dir / choice["head"])
    result: dict = {"plot_split": plot_split, "best_head": {"name": choice["head"]}}
    confusions: dict[str, np.ndarray] = {}
    val_predictions: tuple[str, np.ndarray] | None = None
    for split in splits:
        feats = read_split(features, split)
        logits = head_logits(head, spec, feats)
        result["best_head"][split] = split_metrics(logits, feats.labels)
        if split == plot_split:
            write_confusion(plots / "confusion_head.csv", classes, feats.labels, logits.argmax(1))
            confusions["head"] = confusion_matrix(feats.labels, logits.argmax(1), len(classes))
        if split == "val":
            val_predictions = (f"head '{choice['head']}'", logits.argmax(1))
    if finetuned is not None:
        net, pre, _ = load_checkpoint(finetuned)
        device = resolve_device("auto")
        net = net.to(device, memory_format=torch.channels_last)
        result["finetune"] = {}
        for split in splits:
            split_rows = [r for r in rows if r["split"] == split]
            loader = DataLoader(ImageDataset(meta["source"], split_rows, eval_transform(pre)), batch_size=64)
            logits = predict_logits(net, loader, device, split)
            labels = np.array([int(r["label"]) for r in split_rows])
            result["finetune"][split] = split_metrics(logits, labels)
            if split == plot_split:
                write_confusion(plots / "confusion_finetune.csv", classes, labels, logits.argmax(1))
                confusions["finetune"] = confusion_matrix(labels, logits.argmax(1), len(classes))
            if split == "val":
                val_predictions = ("fine-tuned model", logits.argmax(1))
    write_heads_csv(plots / "heads.csv", choice["ranking"])
    val_rows = [r for r in rows if r["split"] == "val"]
    _plot_misclassified(plots / "misclassified.png", meta, val_rows, *val_predictions)
    if report_dir is not None:
        figures = {"heads": "heads.png", "misclassified": "../plots/misclassified.png"}
        report.plot_heads(report_dir / "heads.png", choice["ranking"])
        for model, matrix in confusions.items():
            figures[f"confusion_{model}"] = f"confusion_{model}.png"
            report.plot_confusion(report_dir / f"confusion_{model}.png", matrix, classes,
                                  f"{'best head' if model == 'head' else 'fine-tuned'} on {plot_split}")
        info = None
        if finetuned is not None:
            info = read_json(finetuned / "model.json")
            figures["curves"] = "curves.png"
            report.plot_curves(report_dir / "curves.png", info["history"])
        report.write_markdown(report_dir / "report.md", meta=meta, attrs=read_attrs(features), selected=choice,
                              result=result, finetune_info=info, figures=figures)
    return result


def write_heads_csv(path: Path, ranking: list[dict]) -> None:
    """Val accuracy per head, for DVC's bar plot."""
    write_csv(path, ("head", "val_accuracy"), ((r["head"], f"{r['val_accuracy']:.6f}") for r in ranking))


def _plot_misclassified(path: Path, meta: dict, val_rows: list[dict], model: str, predicted: np.ndarray,
                        limit: int = 8) -> None:
    """The first `limit` misclassified val images (index order), titled with the true and predicted class."""
    classes = meta["classes"]
    wrong = [(r, int(p)) for r, p in zip(val_rows, predicted) if int(r["label"]) != int(p)][:limit]
    images = [np.asarray(ImageOps.fit(load_rgb(Path(meta["source"]) / r["path"]), (128, 128))) for r, _ in wrong]
    titles = [f"{Path(r['path']).name}\ntrue {r['class']} -> {classes[p]}" for r, p in wrong]
    n_wrong = int(sum(int(r["label"]) != int(p) for r, p in zip(val_rows, predicted)))
    report.plot_misclassified(path, images, titles, f"{model}: {n_wrong} of {len(val_rows)} val images wrong"
                              + (f", first {len(wrong)} shown" if wrong else ""))
