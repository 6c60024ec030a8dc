"""Heads fitted on cached features: metrics, the MLP on concat pooling, and the safetensors round trip."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from pipeline.core.features import read_split
from pipeline.core.heads import fit_head, head_logits, load_head, save_head
from pipeline.core.heads.mlp import MlpHead
from pipeline.core.metrics import split_metrics
from pipeline.core.selection import select_head
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
        assert spec["pooling"] == "catavgmax" and spec["in_features"] == 2 * val.avg.shape[1]
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
    """A stage run as its own process (exit code and stderr as a user sees them)."""
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
    from pipeline.core.divergence import TrainingDivergedError
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
