"""Stage `evaluate`: metrics of the selected head and of the fine-tuned model on val (and test when there is one),
plots, and a report a person reads.

Writes `metrics/evaluate.json` (DVC metrics); for DVC plots, confusion-matrix rows (`actual,predicted` per image) of
each model on the test split when there is one, else on val, `plots/heads.csv` (val accuracy per head) and
`plots/misclassified.png` (a few misclassified val images); and `report/report.md` with its figures.

    python -m pipeline.evaluate --out metrics/evaluate.json --plots plots
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.errors import run_main
from pipeline.artifacts import read_json, write_csv, write_json
from pipeline.data import ImageDataset, eval_transform
from pipeline.features import read_split
from pipeline.finetune import predict_logits
from pipeline.heads import head_logits, load_head, split_metrics
from pipeline.network import load_checkpoint
from pipeline.prepare import read_index
from pipeline.runtime import resolve_device, setup_logging
from pipeline import report, runlog
from pipeline.data import load_rgb
from pipeline.features import read_attrs
from PIL import ImageOps

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
            confusions["head"] = report.confusion_matrix(feats.labels, logits.argmax(1), len(classes))
        if split == "val":
            val_predictions = (f"head '{choice['head']}'", logits.argmax(1))
    if finetuned is not None:
        net, pre, _ = load_checkpoint(finetuned)
        device = resolve_device("auto")
        runlog.note(device=str(device), precision="fp32")  # for verify's provenance (pipeline/provenance.py)
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
                confusions["finetune"] = report.confusion_matrix(labels, logits.argmax(1), len(classes))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=Path("data/prepared"), help="prepare's output folder")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="extract's features file")
    parser.add_argument("--heads-dir", type=Path, default=Path("models/heads"), help="folder of fitted heads")
    parser.add_argument("--selected", type=Path, default=Path("models/selected.json"), help="select's choice")
    parser.add_argument("--finetuned", type=Path, default=Path("models/finetune"),
                        help="fine-tuned checkpoint folder; 'none' to score the head alone")
    parser.add_argument("--out", type=Path, default=Path("metrics/evaluate.json"), help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, default=Path("plots"),
                        help="folder for the DVC plots (confusion CSVs, heads.csv, misclassified.png)")
    parser.add_argument("--report", type=Path, default=Path("report"),
                        help="folder for report.md and its figures (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    finetuned = None if str(args.finetuned) == "none" else args.finetuned
    result = evaluate(args.index, args.features, args.heads_dir, args.selected, finetuned, args.plots, args.report)
    write_json(args.out, result)
    for model in ("best_head", "finetune"):
        if model in result:
            log.info("evaluate: %s %s", model, {s: round(m["accuracy"], 4) for s, m in result[model].items()
                                                 if isinstance(m, dict)})


if __name__ == "__main__":
    run_main(main, "evaluate")
