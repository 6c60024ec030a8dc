"""The logistic-regression head: scaler folding must reproduce scikit-learn exactly, binary and multiclass."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.core.heads.logreg import fit_logreg, fold_scaler_into_linear, linear_from_pipeline
from pipeline.infra.config import LogregConfig


def _digits(classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    keep = np.isin(d.target, classes)
    # shift and stretch so that mean and sigma are far from 0 and 1: folding must handle both
    x = (d.data[keep] * 3.0 + 7.0).astype(np.float32)
    y = np.searchsorted(classes, d.target[keep])
    return x, y


@pytest.mark.parametrize("classes", [[3, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], ids=["binary", "multiclass"])
def test_folded_linear_reproduces_decision_function(classes):
    x, y = _digits(classes)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000)).fit(x, y)
    layer = linear_from_pipeline(model).double()  # the float64 route checks the algebra, not float32 rounding
    with torch.no_grad():
        logits = layer(torch.from_numpy(x).double()).numpy()
    decision = model.decision_function(x)
    if len(classes) == 2:
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits[:, 1], decision / 2, atol=1e-5, rtol=0)  # the [-w/2, w/2] layout
    else:
        np.testing.assert_allclose(logits, decision, atol=1e-5, rtol=0)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    np.testing.assert_allclose(probs, model.predict_proba(x), atol=1e-6)
    assert (logits.argmax(1) == model.predict(x)).all()


def test_folded_linear_float32_matches_closely():
    x, y = _digits(list(range(10)))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000)).fit(x, y)
    with torch.no_grad():
        logits = linear_from_pipeline(model)(torch.from_numpy(x)).numpy()
    decision = model.decision_function(x)
    np.testing.assert_allclose(logits, decision, atol=1e-4 * np.abs(decision).max(), rtol=0)
    assert (logits.argmax(1) == model.predict(x)).all()


def test_fold_closed_form():
    w, b = np.array([[2.0, -4.0]]), np.array([1.0])
    mu, sigma = np.array([1.0, 2.0]), np.array([2.0, 4.0])
    layer = fold_scaler_into_linear(w, b, mu, sigma)
    # W' = [-w/2, w/2] / sigma; b' = b_pair - W' mu
    np.testing.assert_allclose(layer.weight.detach().numpy(), [[-0.5, 0.5], [0.5, -0.5]])
    np.testing.assert_allclose(layer.bias.detach().numpy(), [-0.5 - (-0.5 + 1.0), 0.5 - (0.5 - 1.0)])


def test_fit_logreg_chooses_c_on_val():
    x, y = _digits(list(range(10)))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    tr, va = order[:900], order[900:]
    cfg = LogregConfig(C=[1e-4, 1.0], max_iter=3000, pooling="avg")
    layer, info = fit_logreg(x[tr], y[tr], x[va], y[va], cfg, 10)
    by_c = {r["C"]: r for r in info["search"]}
    assert info["C"] == max(by_c, key=lambda c: (by_c[c]["val_accuracy"], -by_c[c]["val_loss"]))
    with torch.no_grad():
        acc = (layer(torch.from_numpy(x[va])).argmax(1).numpy() == y[va]).mean()
    assert acc == pytest.approx(by_c[info["C"]]["val_accuracy"])
    assert acc > 0.9  # digits pixels are nearly linearly separable
