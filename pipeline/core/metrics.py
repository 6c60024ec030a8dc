"""Scores of a model's logits: accuracy, cross-entropy, top-5, balanced accuracy, per-class precision/recall, and
the confusion matrix.

Scores are built from per-row values (predicted class, loss, top-5 hit), so a split of any size is scored block by
block (:func:`row_scores` per block, :func:`summarize` once) without ever holding its N x K logits.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

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

    Keys: `accuracy`, `loss` (mean cross-entropy), `balanced_accuracy` (mean recall over the classes present),
    `top5_accuracy` (only with more than 5 classes), and `per_class` with `precision`, `recall` and `support` lists
    in class order (scikit-learn's; a class never predicted has precision 0).
    """
    from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support  # only when scoring

    predicted = rows["predicted"]
    precision, recall, _, support = precision_recall_fscore_support(
        labels, predicted, labels=list(range(num_classes)), zero_division=0)
    out = {"accuracy": float((predicted == labels).mean()),
           "loss": float(rows["loss"].astype(np.float64).mean()),
           "balanced_accuracy": _balanced_accuracy(balanced_accuracy_score, labels, predicted)}
    if num_classes > TOP_K:
        out["top5_accuracy"] = float(rows["top5"].mean())
    out["per_class"] = {"precision": [round(float(v), 6) for v in precision],
                        "recall": [round(float(v), 6) for v in recall], "support": [int(v) for v in support]}
    return out


def _balanced_accuracy(score, labels: np.ndarray, predicted: np.ndarray) -> float:
    # a prediction of a class absent from this split is an ordinary error here, not worth sklearn's warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(score(labels, predicted))


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
