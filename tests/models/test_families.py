"""Backbone families, with random-init weights files (no network): CNNs, ViTs with class and register tokens, Swin,
EVA, a CLIP image tower, and torchvision's ResNet, DenseNet and ViT.

For each: the cached `pre_logits` equals the library's own pre-logits features, `avg` and `max` equal a pooling of
its last map computed here by hand (prefix tokens left out, NHWC transposed), a head fits on the `auto` pooling, the
warm-started network reproduces the head's logits (parity), and a 2-process gloo DDP fine-tune step keeps both ranks
identical (DINOv2's mask token, and the head layers a pooling skips, are parameters the forward never reaches).
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torchvision
from conftest import REPO, dvc_env, write_digit_folder, write_params
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from pipeline import extract, prepare
from pipeline.core.data.images import ImageDataset, eval_transform, load_rgb
from pipeline.core.data.index import read_index
from pipeline.core.data.preprocess import Preprocess
from pipeline.core.features.cache import read_split
from pipeline.core.finetune.network import predict_logits, warm_started
from pipeline.core.finetune.training import check_parity
from pipeline.core.heads.fitting import fit_head, head_logits, save_head
from pipeline.infra.config import load_section

pytestmark = pytest.mark.slow

# (backbone.name, backbone.image_size (None: the weights' own), layout, auto pooling of logreg)
FAMILIES = [
    ("resnet18", 64, "NCHW", "avg"),
    ("efficientnet_b0", 64, "NCHW", "avg"),
    ("convnext_atto", 64, "NCHW", "avg"),
    ("vit_tiny_patch16_224", None, "NLC", "pre_logits"),  # class token
    ("vit_small_patch14_reg4_dinov2", 112, "NLC", "pre_logits"),  # class + 4 register tokens; 518 px weights resized
    ("swin_tiny_patch4_window7_224", None, "NHWC", "avg"),
    ("eva02_tiny_patch14_224", None, "NLC", "pre_logits"),
    ("vit_base_patch32_clip_224", None, "NLC", "pre_logits"),  # CLIP image tower (pre-norm)
    ("resnet18.IMAGENET1K_V1", 64, "NCHW", "avg"),  # torchvision, named with its weights
    ("densenet121.IMAGENET1K_V1", 64, "NCHW", "avg"),
    ("vit_b_16.IMAGENET1K_V1", None, "NLC", "pre_logits"),
]
# The val accuracy every family's logreg head must reach on the `auto` pooling. Val is 4 images (digits 0 and 1, two
# each; train 8). Measured with `_random_model`'s weights (torch.manual_seed(0), so stable): 4 of 4 (1.0) for every
# family, the least sure image at p = 0.75 (vit_tiny_patch16_224), 0.92-0.995 for the others. 0.75 lets one image flip
# and stays above chance (0.5): features that carry no label information fail it in every family (all zero: 0.5; train
# rows shuffled against their labels: 0-0.5), where `0 <= accuracy <= 1` passed anything. The test checks exact pooling
# against the library's own features; this bound, that the cached features are usable.
MIN_VAL_ACCURACY = {name: 0.75 for name, *_ in FAMILIES}


@pytest.fixture(scope="module")
def family_index(tmp_path_factory) -> dict[str, Path]:
    """16 real digit images (2 classes), indexed by prepare: 8 train, 4 val, 4 test."""
    root = tmp_path_factory.mktemp("families")
    digits = write_digit_folder(root / "digits", classes=2, per_class=8, size=32)
    params = write_params(root / "params.yaml", data={"source": str(digits), "val_fraction": 0.25,
                                                      "test_fraction": 0.25})
    prepare.main(["--params", str(params), "--out", str(root / "prepared")])
    return {"root": root, "source": digits, "index": root / "prepared"}


def _random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if "." in name and name.split(".")[1].isupper():  # torchvision, named with its weights
        return torchvision.models.get_model(name.split(".")[0], weights=None).eval()
    return timm.create_model(name, pretrained=False).eval()


def _reference(name: str, weights: Path, size: int | None, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The library's own pre-logits features and a by-hand avg / max of its last map, from a model built here."""
    sd = load_file(str(weights))
    if "." in name and name.split(".")[1].isupper():
        model = torchvision.models.get_model(name.split(".")[0], weights=None).eval()
        model.load_state_dict(sd)
        seen: dict[str, torch.Tensor] = {}
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.register_forward_hook(lambda m, inp, out: seen.__setitem__("pre_logits", inp[0]))
        if isinstance(model, torchvision.models.VisionTransformer):
            model.encoder.register_forward_hook(lambda m, inp, out: seen.__setitem__("map", out[:, 1:]))
        elif isinstance(model, torchvision.models.DenseNet):
            model.features.register_forward_hook(lambda m, inp, out: seen.__setitem__("map", torch.relu(out)))
        else:
            model.layer4.register_forward_hook(lambda m, inp, out: seen.__setitem__("map", out))
        with torch.no_grad():
            model(x)
        fmap = seen["map"]
        dims = (1,) if fmap.ndim == 3 else (2, 3)
        return {"pre_logits": seen["pre_logits"], "avg": fmap.mean(dims), "max": fmap.amax(dims)}
    kwargs = {"img_size": size} if size and timm.create_model(name, pretrained=False).pretrained_cfg.get(
        "fixed_input_size") else {}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    sd = filter_fn(sd, model) if filter_fn and kwargs else sd
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in sd.items() if k in own})  # the classifier is not part of the body
    with torch.no_grad():
        fmap = model.forward_features(x)
        pre = model.forward_head(fmap, pre_logits=True)
    if fmap.ndim == 3:  # tokens: the class and register tokens are not patches
        patches = fmap[:, model.num_prefix_tokens:]
        return {"pre_logits": pre, "avg": patches.mean(1), "max": patches.amax(1)}
    dims = (1, 2) if "swin" in name else (2, 3)  # Swin's map is channels last (NHWC)
    return {"pre_logits": pre, "avg": fmap.mean(dims), "max": fmap.amax(dims)}


