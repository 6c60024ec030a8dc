"""The logistic-regression head: scaler folding must reproduce scikit-learn exactly, binary and multiclass."""
from __future__ import annotations

import math

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


# --- the linear-probe protocol: refinement of C and the refit on train + val ----------------------------------

def _split_digits(classes: list[int]) -> tuple[np.ndarray, ...]:
    x, y = _digits(classes)
    order = np.random.default_rng(0).permutation(len(x))
    tr, va = order[:len(x) // 2], order[len(x) // 2:]
    return x[tr], y[tr], x[va], y[va]


def test_defaults_reproduce_the_plain_sweep():
    """refine: 0 and refit: false are the sweep as it was: one cold scikit-learn fit per C (the second route, written
    out here), the best by val accuracy, then log loss, then the smaller C; the same weights to the bit, the same
    details (no refinement step, no refit entry, no selection model)."""
    from pipeline.core.heads.logreg import _val_scores

    x_tr, y_tr, x_va, y_va = _split_digits([0, 1, 2, 3, 4])
    cfg = LogregConfig(C=[0.1, 1e-3, 1e-2], solver="sklearn")
    assert (cfg.refine, cfg.refit) == (0, False)
    layer, info = fit_logreg(x_tr, y_tr, x_va, y_va, cfg, 5)
    search, layers = [], {}
    for c in cfg.C:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=cfg.max_iter, tol=cfg.tol))
        layers[c] = linear_from_pipeline(model.fit(x_tr, y_tr))
        acc, loss = _val_scores(layers[c], x_va, y_va)
        search.append({"C": c, "val_accuracy": acc, "val_loss": loss})
    best = min(search, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["C"]))["C"]
    assert info == {"C": best, "solver": "sklearn", "search": search}
    torch.testing.assert_close(layer.weight, layers[best].weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias, layers[best].bias, rtol=0, atol=0)


def test_torch_defaults_are_the_softmax_path_of_the_grid():
    """The torch solver with the defaults returns fit_softmax_path's model at the best C, bit for bit."""
    from pipeline.core.heads.softmax import fit_softmax_path

    x_tr, y_tr, x_va, y_va = _split_digits([3, 8])
    cfg = LogregConfig(C=[0.5, 0.05], solver="torch")
    layer, info = fit_logreg(x_tr, y_tr, x_va, y_va, cfg, 2)
    assert set(info) == {"C", "solver", "search"} and [r["C"] for r in info["search"]] == [0.5, 0.05]
    path, mean, scale = fit_softmax_path(lambda: iter([(0, x_tr)]), y_tr, 2, x_tr.shape[1], [0.5, 0.05],
                                         class_weight=None, tol=cfg.tol, max_iter=cfg.max_iter,
                                         device=torch.device("cpu"))
    reference = fold_scaler_into_linear(*path[info["C"]][:2], mean, scale)
    torch.testing.assert_close(layer.weight, reference.weight, rtol=0, atol=0)


class _Tagged(torch.nn.Linear):
    """A stand-in model that knows the C it was 'fitted' at."""

    def __init__(self, c: float):
        super().__init__(1, 1)
        self.c = c


def _known_curve(monkeypatch, peak_log10: float, flat: bool = False) -> list[tuple[list[float], float | None]]:
    """Replaces the fits and the val scores by a known val curve in log10 C: accuracy 1 - |log10 C - peak| / 10,
    loss |log10 C - peak| (or both constant with `flat`); returns the log of fitter calls (Cs, warm_from)."""
    from pipeline.core.heads import logreg

    calls = []

    def fitter(x, y, cfg):
        def fit(cs, warm_from=None):
            calls.append((list(cs), warm_from))
            return {c: _Tagged(c) for c in cs}
        return fit

    def scores(layer, x, y):
        gap = 0.0 if flat else abs(math.log10(layer.c) - peak_log10)
        return 1.0 - gap / 10, gap

    monkeypatch.setattr(logreg, "_sklearn_fitter", fitter)
    monkeypatch.setattr(logreg, "_val_scores", scores)
    return calls


