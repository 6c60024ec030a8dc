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

The linear-probe protocol of the papers, as options (both off by default, so the default results stay as they
were): `refine` (CLIP): after the log grid, a few bisection steps in log C around the best C, each fitting at most
the two log-midpoints between the best and its neighbours, not a second full sweep; `refit` (torchgeo-bench and most
linear-probe papers): C chosen on val, then the model refitted on train + val at that C. The refitted model has
trained on val, so its val scores say nothing about new images: the heads stage reports the train-only fit's
scores (the ones that chose C, and that `select` compares with the other heads), saves the refitted model, and
records `refit` with the rows it was fitted on; test scores (evaluate) are the saved model's.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from pipeline.core.features.cache import StreamedInputs, input_blocks
from pipeline.core.heads.metrics import concat_scores, row_scores
from pipeline.core.heads.spec import SELECTION_MODULE
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


# A solver's fits on one training set: (Cs, the C to warm-start them from or None) -> {C: folded layer}.
Fitter = Callable[[list[float], Optional[float]], dict[float, nn.Linear]]
Inputs = Union[np.ndarray, StreamedInputs]


def _sklearn_fitter(x_train: np.ndarray, y_train: np.ndarray, cfg: LogregConfig) -> Fitter:
    """scikit-learn's fits; each C from zero, warm start or not: the reference stays one cold fit per C."""
    from sklearn.linear_model import LogisticRegression  # imported only when this solver runs
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(cs: list[float], warm_from: float | None = None) -> dict[float, nn.Linear]:
        out = {}
        for c in cs:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=cfg.max_iter, tol=cfg.tol,
                                                                       class_weight=cfg.class_weight))
            out[c] = linear_from_pipeline(model.fit(x_train, y_train))
        return out
    return fit


def _joined_blocks(parts: list[Inputs]):
    """(first row, block) over several splits' inputs one after the other, rows numbered across them: train + val
    as one training set without copying either (each part in memory or streamed from the file)."""
    def blocks():
        offset = 0
        for x in parts:
            for start, block in input_blocks(x):
                yield offset + start, block
            offset += len(x)
    return blocks


def _torch_fitter(parts: list[Inputs], y_train: np.ndarray, cfg: LogregConfig, num_classes: int) -> Fitter:
    """The torch solver on the rows of `parts` (one split, or train + val), warm-started along C."""
    from pipeline.core.heads.softmax import SoftmaxPath

    device = resolve_device(cfg.device)
    n, d = sum(len(x) for x in parts), parts[0].shape[1]
    # a GPU keeps in-memory features resident when they take at most half of its free memory
    on_device = (device.type == "cuda" and not any(isinstance(x, StreamedInputs) for x in parts)
                 and n * d * 4 < torch.cuda.mem_get_info(device)[0] // 2)
    weights = balanced_class_weight(y_train, num_classes) if cfg.class_weight == "balanced" else None
    # On the CPU torch's element-wise work runs on one thread and the products on OpenBLAS's pinned threads (see
    # single_threaded: torch's spinning OpenMP workers otherwise take the cores from OpenBLAS). Fixed counts: the same
    # bytes on every machine.
    with single_threaded(device.type == "cpu", blas=False):
        path = SoftmaxPath(_joined_blocks(parts), y_train, num_classes, d, class_weight=weights, tol=cfg.tol,
                           max_iter=cfg.max_iter, device=device, on_device=on_device)

    def fit(cs: list[float], warm_from: float | None = None) -> dict[float, nn.Linear]:
        with single_threaded(device.type == "cpu", blas=False):
            solved = path.solve(cs, warm_from)
        return {c: fold_scaler_into_linear(coef, intercept, path.mean, path.scale)
                for c, (coef, intercept, _) in solved.items()}
    return fit


def _best(results: list[dict]) -> dict:
    """The best C's entry: higher val accuracy, then lower val log loss, then the smaller C (more regularised)."""
    return min(results, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["C"]))


