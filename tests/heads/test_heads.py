"""Heads fitted on cached features: metrics, the MLP on concat pooling, and the safetensors round trip."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from pipeline.core.features.cache import read_split
from pipeline.core.heads.fitting import fit_head, head_logits, load_head, save_head
from pipeline.core.heads.metrics import split_metrics
from pipeline.core.heads.mlp import MlpHead
from pipeline.core.heads.selection import select_head
from pipeline.infra.config import load_section


def test_split_metrics_closed_form():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]], dtype=np.float32))
    labels = np.array([0, 1, 1])
    m = split_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3) + np.log(0.4)) / 3, rel=1e-6)


def test_mlp_head_layout():
    head = MlpHead(2560, 3, [512], 0.5)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d", "Dropout", "Linear"]
    assert head[1].p == 0.25 and head[5].p == 0.5  # first dropout halved, as fastai's create_head


@pytest.mark.parametrize("name", ["logreg", "mlp"])
def test_fit_save_load_round_trip(tiny_cache, tmp_path, name):
    cfg = getattr(load_section("heads", tiny_cache["params"]), name)
    module, spec, metrics = fit_head(name, tiny_cache["features"], cfg)
    val = read_split(tiny_cache["features"], "val")
    if name == "mlp":
        assert spec.pooling == "catavgmax" and spec.in_features == 2 * val.avg.shape[1]
        np.testing.assert_array_equal(val.inputs("catavgmax"), np.concatenate([val.avg, val.max], 1))
    save_head(tmp_path / name, module, spec)
    loaded, loaded_spec = load_head(tmp_path / name)
    assert loaded_spec == spec
    np.testing.assert_array_equal(head_logits(loaded, spec, val), head_logits(module, spec, val))
    assert split_metrics(head_logits(loaded, spec, val), val.labels) == metrics["val"]
    assert metrics["val"]["accuracy"] >= 0.5  # 3 classes: chance is 1/3


def test_mlp_is_deterministic(tiny_cache):
    cfg = load_section("heads", tiny_cache["params"]).mlp
    a, _, ma = fit_head("mlp", tiny_cache["features"], cfg)
    b, _, mb = fit_head("mlp", tiny_cache["features"], cfg)
    assert ma == mb
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_select_prefers_accuracy_then_loss():
    metrics = {"logreg": {"val": {"accuracy": 0.9, "loss": 0.3}}, "mlp": {"val": {"accuracy": 0.9, "loss": 0.2}}}
    assert select_head(metrics)["head"] == "mlp"
    metrics["logreg"]["val"]["accuracy"] = 0.95
    choice = select_head(metrics)
    assert choice["head"] == "logreg" and "0.95" in choice["reason"]


def test_mlp_head_has_fastais_dropout_layout():
    """fastai's create_head: every dropout at half the rate except the last one, before the classifier."""
    rates = lambda m: [layer.p for layer in m if isinstance(layer, torch.nn.Dropout)]  # noqa: E731
    assert rates(MlpHead(8, 3, [16, 16], dropout=0.5)) == [0.25, 0.25, 0.5]
    assert rates(MlpHead(8, 3, [16], dropout=0.5)) == [0.25, 0.5]
    assert rates(MlpHead(8, 3, [], dropout=0.5)) == [0.5]


def _stage(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(cwd / "runs")})


def test_mlp_lr_far_too_high_stops_with_one_line(tiny_cache, tmp_path):
    """lr 1e6 used to report val loss 4e27 and exit 0; now the stage names the divergence and the params."""
    import yaml

    raw = yaml.safe_load(tiny_cache["params"].read_text())
    raw["heads"]["mlp"]["lr"] = 1.0e6
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = _stage(["pipeline.heads", "mlp", "--params", str(params), "--features", str(tiny_cache["features"]),
                   "--index", str(tiny_cache["index"]), "--out", str(tmp_path / "mlp"),
                   "--metrics", str(tmp_path / "m.json")], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if "error" in x]
    assert len(line) == 1 and "training diverged; lower heads.mlp.lr (now 1e+06)" in line[0], proc.stderr
    assert not (tmp_path / "mlp").exists() and not (tmp_path / "m.json").exists()