def test_refinement_bisects_log_c_around_the_best(monkeypatch):
    """Val curve peaked at log10 C = -1.3 on the grid 1e-3 .. 1: the grid's best is 0.1 (log -1). Step 1 fits the
    log-midpoints with its neighbours, 10^-1.5 and 10^-0.5 (best: -1.5, 0.2 from the peak); step 2 those of -1.5
    with -2 and -1: -1.75 and -1.25 (best: -1.25, 0.05 away); step 3 those of -1.25 with -1.5 and -1: -1.375 and
    -1.125 (0.075 and 0.175 away: -1.25 stays). Each step warm-starts from the best C so far."""
    calls = _known_curve(monkeypatch, -1.3)
    x = np.zeros((6, 1), np.float32)
    y = np.array([0, 1, 0, 1, 0, 1])
    cfg = LogregConfig(C=[1e-3, 1e-2, 0.1, 1.0], solver="sklearn", refine=3)
    _, info = fit_logreg(x, y, x, y, cfg, 2)
    exponents = [[-1.5, -0.5], [-1.75, -1.25], [-1.375, -1.125]]
    warm = [-1.0, -1.5, -1.25]
    assert calls[0] == ([1e-3, 1e-2, 0.1, 1.0], None)
    assert len(calls) == 4
    for (cs, warm_from), want, w in zip(calls[1:], exponents, warm):
        assert cs == pytest.approx([10 ** e for e in want], rel=1e-12)
        assert warm_from == pytest.approx(10 ** w, rel=1e-12)
    tried = [r["C"] for r in info["search"]]
    assert tried == [c for cs, _ in calls for c in cs]  # every C, in the order fitted
    assert [r.get("step", 0) for r in info["search"]] == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert info["C"] == pytest.approx(10 ** -1.25, rel=1e-12)
    assert 1e-2 < info["C"] < 1.0  # between the grid best's neighbours
    by_c = {r["C"]: r for r in info["search"]}
    assert by_c[info["C"]]["val_loss"] == pytest.approx(0.05)


def test_refinement_at_the_edge_of_the_grid_fits_one_c_and_ties_go_to_the_smaller_c(monkeypatch):
    """Peak beyond the grid's top: the best is its last C, which has one neighbour, so each step fits one C. A flat
    curve (every C ties on accuracy and loss): the smaller C wins, as in the grid, so refinement goes down."""
    calls = _known_curve(monkeypatch, 3.0)
    x, y = np.zeros((4, 1), np.float32), np.array([0, 1, 0, 1])
    _, info = fit_logreg(x, y, x, y, LogregConfig(C=[0.01, 1.0], solver="sklearn", refine=2), 2)
    assert [cs for cs, _ in calls[1:]] == [[pytest.approx(0.1)], [pytest.approx(10 ** -0.5)]]
    assert info["C"] == 1.0
    calls = _known_curve(monkeypatch, 0.0, flat=True)
    _, info = fit_logreg(x, y, x, y, LogregConfig(C=[0.01, 1.0], solver="sklearn", refine=2), 2)
    assert [cs for cs, _ in calls[1:]] == [[pytest.approx(0.1)], [pytest.approx(10 ** -1.5)]]
    assert info["C"] == 0.01
    calls = _known_curve(monkeypatch, 0.0)
    _, info = fit_logreg(x, y, x, y, LogregConfig(C=[1.0], solver="sklearn", refine=2), 2)
    assert len(calls) == 1 and info["C"] == 1.0  # one C: nothing to bisect


def test_log_midpoints_closed_form():
    from pipeline.core.heads.logreg import log_midpoints

    assert log_midpoints([0.01, 1.0, 0.1], 0.1) == pytest.approx([10 ** -1.5, 10 ** -0.5], rel=1e-15)
    assert log_midpoints([0.01, 0.1], 0.01) == pytest.approx([10 ** -1.5], rel=1e-15)
    assert log_midpoints([2.0], 2.0) == []