def log_midpoints(tried: list[float], best: float) -> list[float]:
    """The geometric means of `best` and its neighbours among the Cs `tried`: one refinement step's new Cs (one at
    the edge of the grid, else two), halving the log-interval the best C is known to lie in, as a bisection."""
    ordered = sorted(tried)
    i = ordered.index(best)
    mids = [math.sqrt(ordered[j] * best) for j in (i - 1, i + 1) if 0 <= j < len(ordered)]
    return [c for c in mids if c not in tried]  # adjacent floats: no new C between them


def _refit(x_train: Inputs, y_train: np.ndarray, x_val: Inputs, y_val: np.ndarray, cfg: LogregConfig,
           num_classes: int, solver: str, c: float) -> nn.Linear:
    """The model at C fitted on train + val (scaler included), by the solver that chose C."""
    y = np.concatenate([y_train, y_val])
    if solver == "sklearn":
        return _sklearn_fitter(np.concatenate([x_train, x_val]), y, cfg)([c])[c]
    return _torch_fitter([x_train, x_val], y, cfg, num_classes)([c])[c]


def fit_logreg(x_train: Inputs, y_train: np.ndarray, x_val: Inputs, y_val: np.ndarray, cfg: LogregConfig,
               num_classes: int) -> tuple[nn.Linear, dict]:
    """Fits one model per C, keeps the best on val (accuracy, then log loss, then the smaller C).

    Inputs may be arrays or :class:`StreamedInputs` (then the torch solver reads them block by block).
    `cfg.refine` > 0: that many refinement steps after the grid (:func:`log_midpoints` of the best C so far, the
    torch solver warm-started from it); every C tried is in the details' `search`, in the order fitted, the
    refinement's with their `step`. `cfg.refit`: the returned model is refitted at the chosen C on train + val;
    the train-only model at that C, whose val scores chose it, is in the details under
    :data:`~pipeline.core.heads.spec.SELECTION_MODULE` (the metrics report its scores), and `refit` records the
    rows the saved model was fitted on.
    """
    if len(np.unique(y_train)) != num_classes:
        raise PipelineError(f"train has {len(np.unique(y_train))} of {num_classes} classes; every class "
                         "needs train images")
    solver = resolve_solver(cfg, *x_train.shape)
    if solver == "sklearn" and (isinstance(x_train, StreamedInputs) or isinstance(x_val, StreamedInputs)):
        raise PipelineError("heads.logreg.solver: sklearn needs the features in memory; raise "
                            "heads.logreg.in_memory_gb or use solver: torch (or auto)")
    log.info("logreg: %s solver on %d x %d", solver, *x_train.shape)
    fitter = (_sklearn_fitter(x_train, y_train, cfg) if solver == "sklearn"
              else _torch_fitter([x_train], y_train, cfg, num_classes))
    layers: dict[float, nn.Linear] = {}
    results: list[dict] = []

    def score(cs: list[float], warm_from: float | None, step: int) -> None:
        layers.update(fitter(cs, warm_from))
        for c in cs:
            acc, loss = _val_scores(layers[c], x_val, y_val)
            log.info("logreg: C=%g val accuracy %.4f, log loss %.4f", c, acc, loss)
            results.append({"C": c, "val_accuracy": acc, "val_loss": loss, **({"step": step} if step else {})})

    score(list(cfg.C), None, 0)
    for step in range(1, cfg.refine + 1):
        best_c = _best(results)["C"]
        new = log_midpoints(list(layers), best_c)
        if not new:  # a single C, or the bracket is down to adjacent floats
            break
        log.info("logreg: refinement step %d around C=%g: %s", step, best_c, ", ".join(f"{c:g}" for c in new))
        score(new, best_c, step)
    best = _best(results)
    info = {"C": best["C"], "solver": solver, "search": results}
    if not cfg.refit:
        return layers[best["C"]], info
    # The search's solver goes before the refit's is built: on a GPU it may hold the train features resident, and
    # the refit's free-memory test (keep train + val resident?) should not count them.
    fitter = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rows = {"train": len(y_train), "val": len(y_val)}
    log.info("logreg: refitting at C=%g on train + val (%d rows)", best["C"], sum(rows.values()))
    layer = _refit(x_train, y_train, x_val, y_val, cfg, num_classes, solver, best["C"])
    return layer, {**info, "refit": {"splits": ["train", "val"], "rows": rows},
                   SELECTION_MODULE: layers[best["C"]]}
