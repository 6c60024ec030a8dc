"""Scores of a model's logits: accuracy, cross-entropy, top-5, balanced accuracy, per-class precision/recall, and
the confusion matrix.

Scores are built from per-row values (predicted class, loss, top-5 hit), so a split of any size is scored block by
block (:func:`row_scores` per block, :func:`summarize` once) without ever holding its N x K logits.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.heads.intervals import balanced_accuracy_interval, wilson_interval

TOP_K = 5  # top-5 accuracy is reported when there are more than 5 classes (with 5 or fewer it is always 1)


def row_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-row predicted class, cross-entropy (natural log, unclipped) and top-5 hit of one block of logits."""
    logits, labels = logits.float(), labels.long()
    top = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices
    return {"predicted": logits.argmax(1).cpu().numpy(),
            "loss": F.cross_entropy(logits, labels, reduction="none").cpu().numpy(),
            "top5": (top == labels[:, None]).any(1).cpu().numpy()}


def concat_scores(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in blocks]) for k in ("predicted", "loss", "top5")}


def summarize(labels: np.ndarray, rows: dict[str, np.ndarray], num_classes: int) -> dict:
    """Split metrics from per-row scores.

    Keys: `accuracy` and `accuracy_ci95` (its Wilson 95 % interval [lo, hi]), `loss` (mean cross-entropy),
    `balanced_accuracy` (mean recall over the classes present) and `balanced_accuracy_ci95`
    (pipeline/core/heads/intervals.py), `top5_accuracy` (only with more than 5 classes), and `per_class` with
    `precision`, `recall` and `support` lists in class order. The definitions are scikit-learn's `balanced_accuracy_score` and
    `precision_recall_fscore_support(labels=range(K), zero_division=0)` (a class never predicted has precision 0),
    computed here from the confusion matrix: importing sklearn.metrics costs ~1.3 s per stage, a quarter of a
    head's refit on the default data (tests/heads/test_heads.py checks every figure against scikit-learn's functions).
    """
    predicted = rows["predicted"]
    counts = confusion_matrix(labels, predicted, num_classes)
    hits, support, times_predicted = np.diag(counts).astype(np.float64), counts.sum(1), counts.sum(0)
    precision = np.divide(hits, times_predicted, out=np.zeros(num_classes), where=times_predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(num_classes), where=support > 0)
    present = support > 0
    out = {"accuracy": float((predicted == labels).mean()),
           "accuracy_ci95": wilson_interval(int(hits.sum()), len(labels)),
           "loss": float(rows["loss"].astype(np.float64).mean()),
           # a prediction of a class absent from this split is an ordinary error here: only present classes count
           "balanced_accuracy": float(recall[present].mean()),
           "balanced_accuracy_ci95": balanced_accuracy_interval(recall[present].tolist(), support[present].tolist())}
    if num_classes > TOP_K:
        out["top5_accuracy"] = float(rows["top5"].mean())
    out["per_class"] = {"precision": [round(float(v), 6) for v in precision],
                        "recall": [round(float(v), 6) for v in recall], "support": [int(v) for v in support]}
    return out


def split_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> dict:
    """Metrics of one split's logits held in memory (see :func:`summarize` for the keys)."""
    t_logits = torch.from_numpy(np.asarray(logits))
    rows = row_scores(t_logits, torch.from_numpy(np.asarray(labels)))
    return summarize(np.asarray(labels), rows, num_classes or t_logits.shape[1])


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = actual class, columns = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, predicted), 1)
    return m
