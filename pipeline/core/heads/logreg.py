"""Logistic-regression head: standardised features + L2 multinomial logistic regression, C chosen on val.

Two solvers for the same objective (pipeline/core/heads/softmax.py writes it out): scikit-learn's
StandardScaler + LogisticRegression (lbfgs, float64), the reference, for small data; and the torch L-BFGS solver for
large data (float32, block by block, streamed from HDF5 when the features stay on disk, GPU when present, warm-started
across the C sweep). `heads.logreg.solver: auto` picks by size (:data:`AUTO_TORCH_VALUES`); `sklearn` or `torch`
forces one. tests/heads/test_logreg.py checks that both reach the same model.

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

from pipeline.core.features.cache import StreamedInputs, input_blocks
from pipeline.core.heads.metrics import concat_scores, row_scores
from pipeline.infra.config import LogregConfig
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import resolve_device, single_threaded

log = logging.getLogger(__name__)

# `solver: auto` uses scikit-learn up to this many training values (rows x features) and torch above: 20 M values
# is ~16,000 rows of 1280 features, where scikit-learn's sweep still takes seconds on two cores and its float64
# copies are ~0.5 GB. The default data (1,079 x 1280) stays on scikit-learn, the reference.
AUTO_TORCH_VALUES = 20_000_000


def resolve_solver(cfg: LogregConfig, rows: int, features: int) -> str:
    """The solver `cfg.solver` means for a training set of `rows` x `features`."""
    if cfg.solver != "auto":
        return cfg.solver
    return "torch" if rows * features > AUTO_TORCH_VALUES else "sklearn"


def balanced_class_weight(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (K n_k) per class: scikit-learn's `class_weight='balanced'`."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return len(labels) / (num_classes * np.maximum(counts, 1))


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


def linear_from_pipeline(model) -> nn.Linear:
    """The folded layer of a fitted scikit-learn Pipeline(StandardScaler, LogisticRegression)."""
    scaler, clf = model[0], model[-1]
    return fold_scaler_into_linear(clf.coef_, clf.intercept_, scaler.mean_, scaler.scale_)


@torch.no_grad()
def _val_scores(layer: nn.Linear, x_val: np.ndarray | StreamedInputs, y_val: np.ndarray) -> tuple[float, float]:
    """Val accuracy and mean cross-entropy of the stored (folded) layer, block by block."""
    rows = concat_scores([row_scores(layer(torch.from_numpy(block)), torch.from_numpy(y_val[s:s + len(block)]))
                          for s, block in input_blocks(x_val)])
    return float((rows["predicted"] == y_val).mean()), float(rows["loss"].astype(np.float64).mean())


def _sklearn_path(x_train: np.ndarray, y_train: np.ndarray, cfg: LogregConfig) -> dict[float, nn.Linear]:
    from sklearn.linear_model import LogisticRegression  # imported only when this solver runs
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for c in cfg.C:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=cfg.max_iter, tol=cfg.tol,
                                                                   class_weight=cfg.class_weight))
        out[c] = linear_from_pipeline(model.fit(x_train, y_train))
    return out


def _torch_path(x_train: np.ndarray | StreamedInputs, y_train: np.ndarray, cfg: LogregConfig,
                num_classes: int) -> dict[float, nn.Linear]:
    from pipeline.core.heads.softmax import fit_softmax_path

    device = resolve_device(cfg.device)
    n, d = x_train.shape
    # a GPU keeps in-memory features resident when they take at most half of its free memory
    on_device = (device.type == "cuda" and not isinstance(x_train, StreamedInputs)
                 and n * d * 4 < torch.cuda.mem_get_info(device)[0] // 2)
    weights = balanced_class_weight(y_train, num_classes) if cfg.class_weight == "balanced" else None
    # On the CPU torch's element-wise work runs on one thread and the products on OpenBLAS's pinned threads (see
    # single_threaded: torch's spinning OpenMP workers otherwise take the cores from OpenBLAS). Fixed counts: the same
    # bytes on every machine.
    with single_threaded(device.type == "cpu", blas=False):
        path, mean, scale = fit_softmax_path(lambda: input_blocks(x_train), y_train, num_classes, d, list(cfg.C),
                                             class_weight=weights, tol=cfg.tol, max_iter=cfg.max_iter,
                                             device=device, on_device=on_device)
    return {c: fold_scaler_into_linear(coef, intercept, mean, scale) for c, (coef, intercept, _) in path.items()}


def fit_logreg(x_train: np.ndarray | StreamedInputs, y_train: np.ndarray, x_val: np.ndarray | StreamedInputs,
               y_val: np.ndarray, cfg: LogregConfig, num_classes: int) -> tuple[nn.Linear, dict]:
    """Fits one model per C, keeps the best on val (accuracy, then log loss, then the smaller C).

    Inputs may be arrays or :class:`StreamedInputs` (then the torch solver reads them block by block).
    """
    if len(np.unique(y_train)) != num_classes:
        raise PipelineError(f"train has {len(np.unique(y_train))} of {num_classes} classes; every class "
                         "needs train images")
    solver = resolve_solver(cfg, *x_train.shape)
    if solver == "sklearn" and isinstance(x_train, StreamedInputs):
        raise PipelineError("heads.logreg.solver: sklearn needs the features in memory; raise "
                            "heads.logreg.in_memory_gb or use solver: torch (or auto)")
    log.info("logreg: %s solver on %d x %d", solver, *x_train.shape)
    layers = (_sklearn_path(x_train, y_train, cfg) if solver == "sklearn"
              else _torch_path(x_train, y_train, cfg, num_classes))
    results = []
    for c in cfg.C:
        acc, loss = _val_scores(layers[c], x_val, y_val)
        log.info("logreg: C=%g val accuracy %.4f, log loss %.4f", c, acc, loss)
        results.append({"C": c, "val_accuracy": acc, "val_loss": loss})
    best = min(results, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["C"]))
    return layers[best["C"]], {"C": best["C"], "solver": solver, "search": results}
