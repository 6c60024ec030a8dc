"""Scores of a model's logits: accuracy and cross-entropy per split, and the confusion matrix."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def split_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and mean cross-entropy (unclipped, natural log) of one split's logits."""
    t_logits, t_labels = torch.from_numpy(logits).float(), torch.from_numpy(labels).long()
    return {"accuracy": float((t_logits.argmax(1) == t_labels).float().mean()),
            "loss": float(F.cross_entropy(t_logits, t_labels))}


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = actual class, columns = predicted class."""
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (labels, predicted), 1)
    return m
