"""Heads on cached augmented views (`heads.*.views`, pipeline/core/heads/views.py): a head with n views is the head
fitted on its plain train rows followed by the first n views of each image; val, test and its train metrics stay on
the plain view; views from other settings or too few of them are refused before any fit."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_params

from pipeline import extract
from pipeline.core.features.cache import StaleFeaturesError, read_labels
from pipeline.core.heads.fitting import fit_head
from pipeline.core.heads.views import ViewsError
from pipeline.infra.config import load_section


@pytest.fixture(scope="module")
def views_file(tiny_cache, tmp_path_factory) -> Path:
    """Three views of every train image of the tiny cache, with the fine-tune's resized_crop + flip."""
    import yaml

    root = tmp_path_factory.mktemp("head_views")
    raw = yaml.safe_load(tiny_cache["params"].read_text())
    raw["extract"].update(views=3, views_seed=3, views_augment="resized_crop", views_hflip=True)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = root / "views.h5"
    extract.main(["--params", str(params), "--index", str(tiny_cache["index"]), "--out", str(out), "--views"])
    return out


def _concatenated(features: Path, views: Path, n: int, out: Path) -> Path:
    """A copy of the features file whose train split holds the plain rows, then the first n views of each image."""
    shutil.copy2(features, out)
    with h5py.File(views) as v, h5py.File(out, "r+") as f:
        keep = v["train"]["view"][...] < n
        for name in ("avg", "max", "pre_logits", "labels", "ids"):
            joined = np.concatenate([f["train"][name][...], v["train"][name][...][keep]])
            del f["train"][name]
            f["train"].create_dataset(name, data=joined)
    return out


@pytest.mark.parametrize("head", ["logreg", "mlp", "knn"])
def test_a_head_with_views_is_the_head_fitted_on_plain_then_view_rows(tiny_cache, views_file, tmp_path, head):
    heads = load_section("heads", tiny_cache["params"])
    cfg = dataclasses.replace(getattr(heads, head), views=2)
    module, spec, metrics = fit_head(head, tiny_cache["features"], cfg, views_file)
    joined = _concatenated(tiny_cache["features"], views_file, 2, tmp_path / "joined.h5")
    reference, _, ref_metrics = fit_head(head, joined, dataclasses.replace(cfg, views=0))
    state, ref_state = module.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    for key in state:
        assert torch.equal(state[key], ref_state[key]), key
    assert metrics["val"] == ref_metrics["val"]
    n_train = len(read_labels(tiny_cache["features"], "train"))
    assert metrics["views"] == spec.fit["views"]
    assert metrics["views"]["rows"] == 2 * n_train and metrics["views"]["per_image"] == 2
    assert metrics["views"]["views_augment"] == "resized_crop" and metrics["views"]["views_hflip"] is True
    assert sum(metrics["train"]["per_class"]["support"]) == n_train  # train metrics: the plain train rows only
    if head == "knn":  # the views join the neighbours
        assert len(module.train_labels) == 3 * n_train


def test_views_zero_ignores_the_views_file(tiny_cache, views_file):
    cfg = load_section("heads", tiny_cache["params"]).logreg
    _, spec, metrics = fit_head("logreg", tiny_cache["features"], cfg, views_file)
    _, spec_plain, metrics_plain = fit_head("logreg", tiny_cache["features"], cfg)
    assert metrics == metrics_plain and "views" not in spec.fit and spec.fit == spec_plain.fit


def test_more_views_than_extracted_are_refused_naming_both_keys(tiny_cache, views_file):
    cfg = dataclasses.replace(load_section("heads", tiny_cache["params"]).mlp, views=4)
    with pytest.raises(ViewsError, match=r"heads\.mlp\.views: 4.*holds 3 augmented views.*extract\.views to 4"):
        fit_head("mlp", tiny_cache["features"], cfg, views_file)


def test_views_of_other_features_are_refused(tiny_cache, views_file, tmp_path):
    stale = tmp_path / "stale.h5"
    shutil.copy2(views_file, stale)
    with h5py.File(stale, "r+") as f:
        f.attrs["index_sha256"] = "0" * 64
    cfg = dataclasses.replace(load_section("heads", tiny_cache["params"]).logreg, views=1)
    with pytest.raises(StaleFeaturesError, match="index_sha256"):
        fit_head("logreg", tiny_cache["features"], cfg, stale)


def test_views_without_a_views_file_fit_the_plain_view_with_a_warning(tiny_cache, caplog):
    cfg = dataclasses.replace(load_section("heads", tiny_cache["params"]).knn, views=2)
    _, _, metrics = fit_head("knn", tiny_cache["features"], cfg)
    assert "views" not in metrics and "heads.knn.views: 2, but no views file" in caplog.text


def test_heads_views_key_is_checked(tmp_path):
    from pipeline.infra.config import ConfigError

    params = write_params(tmp_path / "params.yaml", heads={"mlp.views": -1})
    with pytest.raises(ConfigError, match=r"heads\.mlp\.views"):
        load_section("heads", params)


def test_search_over_views_scores_each_point_as_the_head_with_those_views(tiny_cache, views_file, tmp_path):
    """`python -m pipeline.search logreg --grid 'views=[0,2]'`: each row is fit_head's val accuracy at that n."""
    import json

    from pipeline import search

    out = tmp_path / "out"
    search.main(["logreg", "--grid", "views=[0,2]", "--params", str(tiny_cache["params"]), "--features",
                 str(tiny_cache["features"]), "--views", str(views_file), "--index", str(tiny_cache["index"]),
                 "--out", str(out)])
    rows = json.loads((out / "search.json").read_text())["rows"]
    base = load_section("heads", tiny_cache["params"]).logreg
    for row in rows:
        _, _, metrics = fit_head("logreg", tiny_cache["features"], dataclasses.replace(base, views=row["views"]),
                                 views_file)
        assert row["val_accuracy"] == metrics["val"]["accuracy"] and row["val_loss"] == metrics["val"]["loss"]
    assert [r["views"] for r in rows] == [0, 2]