def test_mlp_on_nan_features_never_saves_initial_weights(tmp_path):
    """Features with NaN: no finite loss at all (best epoch -1 used to save the initial weights, exit 0)."""
    from pipeline.core.heads.divergence import TrainingDivergedError
    from pipeline.core.heads.mlp import fit_mlp
    from pipeline.infra.config import MlpConfig

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x[3, 2] = np.nan
    y = np.arange(40) % 2
    with pytest.raises(TrainingDivergedError, match=r"heads@mlp (train|val) loss is nan .*heads.mlp.lr"):
        fit_mlp(x[:30], y[:30], x[30:], y[30:], MlpConfig(hidden=[4], epochs=3), 2)
    x[3, 2] = 0.0
    x[35, 1] = np.inf  # only val damaged: the untrained head's val loss is already not finite
    with pytest.raises(TrainingDivergedError, match=r"val loss of the untrained head is nan"):
        fit_mlp(x[:30], y[:30], x[30:], y[30:], MlpConfig(hidden=[4], epochs=3), 2)


def test_features_with_nan_are_refused_naming_split_dataset_and_rows(tiny_cache, tmp_path):
    """64 damaged bytes in train/max used to give 'best epoch -1', the initial weights and exit 0."""
    import shutil

    import h5py

    features = tmp_path / "features.h5"
    shutil.copy(tiny_cache["features"], features)
    with h5py.File(features, "r+") as f:
        damaged = f["train/max"][...]
        damaged[[1, 4, 5], 0] = np.nan
        damaged[7, 3] = np.inf
        f["train/max"][...] = damaged
    with pytest.raises(Exception, match=r"split 'train', dataset 'max' has 4 of \d+ rows with NaN or inf values "
                                        r"\(first at row 1\)"):
        read_split(features, "train")
    proc = _stage(["pipeline.heads", "mlp", "--params", str(tiny_cache["params"]), "--features", str(features),
                   "--index", str(tiny_cache["index"]), "--out", str(tmp_path / "mlp"),
                   "--metrics", str(tmp_path / "m.json")], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "split 'train', dataset 'max' has 4 of" in proc.stderr and not (tmp_path / "mlp").exists()


def test_split_metrics_match_sklearn_at_more_than_five_classes():
    """top-5, balanced accuracy and per-class precision/recall against scikit-learn's own functions."""
    from sklearn.metrics import balanced_accuracy_score, precision_score, recall_score, top_k_accuracy_score

    rng = np.random.default_rng(0)
    labels = np.concatenate([np.zeros(40, int), rng.integers(1, 7, size=60)])  # class 0 over-represented
    logits = rng.normal(size=(100, 7)).astype(np.float32)
    logits[np.arange(100), labels] += 1.0
    m = split_metrics(logits, labels)
    pred = logits.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, pred))
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(labels, logits, k=5, labels=range(7)))
    np.testing.assert_allclose(m["per_class"]["precision"],
                               precision_score(labels, pred, average=None, labels=range(7), zero_division=0), atol=1e-6)
    np.testing.assert_allclose(m["per_class"]["recall"], recall_score(labels, pred, average=None, labels=range(7)),
                               atol=1e-6)
    assert m["per_class"]["support"] == np.bincount(labels, minlength=7).tolist()
    assert "top5_accuracy" not in split_metrics(logits[:, :5], np.minimum(labels, 4))  # 5 classes: always 1


def test_avg_head_never_reads_max(tiny_cache, tmp_path):
    """The logreg head on avg pooling reads only `avg`: NaN written over all of `max` cannot reach it, while the
    MLP (which needs [avg, max]) is stopped by them."""
    import shutil

    import h5py

    features = tmp_path / "features.h5"
    shutil.copy(tiny_cache["features"], features)
    with h5py.File(features, "r+") as f:
        for split in ("train", "val"):
            f[f"{split}/max"][...] = np.nan
    heads = load_section("heads", tiny_cache["params"])
    _, _, clean = fit_head("logreg", tiny_cache["features"], heads.logreg)
    _, _, metrics = fit_head("logreg", features, heads.logreg)
    assert metrics == clean
    with pytest.raises(Exception, match=r"split 'train', dataset 'max' has \d+ of \d+ rows with NaN"):
        fit_head("mlp", features, heads.mlp)


