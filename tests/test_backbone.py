"""Backbones: pooling layout, the bundled ImageNet weights, and clear errors for weights that do not fit."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision

from pipeline.core.backbone import WeightsError, build_backbone, imagenet_classifier, pool_avg_max
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
