"""Backbones: pooling layout, the bundled ImageNet weights, and clear errors for weights that do not fit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision

from pipeline.core.data.images import eval_transform, load_rgb
from pipeline.core.models.architectures import WeightsError
from pipeline.core.models.backbone import build_backbone, imagenet_classifier
from pipeline.core.models.pooling import pool_avg_max
from pipeline.core.models.preprocessing import (
    ImageSizeError,
    auto_image_size,
    auto_sizes,
    resolve_image_size,
    resolve_preprocess,
)
from pipeline.infra.config import BackboneConfig

IMAGENET_ANT, IMAGENET_BEE = 310, 309


def test_pool_avg_max_is_cat_mean_amax_of_the_map():
    torch.manual_seed(0)
    fmap = torch.randn(4, 16, 5, 7)
    avg, mx = pool_avg_max(fmap)
    expected = torch.cat([fmap.mean(dim=(2, 3)), fmap.flatten(2).max(dim=2).values], dim=1)
    torch.testing.assert_close(torch.cat([avg, mx], 1), expected, rtol=0, atol=1e-6)
    # the same order as timm's own concat pooling, so features and warm-started heads agree with timm
    timm_cat = timm.layers.adaptive_avgmax_pool.adaptive_catavgmax_pool2d(fmap, 1).flatten(1)
    torch.testing.assert_close(torch.cat([avg, mx], 1), timm_cat, rtol=0, atol=1e-6)


def test_pool_avg_max_tokens():
    tokens = torch.arange(24.0).reshape(2, 3, 4)  # (N, L, C)
    avg, mx = pool_avg_max(tokens, "NLC")
    torch.testing.assert_close(avg, tokens.mean(1))
    torch.testing.assert_close(mx, tokens[:, -1, :])
    avg, mx = pool_avg_max(tokens, "NLC", prefix_tokens=1)  # the class token is left out
    torch.testing.assert_close(avg, tokens[:, 1:].mean(1))
    nhwc = torch.randn(2, 3, 5, 4)  # (N, H, W, C), Swin's layout
    avg, mx = pool_avg_max(nhwc, "NHWC")
    torch.testing.assert_close(avg, nhwc.permute(0, 3, 1, 2).mean((2, 3)))
    torch.testing.assert_close(mx, nhwc.amax((1, 2)))
    with pytest.raises(ValueError, match="layout NCHW"):
        pool_avg_max(tokens)


def test_bundled_backbone_shapes_and_preprocessing():
    net, pre, sha = build_backbone(BackboneConfig(image_size=None))
    assert net.num_features == 1280
    assert (pre.size, pre.resize, pre.mean, pre.std) == (224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        fmap = net(torch.zeros(1, 3, 224, 224))
    assert tuple(fmap.shape) == (1, 1280, 7, 7)
    _, _, sha_again = build_backbone(BackboneConfig(image_size=96))
    assert sha == sha_again and len(sha) == 64  # image size changes preprocessing, never the weights


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_bundled_weights_classify_ants_and_bees(hymenoptera: Path, arch: str):
    """Each bundled checkpoint is real ImageNet weights, mapped right: zero-shot, the first 20 val ants are mostly
    ImageNet 'ant' (310) and the first 20 bees 'bee' (309). Measured: Lite0 17 + 17 of 40, Lite1 18 + 18, Lite2
    17 + 17 (a mapping off by one tensor gives chance or worse)."""
    cfg = BackboneConfig(name=arch, image_size=None)
    model = imagenet_classifier(cfg)
    _, pre, _ = build_backbone(cfg, load_weights=False)
    transform = eval_transform(pre)
    rates = {}
    for cls, target in (("ants", IMAGENET_ANT), ("bees", IMAGENET_BEE)):
        files = sorted((hymenoptera / "val" / cls).iterdir())[:20]
        batch = torch.stack([transform(load_rgb(f)) for f in files])
        with torch.no_grad():
            top1 = model(batch).argmax(1)
        rates[cls] = float((top1 == target).float().mean())
    assert rates["ants"] >= 0.8 and rates["bees"] >= 0.8, rates


def test_weights_file_for_another_architecture_names_both(tmp_path: Path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet18\.pth.*does not fit backbone 'tf_efficientnet_lite0'"):
        build_backbone(BackboneConfig(weights=str(path)))


def test_torchvision_backbone_from_a_weights_file(tmp_path: Path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    net, pre, _ = build_backbone(BackboneConfig(name="resnet18", weights=str(path), image_size=64))
    assert net.num_features == 512 and pre.mean == pytest.approx((0.485, 0.456, 0.406))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        avg, _ = pool_avg_max(net(x))
        reference.fc = torch.nn.Identity()
        torch.testing.assert_close(avg, reference(x), rtol=1e-5, atol=1e-5)  # the body is resnet18 minus its fc


def test_bundled_weights_refuse_other_backbones():
    with pytest.raises(WeightsError, match="resnet34"):
        build_backbone(BackboneConfig(name="resnet34", weights="bundled"))
    with pytest.raises(WeightsError, match="neither a timm model name"):
        build_backbone(BackboneConfig(name="no_such_net", weights="hub"))


# --- backbone.image_size: auto -------------------------------------------------------------------------------------

DIGIT_SIZES = {"split": "train", "images": 1079, "short_side": {"min": 8, "median": 8.0, "max": 8},
               "long_side": {"min": 8, "median": 8.0, "max": 8}}
PHOTO_SIZES = {"split": "train", "images": 245, "short_side": {"min": 130, "median": 369.0, "max": 1488},
               "long_side": {"min": 193, "median": 500.0, "max": 1984}}


@pytest.mark.parametrize("native,median,size", [
    (224, 8, 96),      # the digits: 2 x 8 = 16 -> 32 -> at least 96
    (224, 369, 224),   # hymenoptera photos: the weights' own
    (224, 112, 224),   # exactly half: the weights' own
    (224, 111, 224),   # 222 -> 224
    (224, 60, 128),    # 120 -> 128
    (224, 40, 96),     # 80 -> 96
    (299, 140, 288),   # never above the weights' own, multiples of 32 below it
    (299, 149, 299),   # 298 -> 320, capped at the weights' own
])
def test_auto_image_size_rule(native, median, size):
    assert auto_image_size(native, median) == size
    assert size in auto_sizes(native)


def test_auto_resolves_to_96_for_digits_and_224_for_photos():
    digits, why = resolve_image_size(BackboneConfig(), DIGIT_SIZES)
    assert digits.image_size == 96
    assert why == ("backbone.image_size: auto; the 1079 train images' median short side (8 px) is under half the "
                   "weights' 224 px, so 2 x 8 px rounded up to a multiple of 32, at least 96")
    photos, why = resolve_image_size(BackboneConfig(), PHOTO_SIZES)
    assert photos.image_size == 224 and "the weights' own" in why and "(369 px) is at least half" in why
    # same preprocessing as the explicit size: the default pipeline's features are unchanged by `auto`
    assert resolve_preprocess(digits) == resolve_preprocess(BackboneConfig(image_size=96))


def test_an_explicit_size_wins_and_null_is_the_weights_own():
    cfg, why = resolve_image_size(BackboneConfig(image_size=160), DIGIT_SIZES)
    assert cfg.image_size == 160 and why == "backbone.image_size: 160"
    cfg, why = resolve_image_size(BackboneConfig(image_size=None), DIGIT_SIZES)
    assert cfg.image_size == 224 and why == "backbone.image_size: null, the weights' own"
    assert resolve_preprocess(cfg) == resolve_preprocess(BackboneConfig(image_size=None))


def test_auto_needs_the_image_sizes_and_is_never_built_unresolved():
    with pytest.raises(ImageSizeError, match="backbone.image_size is auto, but the dataset index has no image sizes"
                                             ".*rerun prepare"):
        resolve_image_size(BackboneConfig(), None)
    with pytest.raises(ValueError, match="must be resolved"):
        resolve_preprocess(BackboneConfig(image_size="auto"))


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_crop_mode_matches_timms_own_eval_transform(crop_mode, tmp_path: Path):
    """timm's `crop_mode` (pretrained_cfg) is honoured: the pipeline's eval transform equals timm's create_transform
    on a non-square image, for each mode."""
    from PIL import Image

    from pipeline.core.data.preprocess import Preprocess

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(path)
    pre = Preprocess(size=64, resize=int(64 / 0.875), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     interpolation="bicubic", crop_mode=crop_mode)
    ours = eval_transform(pre)(load_rgb(path))
    theirs = timm.data.create_transform(input_size=(3, 64, 64), interpolation="bicubic", mean=pre.mean, std=pre.std,
                                        crop_pct=0.875, crop_mode=crop_mode)(Image.open(path).convert("RGB"))
    assert ours.shape == theirs.shape == (3, 64, 64)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_local_dir_name_loads_the_folders_weights_and_preprocessing(tmp_path: Path):
    """`local-dir:<folder>` (timm's config.json + weights, as `save_for_hf` writes them): the folder's weights and its
    pretrained_cfg (mean, crop_mode) are what the pipeline uses."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_mode": "squash", "mean": (0.5, 0.4, 0.3)}
    save_for_hf(model, str(tmp_path / "folder"), safe_serialization=True)
    net, pre, _ = build_backbone(BackboneConfig(name=f"local-dir:{tmp_path / 'folder'}", weights="hub",
                                                image_size=None))
    assert pre.crop_mode == "squash" and pre.mean == pytest.approx((0.5, 0.4, 0.3))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = net.feature_sets(net(x), ("pre_logits",))["pre_logits"]
        want = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torchvision_names_with_weights_pick_their_transforms():
    """`resnet50.IMAGENET1K_V2` is torchvision's ResNet-50 with the V2 weights' own eval transforms (resize 232), not
    timm's resnet50; an unknown weights name lists the known ones."""
    v2 = resolve_preprocess(BackboneConfig(name="resnet50.IMAGENET1K_V2", image_size=None))
    v1 = resolve_preprocess(BackboneConfig(name="resnet50.IMAGENET1K_V1", image_size=None))
    assert (v2.size, v2.resize, v2.interpolation) == (224, 232, "bilinear")
    assert (v1.size, v1.resize) == (224, 256)
    with pytest.raises(WeightsError, match="has no weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        resolve_preprocess(BackboneConfig(name="resnet50.IMAGENET1K_V9", image_size=None))


def test_fixed_size_models_keep_their_size_under_auto_and_resize_position_embeddings():
    """A ViT's position embeddings fix its input size: `auto` keeps the weights' own, a number resizes them."""
    cfg, why = resolve_image_size(BackboneConfig(name="vit_tiny_patch16_224", weights="hub"),
                                  {"short_side": {"median": 8}, "images": 10})
    assert cfg.image_size == 224 and "position embeddings" in why
    torch.manual_seed(0)
    net, pre, _ = build_backbone(BackboneConfig(name="vit_tiny_patch16_224", weights="hub", image_size=96),
                                 load_weights=False)
    with torch.no_grad():
        tokens = net(torch.zeros(1, 3, 96, 96))
    assert pre.size == 96 and tuple(tokens.shape) == (1, 1 + 36, 192) and net.layout == "NLC"


def _saved_folder(folder: Path) -> Path:
    """A real `local-dir:` folder (timm's save_for_hf: config.json + model.safetensors) of a resnet18."""
    from timm.models._hub import save_for_hf

    save_for_hf(timm.create_model("resnet18", pretrained=False), str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("damage,reason", [
    ("no folder", r"FileNotFoundError: Config file not found"),
    ("weights missing", r"RuntimeError: No suitable checkpoints found"),
    ("weights truncated", r"SafetensorError: "),
])
def test_local_dir_folder_missing_or_damaged_is_one_line(tmp_path: Path, damage: str, reason: str):
    from pipeline.core.models.architectures import WeightsError

    folder = _saved_folder(tmp_path / "folder")
    weights = folder / "model.safetensors"
    if damage == "no folder":
        folder = tmp_path / "elsewhere"
    elif damage == "weights missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    cfg = BackboneConfig(name=f"local-dir:{folder}", weights="hub", image_size=None)
    with pytest.raises(WeightsError, match=rf"backbone.name 'local-dir:{folder}' cannot be loaded \({reason}.*"
                                           r"the folder must hold timm's config.json and a readable weights file") as e:
        build_backbone(cfg)
    assert "\n" not in str(e.value)


def test_hf_hub_name_without_network_is_one_line(monkeypatch):
    """No network (HF_HUB_OFFLINE, as on an air-gapped machine; without it the Hub's client retries first) and
    nothing cached: one line that says how to get it, not huggingface_hub's traceback."""
    import huggingface_hub.constants

    from pipeline.core.models.architectures import WeightsError, architecture_data_cfg

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError, match=r"backbone.name 'hf-hub:timm/no-such-model-anywhere' cannot be loaded "
                                           r"\(.*connect to the network once .* local-dir:<folder>") as e:
        architecture_data_cfg("hf-hub:timm/no-such-model-anywhere")
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["no_such_backbone_v2", "local-dir"])
def test_sweep_extraction_of_an_unknown_or_damaged_backbone_is_one_line(tmp_path: Path, name: str):
    """The sweep's own command (dvc.yaml `sweep_extract`) with a typo in sweep.backbones, or a damaged local folder:
    exit 2 and one line, nothing written."""
    import os
    import subprocess
    import sys

    from conftest import REPO, TINY, write_digit_folder, write_params

    from pipeline import prepare

    params = write_params(tmp_path / "params.yaml", **{**TINY, "data": {**TINY["data"], "source": str(
        write_digit_folder(tmp_path / "digits", classes=2, per_class=4))}})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "prepared")])
    if name == "local-dir":
        folder = _saved_folder(tmp_path / "folder")
        (folder / "model.safetensors").write_bytes(b"\0" * 100)
        name = f"local-dir:{folder}"
    out = tmp_path / "data" / "sweep" / "x" / "features.h5"
    proc = subprocess.run([sys.executable, "-m", "pipeline.extract", "--params", str(params), "--index",
                           str(tmp_path / "prepared"), "--backbone", name, "--weights", "hub", "--store", "none",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"extract: error: backbone.name '{name}' " in errors[0]
    assert not out.exists()
