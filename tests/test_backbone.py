"""Backbones: pooling layout, the bundled ImageNet weights, and clear errors for weights that do not fit."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision

from pipeline.core.backbone import (
    ImageSizeError,
    WeightsError,
    auto_image_size,
    auto_sizes,
    build_backbone,
    imagenet_classifier,
    pool_avg_max,
    resolve_image_size,
    resolve_preprocess,
)
from pipeline.core.images import eval_transform, load_rgb
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
    avg, mx = pool_avg_max(tokens)
    torch.testing.assert_close(avg, tokens.mean(1))
    torch.testing.assert_close(mx, tokens[:, -1, :])


def test_bundled_backbone_shapes_and_preprocessing():
    net, pre, sha = build_backbone(BackboneConfig(image_size=None))
    assert net.num_features == 1280
    assert (pre.size, pre.resize, pre.mean, pre.std) == (224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with torch.no_grad():
        fmap = net(torch.zeros(1, 3, 224, 224))
    assert tuple(fmap.shape) == (1, 1280, 7, 7)
    _, _, sha_again = build_backbone(BackboneConfig(image_size=96))
    assert sha == sha_again and len(sha) == 64  # image size changes preprocessing, never the weights


def test_bundled_weights_classify_ants_and_bees(hymenoptera: Path):
    """REFERENCE.md: with the TF-style preprocessing, 85 % of 20 val ants -> 'ant' (310), 85 % of bees -> 'bee'."""
    cfg = BackboneConfig(image_size=None)
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
    with pytest.raises(WeightsError, match="neither a timm nor a torchvision"):
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