@pytest.mark.parametrize("name", [pytest.param("logreg", marks=pytest.mark.slow), "mlp"])
def test_streamed_head_matches_in_memory(tiny_cache, name):
    """`in_memory_gb: 0` leaves the features in the file (read block by block): logreg (torch solver) gives the
    same model as in memory, and the MLP learns (its shuffle differs, so only its quality is compared)."""
    import dataclasses

    cfg = getattr(load_section("heads", tiny_cache["params"]), name)
    if name == "logreg":
        cfg = dataclasses.replace(cfg, solver="torch")
    a, _, ma = fit_head(name, tiny_cache["features"], cfg)
    b, _, mb = fit_head(name, tiny_cache["features"], dataclasses.replace(cfg, in_memory_gb=0.0))
    if name == "logreg":
        assert ma == mb
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    assert mb["val"]["accuracy"] >= 0.5  # 3 classes: chance is 1/3


def test_mlp_balanced_loss_is_sklearns_weighted_log_loss():
    """class_weight: balanced weighs the MLP's loss by n / (K n_k): its val criterion equals scikit-learn's log_loss
    with compute_sample_weight('balanced') on the same probabilities."""
    from sklearn.metrics import log_loss
    from sklearn.utils.class_weight import compute_sample_weight

    from pipeline.core.heads.mlp import _evaluate, fit_mlp
    from pipeline.infra.config import MlpConfig

    rng = np.random.default_rng(0)
    y = np.concatenate([np.zeros(90, int), np.ones(20, int), np.full(10, 2)])  # imbalanced 9:2:1
    x = (rng.normal(size=(120, 6)) + y[:, None]).astype(np.float32)
    cfg = MlpConfig(hidden=[8], epochs=5, class_weight="balanced")
    model, info = fit_mlp(x, y, x, y, cfg, 3)
    weight = torch.from_numpy(np.bincount(y).sum() / (3 * np.bincount(y))).float()
    loss, _ = _evaluate(model, x, y, torch.device("cpu"), weight)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)).double(), 1).numpy()
    expected = log_loss(y, probs, sample_weight=compute_sample_weight("balanced", y))
    assert loss == pytest.approx(expected, rel=1e-5)
    assert info["history"][info["best_epoch"]]["val_loss"] == pytest.approx(loss, rel=1e-6)


def test_blas_linear_matches_torch_linear_values_and_gradients():
    """The MLP's CPU training route (its Linear products through numpy's OpenBLAS) computes what F.linear and
    autograd compute: outputs and the three gradients within float32 rounding of a 2560-term sum (reference: torch,
    the same inputs in float64)."""
    from pipeline.core.heads.mlp import _BlasLinear

    rng = np.random.default_rng(0)
    x0 = torch.from_numpy(rng.normal(size=(64, 2560)).astype(np.float32))
    w0 = torch.from_numpy(rng.normal(size=(512, 2560)).astype(np.float32) / 50)
    b0 = torch.from_numpy(rng.normal(size=512).astype(np.float32))
    up = torch.from_numpy(rng.normal(size=(64, 512)).astype(np.float32))  # an upstream gradient

    def run(fn, dtype):
        x, w, b = (t.to(dtype).clone().requires_grad_() for t in (x0, w0, b0))
        out = fn(x, w, b)
        (out * up.to(dtype)).sum().backward()
        return [t.detach().double() for t in (out, x.grad, w.grad, b.grad)]

    ours = run(_BlasLinear.apply, torch.float32)
    reference = run(torch.nn.functional.linear, torch.float64)
    for name, a, r in zip(("output", "grad x", "grad w", "grad b"), ours, reference):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-4 * float(r.abs().max()), msg=name)


