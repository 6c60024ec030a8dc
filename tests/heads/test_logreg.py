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


# --- the torch solver against scikit-learn ---------------------------------------------------------------------

def _sklearn_objective(layer: torch.nn.Linear, x: np.ndarray, y: np.ndarray, c: float, scale: np.ndarray,
                       sample_weight: np.ndarray) -> float:
    """scikit-learn's LogisticRegression objective, mean form, in float64, for a folded layer.

    (1/S) sum_i s_i CE_i + ||w||^2 / (2 C S) with w in standardised space (W' sigma); for two classes sklearn's
    single vector is the difference of the two rows (the softmax of [-z/2, z/2] is the sigmoid of z).
    """
    weight = layer.weight.detach().double().numpy()
    logits = x.astype(np.float64) @ weight.T + layer.bias.detach().double().numpy()
    logits -= logits.max(1, keepdims=True)
    ce = np.log(np.exp(logits).sum(1)) - logits[np.arange(len(y)), y]
    coef = weight * scale
    if coef.shape[0] == 2:
        coef = coef[1:] - coef[:1]
    total = sample_weight.sum()
    return float((sample_weight * ce).sum() / total + (coef ** 2).sum() / (2 * c * total))


@pytest.mark.parametrize("class_weight", [None, "balanced"])
@pytest.mark.parametrize("classes", [[3, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], ids=["binary", "multiclass"])
def test_torch_solver_agrees_with_sklearn(classes, class_weight):
    """Same data, same C, same class weights: both solvers reach the same minimum of the same objective.

    Tolerances: both stop when the largest gradient component is below tol = 1e-6 on a strictly convex objective,
    so both sit next to its one minimiser; the torch solver evaluates in float32 (relative error ~1e-7 per value, a
    few 1e-6 summed over 1,000+ rows), so its objective can be above scikit-learn's float64 one by ~1e-6 relative:
    we allow 1e-5. Probabilities then differ by at most ~1e-3 (measured: 3e-5 binary, 8e-4 multiclass); we allow
    2e-3, and predictions may differ only on rows at a near tie.
    """
    from sklearn.utils.class_weight import compute_class_weight

    from pipeline.core.heads.logreg import balanced_class_weight

    x, y = _digits(classes)
    if class_weight:  # make it imbalanced, so the weights matter: keep a third of class 0
        keep = (y != 0) | (np.arange(len(y)) % 3 == 0)
        x, y = x[keep], y[keep]
        np.testing.assert_allclose(balanced_class_weight(y, len(classes)),
                                   compute_class_weight("balanced", classes=np.arange(len(classes)), y=y))
    weights = balanced_class_weight(y, len(classes))[y] if class_weight else np.ones(len(y))
    scale = StandardScaler().fit(x).scale_
    layers, info = {}, {}
    for solver in ("sklearn", "torch"):
        cfg = LogregConfig(C=[0.05], max_iter=20000, tol=1e-6, solver=solver, class_weight=class_weight)
        layers[solver], info[solver] = fit_logreg(x, y, x, y, cfg, len(classes))
        assert info[solver]["solver"] == solver
    f = {s: _sklearn_objective(layers[s], x, y, 0.05, scale, weights) for s in layers}
    assert f["torch"] <= f["sklearn"] * (1 + 1e-5), f
    with torch.no_grad():
        probs = {s: torch.softmax(layers[s](torch.from_numpy(x)).double(), 1).numpy() for s in layers}
    np.testing.assert_allclose(probs["torch"], probs["sklearn"], atol=2e-3, rtol=0)
    differ = probs["torch"].argmax(1) != probs["sklearn"].argmax(1)
    assert (np.sort(probs["sklearn"][differ], 1)[:, -1] - np.sort(probs["sklearn"][differ], 1)[:, -2] < 4e-3).all()


@pytest.mark.slow
def test_torch_solver_sweep_warm_start_and_subsample_reach_the_cold_solutions(monkeypatch):
    """Warm starts (C ascending, and the first C from a subsample) change where L-BFGS starts, not where it ends:
    each C's model equals the one solved alone from zero, within the float32 solver's tolerance."""
    from pipeline.core.heads import softmax

    x, y = _digits(list(range(10)))
    monkeypatch.setattr(softmax, "SUBSAMPLE_MIN_ROWS", 64)  # 1,797 rows: the subsample start runs (every 8th row)
    cfg = LogregConfig(C=[1.0, 0.01, 0.1], max_iter=20000, tol=1e-6, solver="torch")
    swept, info = fit_logreg(x, y, x, y, cfg, 10)
    by_c = {r["C"]: r for r in info["search"]}
    for c in cfg.C:
        _, alone = fit_logreg(x, y, x, y, LogregConfig(C=[c], max_iter=20000, tol=1e-6, solver="torch"), 10)
        assert alone["search"][0]["val_accuracy"] == pytest.approx(by_c[c]["val_accuracy"], abs=2 / len(y))
        assert alone["search"][0]["val_loss"] == pytest.approx(by_c[c]["val_loss"], rel=1e-3)


def test_streamed_solver_equals_in_memory(tmp_path, monkeypatch):
    """Features left in the HDF5 file (StreamedInputs, read block by block) give the same model as in memory:
    the same blocks are summed in the same order."""
    import h5py

    from pipeline.core.features import cache as feats
    from pipeline.core.features.cache import StreamedInputs, read_inputs, split_shape
    from pipeline.core.features.resume import create_datasets, write_rows

    x, y = _digits(list(range(10)))
    x = np.abs(x)
    rows = [{"split": "train", "label": int(label), "id": i} for i, label in enumerate(y)]
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:  # the pipeline's own writer
        ranges = create_datasets(f, rows, {k: x.shape[1] for k in ("avg", "max", "pre_logits")}, "float32")
        write_rows(f, ranges, 0, {"avg": x, "max": x * 2, "pre_logits": x})
    monkeypatch.setattr(feats, "READ_ROWS", 256)  # several blocks (and several HDF5 chunks per block)
    streamed = StreamedInputs(path, "train", "avg", split_shape(path, "train", "avg"))
    in_memory = read_inputs(path, "train", "avg")
    np.testing.assert_array_equal(in_memory, x)
    cfg = LogregConfig(C=[0.1], tol=1e-5, solver="torch")
    a, info_a = fit_logreg(in_memory, y, in_memory, y, cfg, 10)
    b, info_b = fit_logreg(streamed, y, streamed, y, cfg, 10)
    assert info_a == info_b
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_solver_auto_by_size_and_forced():
    from pipeline.core.heads.logreg import AUTO_TORCH_VALUES, resolve_solver

    assert resolve_solver(LogregConfig(), 1079, 1280) == "sklearn"  # the default data keeps the reference
    assert resolve_solver(LogregConfig(), AUTO_TORCH_VALUES // 1280 + 1, 1280) == "torch"
    assert resolve_solver(LogregConfig(solver="sklearn"), 10**6, 1280) == "sklearn"
    assert resolve_solver(LogregConfig(solver="torch"), 10, 10) == "torch"


def _overlapping_classes(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative features (like post-ReLU pooling) around class centres in a low-rank subspace, classes
    overlapping: the weights stay small, as with real features over many rows, so a change of C moves the
    gradient by little."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    basis = rng.normal(size=(8, d)) / 2
    centres = rng.normal(size=(k, 8)) * 0.5
    x = np.maximum((centres[y] + rng.normal(size=(n, 8))) @ basis + 0.5 * rng.normal(size=(n, d)) + 0.3, 0)
    return (x * 3 + 1).astype(np.float32), y


def test_warm_started_larger_c_is_solved_not_returned_as_is():
    """A warm-started C must reach its own minimum, not stop at the previous C's solution.

    The flaw this guards against: moving from C = 1 to C = 100 changes the gradient only by the penalty's change,
    (1 - 1/100) W / S; on 3,000 rows with these small weights that is under tol = 1e-3 already at the C = 1
    solution, so an absolute-tol-only L-BFGS stopped after 0 iterations and returned the C = 1 model (objective at
    C = 100 then 5.7e-4 above scikit-learn's minimum; with the relative stop 2.9e-6, measured). The reference is
    scikit-learn's LogisticRegression at C = 100 solved tightly (tol 1e-8): the swept model's objective must be
    within 1e-5 relative of it (float32 evaluation, as in test_torch_solver_agrees_with_sklearn), and its
    probabilities within 1e-2 (at tol 1e-3, not 1e-6: measured 3.1e-3, against 6.2e-2 for the C = 1 model).
    """
    from pipeline.core.heads.softmax import fit_softmax_path

    x, y = _overlapping_classes(3000, 64, 5)
    scaler = StandardScaler().fit(x)
    path, mean, scale = fit_softmax_path(lambda: iter([(0, x)]), y, 5, 64, [1.0, 100.0], class_weight=None,
                                         tol=1e-3, max_iter=2000, device=torch.device("cpu"))
    assert path[100.0][2] > 0  # iterations at C = 100: the warm start was not accepted as it stood
    sk = LogisticRegression(C=100.0, tol=1e-8, max_iter=10000).fit(scaler.transform(x), y)
    reference = fold_scaler_into_linear(sk.coef_, sk.intercept_, scaler.mean_, scaler.scale_)
    swept = fold_scaler_into_linear(*path[100.0][:2], mean, scale)
    previous = fold_scaler_into_linear(*path[1.0][:2], mean, scale)
    ones = np.ones(len(y))
    f = {name: _sklearn_objective(layer, x, y, 100.0, scaler.scale_, ones)
         for name, layer in (("reference", reference), ("swept", swept), ("previous", previous))}
    assert f["previous"] > f["reference"] * (1 + 1e-4), f  # the data set shows the effect: C = 1's model is off
    assert f["swept"] <= f["reference"] * (1 + 1e-5), f
    with torch.no_grad():
        probs = {name: torch.softmax(layer(torch.from_numpy(x)).double(), 1).numpy()
                 for name, layer in (("reference", reference), ("swept", swept))}
    np.testing.assert_allclose(probs["swept"], probs["reference"], atol=1e-2, rtol=0)


def test_gradient_product_of_the_device_path_equals_the_cpu_path():
    """The GPU branch of the gradient product (torch's addmm) computes what the CPU branch (numpy) does; it used to
    call itself forever. Run here on CPU tensors with the device's type set to cuda, so no GPU is needed."""
    from types import SimpleNamespace

    from pipeline.core.heads.softmax import _Objective

    rng = np.random.default_rng(0)
    p = torch.from_numpy(rng.normal(size=(300, 7)).astype(np.float32))
    x = torch.from_numpy(rng.normal(size=(300, 40)).astype(np.float32))
    grads = {}
    for kind in ("cpu", "cuda"):
        objective = _Objective.__new__(_Objective)
        objective.device = SimpleNamespace(type=kind)
        grads[kind] = torch.zeros(7, 40)
        objective._add_grad(grads[kind], p, x)
    reference = p.double().T @ x.double()
    for kind, g in grads.items():
        torch.testing.assert_close(g.double(), reference, rtol=0, atol=1e-4, msg=kind)


def test_whitener_whitens_the_standardised_covariance():
    """P = (S + r I)^(-1/2) for S the standardised features' covariance: P S P = S (S + r I)^-1 (they commute), so
    correlated features come out white up to the ridge; P is symmetric (the gradient's chain rule uses P for P^T)."""
    from pipeline.core.heads.softmax import WHITEN_RIDGE, _whitener, standardizer

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5000, 6)) @ rng.normal(size=(6, 6)) + 3).astype(np.float32)  # correlated features

    def blocks():
        return iter([(0, x[:2000]), (2000, x[2000:])])

    mean, scale = standardizer(blocks, 6)
    p = _whitener(blocks, len(x), mean, scale)
    z = (x.astype(np.float64) - mean) / scale
    s = z.T @ z / len(z)
    assert np.abs(s - np.eye(6)).max() > 0.3  # the test data are correlated
    ridge = WHITEN_RIDGE * np.trace(s) / 6
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    np.testing.assert_allclose(p @ s @ p, s @ np.linalg.inv(s + ridge * np.eye(6)), atol=1e-8)