@pytest.mark.parametrize("name,size,layout,pooling", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_features_head_parity_and_ddp_step(family_index, tmp_path: Path, name, size, layout, pooling):
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in _random_model(name).state_dict().items()}, str(weights))
    params = write_params(tmp_path / "params.yaml", data={"source": str(family_index["source"])},
                          backbone={"name": name, "weights": str(weights), "image_size": size},
                          extract={"workers": 0, "batch_size": 8, "store": None},
                          heads={"logreg.C": [1.0]},
                          finetune={"epochs": 1, "batch_size": 4, "workers": 0, "bn": "eval"})
    features = tmp_path / "features.h5"
    extract.main(["--params", str(params), "--index", str(family_index["index"]), "--out", str(features)])

    # the cache against the library's own features, for every row in index order
    rows, meta = read_index(family_index["index"])
    with h5py.File(features, "r") as f:
        assert f.attrs["feature_layout"] == layout
        cached = {k: np.concatenate([f[s][k][...] for s in ("train", "val", "test")]) for k in ("avg", "max",
                                                                                               "pre_logits")}
        pre = Preprocess.from_dict(json.loads(f.attrs["preprocess"]))
    transform = eval_transform(pre)
    x = torch.stack([transform(load_rgb(Path(meta["source"]) / r["path"])) for r in rows])
    want = _reference(name, weights, size, x)
    for k in ("pre_logits", "avg", "max"):
        np.testing.assert_allclose(cached[k], want[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{name}: {k}")

    # a head on the auto pooling, and the warm-started network reproduces its val logits
    heads = load_section("heads", params)
    module, spec, metrics = fit_head("logreg", features, heads.logreg)
    assert spec.pooling == pooling and spec.in_features == want[pooling].shape[1]
    assert metrics["val"]["accuracy"] >= MIN_VAL_ACCURACY[name], f"{name}: val accuracy {metrics['val']}"
    head_dir = tmp_path / "logreg"
    save_head(head_dir, module, spec)
    reference = head_logits(module, spec, read_split(features, "val"))
    backbone = dataclasses.replace(load_section("backbone", params), image_size=pre.size)
    net, pre_net = warm_started(backbone, module, spec)
    val = [r for r in rows if r["split"] == "val"]
    loader = DataLoader(ImageDataset(meta["source"], val, eval_transform(pre_net)), batch_size=8)
    parity = check_parity(predict_logits(net.to(memory_format=torch.channels_last), loader, torch.device("cpu")),
                          reference, atol=1e-3, max_flips=0.0)
    assert parity["argmax_flip_fraction"] == 0.0

    # two processes, gloo: one DDP fine-tune step, both ranks end with the same parameters
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_worker.py"), str(params), str(family_index["index"]), str(head_dir),
           str(tmp_path)]
    proc = subprocess.run(cmd, env={**dvc_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    r0.pop("_seen_ids"), r1.pop("_seen_ids")
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"{name}: ranks differ at {key}"
    assert not torch.equal(r0["head.weight"], module.state_dict()["weight"])  # it did train