def test_mlp_fit_restores_thread_counts(tiny_cache):
    """The MLP trains on one thread (torch and BLAS) and gives the pinned counts back to the rest of the stage."""
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads(), [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    fit_head("mlp", tiny_cache["features"], load_section("heads", tiny_cache["params"]).mlp)
    assert (torch.get_num_threads(), [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]) == before


def test_split_metrics_equal_sklearn_with_absent_and_never_predicted_classes():
    """The metrics are computed from the confusion matrix, not by scikit-learn: the same figures as its functions
    when a class is absent from the split (balanced accuracy averages the present ones) and one is never predicted
    (precision 0, zero_division=0)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(1)
    labels = rng.choice([0, 1, 2, 4, 5, 6], size=200)  # class 3 absent
    logits = rng.normal(size=(200, 7)).astype(np.float32)
    logits[np.arange(200), labels] += 1.5
    logits[:, 6] -= 10.0  # class 6 never predicted
    logits[0, 3] += 20.0  # one prediction of the absent class
    m = split_metrics(logits, labels)
    pred = logits.argmax(1)
    assert 3 in pred and 6 not in pred
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(labels, pred)
    precision, recall, _, support = precision_recall_fscore_support(labels, pred, labels=range(7), zero_division=0)
    assert m["balanced_accuracy"] == pytest.approx(balanced, rel=1e-12)
    assert m["per_class"]["precision"] == [round(float(v), 6) for v in precision]
    assert m["per_class"]["recall"] == [round(float(v), 6) for v in recall]
    assert m["per_class"]["support"] == support.tolist()


def test_fused_adamw_equals_torch_optim_adamw_fused_bitwise():
    """The MLP's CPU optimizer (torch._fused_adamw_ called directly, without torch.optim's dynamo import) gives the
    same bytes as torch.optim.AdamW(fused=True) over several steps, weight decay and all, a parameter without a
    gradient left alone by both."""
    from pipeline.core.heads.mlp import FusedAdamW

    torch.manual_seed(0)
    models = [MlpHead(12, 4, [8], 0.0) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    extra = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]  # never gets a gradient
    opts = [torch.optim.AdamW([*models[0].parameters(), extra[0]], lr=3e-3, weight_decay=0.05, fused=True),
            FusedAdamW([*models[1].parameters(), extra[1]], lr=3e-3, weight_decay=0.05)]
    x, y = torch.randn(16, 12), torch.randint(0, 4, (16,))
    for _ in range(5):
        for model, opt in zip(models, opts):
            model.train()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(extra[0], extra[1]) and torch.equal(extra[1], torch.ones(3))
    assert not torch.equal(models[1][-1].weight, MlpHead(12, 4, [8], 0.0)[-1].weight)  # it trained


def _tiny_avg_max(tiny_cache) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(tiny_cache["features"], "r") as f:
        x = {s: np.concatenate([f[s]["avg"][...], f[s]["max"][...]], 1) for s in ("train", "val")}
        return x["train"], f["train"]["labels"][...], x["val"], f["val"]["labels"][...]


def test_mlp_on_random_labels_overfits_and_says_so_not_diverged(tiny_cache):
    """Labels shuffled at random: the train loss goes down (the head memorises), val never beats the untrained head.
    That is overfitting, worded as such with what to change; it used to say 'training diverged; lower lr'."""
    from pipeline.core.heads.divergence import TrainingOverfitError
    from pipeline.core.heads.mlp import fit_mlp
    from pipeline.infra.config import MlpConfig

    xt, yt, xv, yv = _tiny_avg_max(tiny_cache)
    rng = np.random.default_rng(0)
    cfg = MlpConfig(hidden=[256], dropout=0.0, lr=3e-2, epochs=30, patience=5)
    with pytest.raises(TrainingOverfitError) as e:
        fit_mlp(xt, rng.permutation(yt), xv, rng.permutation(yv), cfg, 3)
    text = str(e.value)
    assert "never did better on val than its untrained weights" in text and "although its train loss went down" in text
    assert "it overfits the train set" in text and "heads.mlp.dropout (now 0)" in text
    assert "diverged" not in text and "\n" not in text
    untrained, lowest = (float(v) for v in re.search(r"\(untrained ([\d.e+-]+), epoch 0 [\d.e+-]+, lowest ([\d.e+-]+)\)",
                                                     text).groups())
    assert lowest < untrained / 2  # the numbers in the message say the train loss went down


def test_mlp_whose_train_loss_never_goes_down_diverged_and_says_so(tiny_cache):
    """A step size so large that the train loss never gets below the untrained head's (finite all along): that is
    divergence, and the message says the train loss did not go down and names lr."""
    from pipeline.core.heads.divergence import TrainingDivergedError
    from pipeline.core.heads.mlp import fit_mlp
    from pipeline.infra.config import MlpConfig

    xt, yt, xv, yv = _tiny_avg_max(tiny_cache)
    cfg = MlpConfig(hidden=[256], dropout=0.0, lr=300.0, epochs=30, patience=5)
    with pytest.raises(TrainingDivergedError, match=r"and its train loss never went below the untrained head's .*"
                                                    r"training diverged; lower heads.mlp.lr \(now 300\)"):
        fit_mlp(xt, yt, xv, yv, cfg, 3)
