"""Logistic-regression head: StandardScaler + scikit-learn LogisticRegression, C chosen on val.

The fitted model is stored as the equivalent torch `nn.Linear` with the scaler folded in
(W' = W / sigma, b' = b - W' mu), so the fine-tune stage can warm-start from it and every later stage reads one
format. A binary sklearn model has a single row w (the logit of class 1); its two-class layer is [-w/2, w/2],
which gives the same softmax probabilities and the same argmax.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.infra.config import LogregConfig
from pipeline.infra.errors import PipelineError

log = logging.getLogger("pipeline.logreg")


def fold_scaler_into_linear(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray,
                            scale: np.ndarray) -> nn.Linear:
    """Returns the Linear layer computing the sklearn model's logits directly on unscaled features.

    Arithmetic is done in float64 and rounded once to float32 at the end.
    """
    coef = np.asarray(coef, dtype=np.float64)
    intercept = np.asarray(intercept, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: decision = w.x + b is the logit of class 1
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = coef / np.asarray(scale, dtype=np.float64)[None, :]
    bias = intercept - weight @ np.asarray(mean, dtype=np.float64)
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def linear_from_pipeline(model: Pipeline) -> nn.Linear:
    scaler: StandardScaler = model[0]
    clf: LogisticRegression = model[-1]
    return fold_scaler_into_linear(clf.coef_, clf.intercept_, scaler.mean_, scaler.scale_)


def fit_logreg(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               cfg: LogregConfig, num_classes: int) -> tuple[nn.Linear, dict]:
    """Fits one model per C, keeps the best on val (accuracy, then log loss, then the smaller C)."""
    if len(np.unique(y_train)) != num_classes:
        raise PipelineError(f"train has {len(np.unique(y_train))} of {num_classes} classes; every class "
                         "needs train images")
    results = []
    for c in cfg.C:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=cfg.max_iter))
        model.fit(x_train, y_train)
        logits = linear_from_pipeline(model)(torch.from_numpy(x_val)).detach()
        acc = float((logits.argmax(1).numpy() == y_val).mean())
        # unclipped cross-entropy of the stored layer: the same number the heads' metrics report
        loss = float(F.cross_entropy(logits, torch.from_numpy(y_val).long()))
        log.info("logreg: C=%g val accuracy %.4f, log loss %.4f", c, acc, loss)
        results.append({"C": c, "val_accuracy": acc, "val_loss": loss, "model": model})
    best = min(results, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["C"]))
    search = [{k: v for k, v in r.items() if k != "model"} for r in results]
    return linear_from_pipeline(best["model"]), {"C": best["C"], "search": search}
