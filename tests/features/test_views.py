"""Cached augmented views (`extract.views`, pipeline/core/features/views.py): each view is the fine-tune's own
augmentation under a seed drawn from the image's content, run through the same backbone as the plain view; the store
keeps them, so more views or a grown folder compute only what is new."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, write_digit_folder, write_params

from pipeline import extract, prepare
from pipeline.core.data.images import load_rgb, train_transform
from pipeline.core.data.index import read_index
from pipeline.core.features.extraction import extract_features, forward_pooled
from pipeline.core.features.views import ViewAugment, view_digest, view_rows, view_seed, view_settings
from pipeline.core.models.backbone import build_backbone
from pipeline.core.models.preprocessing import resolve_preprocess
from pipeline.infra.config import ConfigError, ExtractConfig, load_section


@pytest.fixture(scope="module")
def views_setup(tmp_path_factory) -> dict:
    """A tiny index (3 digit classes x 12 at 32 px) and its plain features, with a feature store of its own."""
    root = tmp_path_factory.mktemp("views")
    digits = write_digit_folder(root / "digits", classes=3, per_class=12, size=24)
    params = write_params(root / "params.yaml", **{**TINY, "data": {**TINY["data"], "source": str(digits)},
                                                  "extract": {**TINY["extract"], "store": str(root / "store")}})
    prepare.main(["--params", str(params), "--out", str(root / "prepared")])
    extract.main(["--params", str(params), "--index", str(root / "prepared"), "--out", str(root / "features.h5")])
    return {"root": root, "params": params, "index": root / "prepared"}


def _params(setup: dict, path: Path, **extract_keys) -> Path:
    raw = yaml.safe_load(setup["params"].read_text())
    raw["extract"].update(extract_keys)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("augment,hflip", [("shift", False), ("resized_crop", True)])
def test_a_view_is_the_finetune_augmentation_under_its_seed(views_setup, augment, hflip):
    """The uint8 pixels of a view, normalised as the extraction does, are bit for bit what the fine-tune's
    train_transform gives under the same seed."""
    backbone = load_section("backbone", views_setup["params"])
    pre = resolve_preprocess(backbone)
    cfg = ExtractConfig(views=1, views_augment=augment, views_hflip=hflip, views_crop_scale=0.5)
    rows, meta = read_index(views_setup["index"])
    image = load_rgb(Path(meta["source"]) / rows[0]["path"])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (pre.mean, pre.std))
    for seed in (0, 12345, 2**59):
        pixels = ViewAugment.from_config(pre, cfg)(image, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected = train_transform(pre, augment, 0.5, hflip)(image)
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, pre.size, pre.size)
        assert torch.equal(pixels.float().div_(255).sub_(mean).div_(std), expected)


def test_view_digest_depends_on_content_view_and_settings_not_on_the_count():
    settings = view_settings(ExtractConfig(views=4, views_seed=0))
    digest = view_digest("a" * 64, 1, settings)
    assert digest == view_digest("a" * 64, 1, view_settings(ExtractConfig(views=8, views_seed=0)))
    assert digest == view_digest("a" * 64, 1, view_settings(ExtractConfig(views=4, views_crop_scale=0.2)))  # shift
    others = [view_digest("b" * 64, 1, settings), view_digest("a" * 64, 2, settings),
              view_digest("a" * 64, 1, view_settings(ExtractConfig(views=4, views_seed=1))),
              view_digest("a" * 64, 1, view_settings(ExtractConfig(views=4, views_hflip=True))),
              view_digest("a" * 64, 1, view_settings(ExtractConfig(views=4, views_augment="resized_crop")))]
    assert len({digest, *others}) == 6
    rows = view_rows([{"id": 0, "path": "x", "label": 0, "split": "train", "sha256": "a" * 64},
                      {"id": 1, "path": "y", "label": 1, "split": "val", "sha256": "b" * 64},
                      {"id": 2, "path": "z", "label": 0, "split": "train", "sha256": "a" * 64}],  # a duplicate
                     ExtractConfig(views=2))
    assert [(r["id"], r["view"]) for r in rows] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert rows[0]["sha256"] == rows[2]["sha256"] and rows[0]["view_seed"] == view_seed(rows[0]["sha256"])


def test_views_file_rows_are_the_backbone_on_each_augmented_view(views_setup, tmp_path):
    """Every row of the views file is the backbone's features of its image under its own seeded augmentation;
    rows are image by image, with the image's row id, label and view number."""
    params = _params(views_setup, tmp_path / "params.yaml", views=2, views_seed=7, store=None)
    out = tmp_path / "views.h5"
    extract.main(["--params", str(params), "--index", str(views_setup["index"]), "--out", str(out), "--views"])
    rows, meta = read_index(views_setup["index"])
    train = [r for r in rows if r["split"] == "train"]
    with h5py.File(out) as f:
        g = f["train"]
        assert list(g["ids"][...]) == [int(r["id"]) for r in train for _ in range(2)]
        assert list(g["view"][...]) == [0, 1] * len(train)
        assert list(g["labels"][...]) == [int(r["label"]) for r in train for _ in range(2)]
        assert f.attrs["views"] == 2 and f.attrs["views_seed"] == 7 and f.attrs["decode"] == "pil"
        assert "val" not in f and "test" not in f
        avg = g["avg"][...]
    backbone, cfg = load_section("backbone", params), load_section("extract", params)
    net, pre, _ = build_backbone(backbone)
    net = net.eval().to(memory_format=torch.channels_last)
    augment = ViewAugment.from_config(pre, cfg)
    picks = [0, 1, len(avg) - 1]
    seeds = [r["view_seed"] for r in view_rows(rows, cfg)]
    pixels = torch.stack([augment(load_rgb(Path(meta["source"]) / train[i // 2]["path"]), seeds[i]) for i in picks])
    x = pixels.float().div_(255).sub_(torch.tensor(pre.mean).view(1, 3, 1, 1)).div_(torch.tensor(pre.std).view(1, 3, 1, 1))
    with torch.inference_mode():
        expected = forward_pooled(net, x.contiguous(memory_format=torch.channels_last), False)["avg"].numpy()
    np.testing.assert_allclose(avg[picks], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(avg[0], avg[1], atol=1e-3)  # two views of one image differ


def test_more_views_reuse_the_stored_ones_and_keep_their_bytes(views_setup, tmp_path):
    """K = 3 after K = 2 computes only the third view of each image; its first two views are K = 2's bytes. Another
    seed computes everything again."""
    backbone = load_section("backbone", views_setup["params"])
    store = tmp_path / "store"
    shutil.copytree(views_setup["root"] / "store", store)  # the plain rows' store: views share it
    index = views_setup["index"]
    two = extract_features(index, tmp_path / "two.h5", backbone, ExtractConfig(views=2, store=str(store), workers=0),
                           views=True)
    three = extract_features(index, tmp_path / "three.h5", backbone,
                             ExtractConfig(views=3, store=str(store), workers=0), views=True)
    n = two["rows"] // 2
    assert (two["rows_extracted"], two["rows_reused"]) == (2 * n, 0)
    assert (three["rows_extracted"], three["rows_reused"]) == (n, 2 * n)
    with h5py.File(tmp_path / "two.h5") as a, h5py.File(tmp_path / "three.h5") as b:
        first_two = b["train"]["view"][...] < 2
        for name in ("avg", "max", "pre_logits"):
            assert np.array_equal(b["train"][name][...][first_two], a["train"][name][...])
    again = extract_features(index, tmp_path / "seed1.h5", backbone,
                             ExtractConfig(views=2, views_seed=1, store=str(store), workers=0), views=True)
    assert (again["rows_extracted"], again["rows_reused"]) == (2 * n, 0)
    # a rerun with the same settings reads every view from the store and writes the same bytes
    rerun = extract_features(index, tmp_path / "two_again.h5", backbone,
                             ExtractConfig(views=2, store=str(store), workers=0), views=True)
    assert rerun["rows_extracted"] == 0
    assert (tmp_path / "two_again.h5").read_bytes() == (tmp_path / "two.h5").read_bytes()


def test_no_views_writes_attributes_only_without_building_the_backbone(views_setup, tmp_path, caplog):
    out = tmp_path / "views.h5"
    extract.main(["--params", str(views_setup["params"]), "--index", str(views_setup["index"]), "--out", str(out),
                  "--views"])
    with h5py.File(out) as f:
        assert dict(f.attrs) == {"views": 0} and list(f) == []
    assert "records no views" in caplog.text and "image size" not in caplog.text
    first = out.read_bytes()
    extract.main(["--params", str(views_setup["params"]), "--index", str(views_setup["index"]), "--out", str(out),
                  "--views"])
    assert out.read_bytes() == first


@pytest.mark.parametrize("key,value", [("views", -1), ("views_seed", -2), ("views_crop_scale", 0.0),
                                       ("views_augment", "flip")])
def test_views_keys_are_checked(tmp_path, key, value):
    params = write_params(tmp_path / "params.yaml", extract={key: value})
    with pytest.raises(ConfigError, match=f"extract.{key}"):
        load_section("extract", params)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_one_process_views_file(views_setup, tmp_path):
    """Views are rows like any other: two CPU ranks (gloo) share their checkpoints and rank 0 writes the same bytes
    as one process."""
    import hashlib
    import os
    import subprocess
    import sys

    params = _params(views_setup, tmp_path / "params.yaml", views=2, views_seed=5, store=None, checkpoint_rows=8)
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract.main(["--params", str(params), "--index", str(views_setup["index"]), "--out", str(one), "--views"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.extract",
           "--params", str(params), "--index", str(views_setup["index"]), "--out", str(two), "--views"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PIPELINE_RUN_DIR": str(tmp_path / "runs")}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2" in proc.stderr  # rank 0 reports a world of two
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (one, two)]
    assert digest[0] == digest[1]
