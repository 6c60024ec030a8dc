"""What a backbone hands to the heads: its own pre-logits features, and average / max pooling of its last map.

Three feature sets per image, all cached (pipeline/core/features/cache.py):

- `pre_logits`: the model's own pooling path up to its classifier, what its ImageNet head was trained on. timm:
  ``forward_head(forward_features(x), pre_logits=True)``: for a ViT the class token after the final norm (DINOv2,
  CLIP), for EVA and Swin the patch-token average after the norm, for SigLIP its attention pooling, for ConvNeXt the
  average after the head's LayerNorm, for MobileNetV3 the head's extra 1x1 layer; for plain CNNs (ResNet,
  EfficientNet) the global average itself. torchvision: the input of the final ``Linear``.
- `avg` and `max`: global pooling of the last feature map, whatever its layout: NCHW (CNNs), NHWC (timm models whose
  ``output_fmt`` says so: Swin), or a token sequence (N, L, C) with the ``num_prefix_tokens`` (class and register
  tokens) left out, so they pool the patch tokens only.

The fine-tuned network (pipeline/core/finetune/network.py) goes through the same functions, so the warm start reproduces the
head's logits for every family.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from pipeline.core.models.feature_sets import FEATURE_SETS


def pool_avg_max(fmap: torch.Tensor, layout: str = "NCHW", prefix_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Global average and max pooling of a feature map in `layout` (NCHW, NHWC, or NLC tokens).

    For tokens, the first `prefix_tokens` (class and register tokens) are left out: only patch tokens are pooled.
    """
    if layout == "NLC" and fmap.ndim == 3:
        patches = fmap[:, prefix_tokens:]
        return patches.mean(dim=1), patches.amax(dim=1)
    if layout in ("NCHW", "NHWC") and fmap.ndim == 4:
        dims = (2, 3) if layout == "NCHW" else (1, 2)
        return fmap.mean(dim=dims), fmap.amax(dim=dims)
    raise ValueError(f"expected a feature map in layout {layout}, got shape {tuple(fmap.shape)}")


