"""The preprocessing a backbone's weights give, and the crop size `backbone.image_size` stands for.

Cheap: from the architecture's config alone (pipeline/core/models/architectures.py), never the weights, so stages
that only check a features file (heads, search) resolve it without loading a network. `image_size: auto` is
resolved from the train images' sizes (recorded by prepare) before anything is built.
"""
from __future__ import annotations

import dataclasses
import math

from pipeline.core.data.preprocess import Preprocess
from pipeline.core.models.architectures import architecture_data_cfg
from pipeline.infra.config import BackboneConfig
from pipeline.infra.errors import PipelineError

# `image_size: auto` for small images: at least AUTO_MIN_SIZE px (a 3x3 last feature map for a stride-32 network),
# in steps of AUTO_STEP px (the total stride of most CNNs, so the last map has no partial cells).
AUTO_MIN_SIZE = 96
AUTO_STEP = 32


def preprocess_from(cfg: BackboneConfig, data_cfg: dict) -> Preprocess:
    """The eval preprocessing for a data config, with `backbone.image_size` overriding the crop size."""
    if cfg.image_size == "auto":  # a programming error: the data decide `auto`, and this function never sees them
        raise ValueError("backbone.image_size 'auto' must be resolved from the train images' sizes first "
                         "(pipeline.core.models.preprocessing.resolve_image_size)")
    size = cfg.image_size or int(data_cfg["input_size"][-1])
    crop_pct = float(data_cfg.get("crop_pct") or 1.0)
    return Preprocess(size=size, resize=int(size / crop_pct), mean=tuple(float(m) for m in data_cfg["mean"]),
                      std=tuple(float(s) for s in data_cfg["std"]), interpolation=str(data_cfg["interpolation"]),
                      crop_mode=str(data_cfg.get("crop_mode") or "center"))


def resolve_preprocess(cfg: BackboneConfig, data_cfg: dict | None = None) -> Preprocess:
    """The preprocessing :func:`build_backbone` gives `cfg`, without loading or hashing any weights.

    Cheap enough for fingerprint checks in stages that never run the backbone. `cfg.image_size` must be resolved
    (not `auto`; see :func:`resolve_image_size`). `data_cfg`: :func:`architecture_data_cfg` of `cfg.name`, when
    the caller has it.
    """
    return preprocess_from(cfg, data_cfg or architecture_data_cfg(cfg.name))


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