@pytest.mark.parametrize("classes", [[3, 8], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], ids=["binary", "multiclass"])
def test_refit_equals_sklearn_on_train_plus_val(classes):
    """refit: true chooses C on val as without it, then returns scikit-learn's fit at that C on the train + val rows
    (scaler refitted too); the train-only model at that C, which chose it, comes back as the selection model."""
    from pipeline.core.heads.spec import SELECTION_MODULE

    x_tr, y_tr, x_va, y_va = _split_digits(classes)
    cfg = LogregConfig(C=[1e-3, 0.1], solver="sklearn", refit=True)
    layer, info = fit_logreg(x_tr, y_tr, x_va, y_va, cfg, len(classes))
    plain_layer, plain = fit_logreg(x_tr, y_tr, x_va, y_va, LogregConfig(C=[1e-3, 0.1], solver="sklearn"),
                                    len(classes))
    selection = info.pop(SELECTION_MODULE)
    assert info == {**plain, "refit": {"splits": ["train", "val"], "rows": {"train": len(y_tr), "val": len(y_va)}}}
    torch.testing.assert_close(selection.weight, plain_layer.weight, rtol=0, atol=0)
    direct = make_pipeline(StandardScaler(), LogisticRegression(C=info["C"], max_iter=cfg.max_iter, tol=cfg.tol))
    direct.fit(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]))
    x_all = np.concatenate([x_tr, x_va])
    with torch.no_grad():
        probs = torch.softmax(layer(torch.from_numpy(x_all)).double(), 1).numpy()
    np.testing.assert_allclose(probs, direct.predict_proba(x_all), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.weight, linear_from_pipeline(direct).weight, rtol=0, atol=0)
    assert not torch.equal(layer.weight, selection.weight)  # val rows changed the model


def test_torch_refit_agrees_with_sklearn_refit():
    """The torch solver's refit on train + val reaches scikit-learn's refit, with the tolerances (and their reasons)
    of test_torch_solver_agrees_with_sklearn: objective within 1e-5 relative, probabilities within 2e-3."""
    x_tr, y_tr, x_va, y_va = _split_digits(list(range(10)))
    x_all, y_all = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    layers = {}
    for solver in ("sklearn", "torch"):
        cfg = LogregConfig(C=[0.05], max_iter=20000, tol=1e-6, solver=solver, refit=True)
        layers[solver], info = fit_logreg(x_tr, y_tr, x_va, y_va, cfg, 10)
        assert info["solver"] == solver and info["refit"]["rows"] == {"train": len(y_tr), "val": len(y_va)}
    scale = StandardScaler().fit(x_all).scale_
    f = {s: _sklearn_objective(layers[s], x_all, y_all, 0.05, scale, np.ones(len(y_all))) for s in layers}
    assert f["torch"] <= f["sklearn"] * (1 + 1e-5), f
    with torch.no_grad():
        probs = {s: torch.softmax(layers[s](torch.from_numpy(x_all)).double(), 1).numpy() for s in layers}
    np.testing.assert_allclose(probs["torch"], probs["sklearn"], atol=2e-3, rtol=0)


