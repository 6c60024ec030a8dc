"""Stage `evaluate`: metrics of the selected head and of the fine-tuned model on val (and test when there is one).

Writes `metrics/evaluate.json` (DVC metrics) and confusion-matrix rows (`actual,predicted` per image, DVC's
`confusion` plot template) for each model on the test split when there is one, else on val.

    python -m pipeline.evaluate --out metrics/evaluate.json --plots plots
"""
from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.errors import run_main
from pipeline.artifacts import atomic_path, read_json, write_json
from pipeline.data import ImageDataset, eval_transform
from pipeline.features import read_split
from pipeline.finetune import predict_logits
from pipeline.heads import head_logits, load_head, split_metrics
from pipeline.network import load_checkpoint
from pipeline.prepare import read_index
from pipeline.runtime import resolve_device, setup_logging

log = logging.getLogger("pipeline.evaluate")


def write_confusion(path: Path, classes: list[str], labels: np.ndarray, predicted: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(("actual", "predicted"))
            w.writerows((classes[a], classes[p]) for a, p in zip(labels, predicted))


def evaluate(index_dir: Path, features: Path, heads_dir: Path, selected: Path, finetuned: Path | None,
             plots: Path) -> dict:
    """Scores both models on every evaluation split present; writes confusion rows; returns the metrics."""
    rows, meta = read_index(index_dir)
    classes = meta["classes"]
    splits = [s for s in ("val", "test") if any(r["split"] == s for r in rows)]
    plot_split = splits[-1]
    choice = read_json(selected)
    head, spec = load_head(heads_dir / choice["head"])
    result: dict = {"plot_split": plot_split, "best_head": {"name": choice["head"]}}
    for split in splits:
        feats = read_split(features, split)
        logits = head_logits(head, spec, feats)
        result["best_head"][split] = split_metrics(logits, feats.labels)
        if split == plot_split:
            write_confusion(plots / "confusion_head.csv", classes, feats.labels, logits.argmax(1))
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
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, default=Path("data/prepared"), help="prepare's output folder")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="extract's features file")
    parser.add_argument("--heads-dir", type=Path, default=Path("models/heads"), help="folder of fitted heads")
    parser.add_argument("--selected", type=Path, default=Path("models/selected.json"), help="select's choice")
    parser.add_argument("--finetuned", type=Path, default=Path("models/finetune"),
                        help="fine-tuned checkpoint folder; 'none' to score the head alone")
    parser.add_argument("--out", type=Path, default=Path("metrics/evaluate.json"), help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="folder for confusion-matrix CSVs")
    args = parser.parse_args(argv)
    setup_logging()
    finetuned = None if str(args.finetuned) == "none" else args.finetuned
    result = evaluate(args.index, args.features, args.heads_dir, args.selected, finetuned, args.plots)
    write_json(args.out, result)
    for model in ("best_head", "finetune"):
        if model in result:
            log.info("evaluate: %s %s", model, {s: round(m["accuracy"], 4) for s, m in result[model].items()
                                                 if isinstance(m, dict)})


if __name__ == "__main__":
    run_main(main, "evaluate")