class FeatureNet(nn.Module):
    """A backbone cut before its classifier, giving any of the three feature sets of a batch.

    Args:
        body: the timm model (built with `num_classes=0`) or the torchvision model (final Linear removed).
        feature_map: body, x -> the last feature map or token sequence.
        pre_logits: body, feature map -> the classifier's input.
        layout: the feature map's layout: NCHW, NHWC or NLC.
        prefix_tokens: leading non-patch tokens of an NLC map (class, registers).
        widths: features per image of each feature set.
    """

    def __init__(self, body: nn.Module, feature_map: Callable, pre_logits: Callable, layout: str,
                 prefix_tokens: int, widths: dict[str, int]):
        super().__init__()
        self.body = body
        self._feature_map, self._pre_logits = feature_map, pre_logits
        self.layout, self.prefix_tokens = layout, prefix_tokens
        self.widths = dict(widths)
        self.num_features = widths["avg"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (or token sequence)."""
        return self._feature_map(self.body, x)

    def feature_sets(self, fmap: torch.Tensor, names: tuple[str, ...] = FEATURE_SETS) -> dict[str, torch.Tensor]:
        """The named feature sets of a feature map; `pre_logits` only runs the head's layers when asked for."""
        out: dict[str, torch.Tensor] = {}
        if "avg" in names or "max" in names:
            out["avg"], out["max"] = pool_avg_max(fmap, self.layout, self.prefix_tokens)
        if "pre_logits" in names:
            out["pre_logits"] = self._pre_logits(self.body, fmap)
        return {k: out[k] for k in names}


def timm_feature_net(model: nn.Module) -> FeatureNet:
    """FeatureNet of a timm model built with `num_classes=0` (its head keeps norms and pooling, not the classifier)."""
    fmt = getattr(model, "output_fmt", "NCHW")
    fmt = str(getattr(fmt, "value", fmt))
    ndim = _feature_ndim(model.pretrained_cfg)
    layout = "NLC" if ndim == 3 else ("NHWC" if fmt == "NHWC" else "NCHW")
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if layout == "NLC" else 0
    width = int(model.num_features)
    pre_width = int(getattr(model, "head_hidden_size", None) or width)
    return FeatureNet(model, lambda m, x: m.forward_features(x), lambda m, f: m.forward_head(f, pre_logits=True),
                      layout, prefix, {"avg": width, "max": width, "pre_logits": pre_width})


def _feature_ndim(pretrained_cfg: dict) -> int:
    """Dimensions of the architecture's forward_features output (4: a map, 3: tokens), run on the meta device (a
    shadow model with no memory and no compute; the real one may be large and on any device)."""
    import timm

    size = tuple(pretrained_cfg.get("input_size") or (3, 224, 224))
    with torch.device("meta"):
        shadow = timm.create_model(pretrained_cfg["architecture"], pretrained=False, num_classes=0)
        with torch.no_grad():
            return shadow.forward_features(torch.zeros(1, *size)).ndim


def _last_linear(seq: nn.Sequential) -> int:
    """Index of the final Linear layer in a torchvision classifier Sequential."""
    for i in range(len(seq) - 1, -1, -1):
        if isinstance(seq[i], nn.Linear):
            return i
    raise ValueError("classifier has no Linear layer")


_FLAT = nn.Flatten(1)


def _same_widths(width: int, pre_width: int | None = None) -> dict[str, int]:
    return {"avg": width, "max": width, "pre_logits": width if pre_width is None else pre_width}


def _tv_vit(model: nn.Module) -> FeatureNet:
    """VisionTransformer: class token + patch tokens (NLC); pre_logits = its heads up to the last Linear."""
    def tokens(m, x):
        x = m._process_input(x)
        return m.encoder(torch.cat([m.class_token.expand(x.shape[0], -1, -1), x], dim=1))

    cut = _last_linear(model.heads)
    pre_width = model.heads[cut].in_features
    model.heads = model.heads[:cut]  # keeps `pre_logits` + activation when the model has a representation layer
    return FeatureNet(model, tokens, lambda m, f: m.heads(f[:, 0]), "NLC", 1,
                      _same_widths(model.hidden_dim, pre_width))


def _tv_swin(model: nn.Module) -> FeatureNet:
    """SwinTransformer: its normed last stage (NHWC); pre_logits = the average after permuting to NCHW."""
    width = model.head.in_features
    model.head = nn.Identity()
    return FeatureNet(model, lambda m, x: m.norm(m.features(x)), lambda m, f: _FLAT(m.avgpool(m.permute(f))),
                      "NHWC", 0, _same_widths(width))


def _tv_densenet(model: nn.Module) -> FeatureNet:
    """DenseNet: features then ReLU, as its forward does; pre_logits = the average."""
    width = model.classifier.in_features
    model.classifier = nn.Identity()
    return FeatureNet(model, lambda m, x: torch.relu(m.features(x)),
                      lambda m, f: _FLAT(nn.functional.adaptive_avg_pool2d(f, 1)), "NCHW", 0, _same_widths(width))


def _tv_resnet_like(model: nn.Module) -> FeatureNet:
    """`fc` after `avgpool` (resnet, resnext, wide_resnet, regnet): every child up to the pool."""
    width = model.fc.in_features
    stem = [n for n, _ in model.named_children() if n not in ("avgpool", "fc")]
    model.fc = nn.Identity()

    def children_up_to_pool(m, x):
        for n in stem:
            x = getattr(m, n)(x)
        return x

    return FeatureNet(model, children_up_to_pool, lambda m, f: _FLAT(m.avgpool(f)), "NCHW", 0, _same_widths(width))


def _tv_features_classifier(model: nn.Module) -> FeatureNet:
    """`features` + `avgpool` + `classifier` (efficientnet, mobilenet, vgg, mnasnet, convnext): pre_logits = the
    classifier up to its last Linear."""
    import torchvision.models as tvm

    cut = _last_linear(model.classifier)
    pre_width = model.classifier[cut].in_features
    model.classifier = model.classifier[:cut]
    with torch.no_grad():
        width = int(model.features(torch.zeros(1, 3, 64, 64)).shape[1])
    if isinstance(model, tvm.ConvNeXt):  # its classifier starts with a LayerNorm2d and flattens itself
        pre = lambda m, f: m.classifier(m.avgpool(f))  # noqa: E731
    else:
        pre = lambda m, f: m.classifier(_FLAT(m.avgpool(f)))  # noqa: E731
    return FeatureNet(model, lambda m, x: m.features(x), pre, "NCHW", 0, _same_widths(width, pre_width))


def torchvision_feature_net(model: nn.Module, name: str) -> FeatureNet:
    """FeatureNet of a torchvision classifier: its feature body, and its own path up to the final Linear.

    Known families, tried in this order (the first that matches builds it): VisionTransformer, Swin, DenseNet,
    ResNet-like (`fc` after `avgpool`), and `features` + `avgpool` + `classifier` models.
    """
    import torchvision.models as tvm

    families = (
        (lambda m: isinstance(m, tvm.VisionTransformer), _tv_vit),
        (lambda m: isinstance(m, tvm.SwinTransformer), _tv_swin),
        (lambda m: isinstance(m, tvm.DenseNet), _tv_densenet),
        (lambda m: hasattr(m, "fc") and hasattr(m, "avgpool"), _tv_resnet_like),
        (lambda m: hasattr(m, "features") and isinstance(getattr(m, "classifier", None), nn.Sequential),
         _tv_features_classifier),
    )
    for matches, build in families:
        if matches(model):
            return build(model)
    raise ValueError(f"torchvision model '{name}' is not a family this pipeline knows (resnet, regnet, densenet, "
                     "convnext, efficientnet, mobilenet, vgg, vit, swin); use a timm model name instead")