def test_torch_refinement_reaches_the_cold_fits_at_the_same_cs():
    """Refinement with the torch solver (each new C warm-started from the best C's solution) tries the same Cs as
    scikit-learn's cold fits and scores them alike: val loss within 1e-3 relative at every C."""
    x_tr, y_tr, x_va, y_va = _split_digits([0, 1, 2, 3, 4])
    infos = {}
    for solver in ("sklearn", "torch"):
        cfg = LogregConfig(C=[1e-3, 1e-1], max_iter=20000, tol=1e-6, solver=solver, refine=2)
        _, infos[solver] = fit_logreg(x_tr, y_tr, x_va, y_va, cfg, 5)
    cs = {s: [r["C"] for r in infos[s]["search"]] for s in infos}
    assert cs["torch"] == cs["sklearn"] and len(cs["torch"]) == 4  # one C at the edge per step, or two: 2+1+1
    for a, b in zip(infos["torch"]["search"], infos["sklearn"]["search"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=2 / len(y_va))


def test_streamed_refit_equals_in_memory(tmp_path, monkeypatch):
    """Refit with both splits left in the HDF5 file: train's blocks, then val's, numbered on from train's, give the
    model the arrays in memory give, bit for bit."""
    import h5py

    from pipeline.core.features import cache as feats
    from pipeline.core.features.cache import StreamedInputs, read_inputs, split_shape
    from pipeline.core.features.resume import create_datasets, write_rows

    x, y = _digits(list(range(10)))
    x = np.abs(x)
    split = np.where(np.arange(len(y)) < 2 * len(y) // 3, "train", "val")  # an index lists each split's rows together
    rows = [{"split": str(s), "label": int(label), "id": i} for i, (s, label) in enumerate(zip(split, y))]
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:
        ranges = create_datasets(f, rows, {k: x.shape[1] for k in ("avg", "max", "pre_logits")}, "float32")
        write_rows(f, ranges, 0, {"avg": x, "max": x * 2, "pre_logits": x})
    monkeypatch.setattr(feats, "READ_ROWS", 256)
    streamed = {s: StreamedInputs(path, s, "avg", split_shape(path, s, "avg")) for s in ("train", "val")}
    in_memory = {s: read_inputs(path, s, "avg") for s in ("train", "val")}
    labels = {s: feats.read_labels(path, s) for s in ("train", "val")}
    np.testing.assert_array_equal(in_memory["val"], x[split == "val"])
    cfg = LogregConfig(C=[0.1], tol=1e-5, solver="torch", refit=True)
    a, info_a = fit_logreg(in_memory["train"], labels["train"], in_memory["val"], labels["val"], cfg, 10)
    b, info_b = fit_logreg(streamed["train"], labels["train"], streamed["val"], labels["val"], cfg, 10)
    torch.testing.assert_close(info_a.pop("selection_module").weight, info_b.pop("selection_module").weight,
                               rtol=0, atol=0)
    assert info_a == info_b
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_fit_head_with_refit_reports_the_selection_fit_and_saves_the_refit(tiny_cache, tmp_path):
    """heads@logreg with refit: the metrics' train and val scores are those of the run without refit (the train-only
    fit at the chosen C: what select compares), the saved model is the refitted one, and head.json and the metrics
    say so (rows fitted on; the saved model's in-sample val scores); head.json holds no model object."""
    import dataclasses
    import json

    from pipeline.core.features.cache import read_inputs, read_labels
    from pipeline.core.heads.fitting import fit_head, load_head, save_head, stream_metrics
    from pipeline.infra.config import load_section

    cfg = load_section("heads", tiny_cache["params"]).logreg
    plain_module, plain_spec, plain = fit_head("logreg", tiny_cache["features"], cfg)
    module, spec, metrics = fit_head("logreg", tiny_cache["features"], dataclasses.replace(cfg, refit=True))
    assert metrics["val"] == plain["val"] and metrics["train"] == plain["train"]
    assert spec.fit["C"] == plain_spec.fit["C"] and spec.fit["search"] == plain_spec.fit["search"]
    rows = {s: len(read_labels(tiny_cache["features"], s)) for s in ("train", "val")}
    assert spec.fit["refit"] == {"splits": ["train", "val"], "rows": rows}
    assert metrics["refit"]["rows"] == rows
    assert "selection_module" not in spec.fit and json.loads(json.dumps(spec.to_dict()))["fit"] == spec.fit
    x_val = read_inputs(tiny_cache["features"], "val", spec.pooling)
    in_sample = stream_metrics(module, x_val, read_labels(tiny_cache["features"], "val"), spec.num_classes)
    assert metrics["refit"]["val_in_sample"] == {"accuracy": in_sample["accuracy"], "loss": in_sample["loss"]}
    assert not torch.equal(module.weight, plain_module.weight)
    save_head(tmp_path / "logreg", module, spec)
    loaded, loaded_spec = load_head(tmp_path / "logreg")
    torch.testing.assert_close(loaded.weight, module.weight, rtol=0, atol=0)
    assert loaded_spec.fit["refit"]["rows"] == rows
