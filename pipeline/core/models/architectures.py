"""Backbone names and their architectures' own configuration, without weights.

Which library a name belongs to (timm, timm's `hf-hub:` / `local-dir:`, torchvision), building a timm model with what
goes wrong said in one line, and the architecture's data config (its weights' eval preprocessing). Leaf of the models
layer: the preprocessing resolution and the stale-features check use it without loading or hashing any weights.
"""
from __future__ import annotations

import copy
import functools

import torch

from pipeline.infra.errors import PipelineError


class WeightsError(PipelineError, ValueError):
    """Weights that cannot be loaded into the named backbone; the message names both."""


def create_timm_model(name: str, pretrained: bool, **kwargs):
    """`timm.create_model`, with what goes wrong fetching or reading the weights said in one line (WeightsError).

    Why: `hf-hub:` names fetch config.json even to build the bare architecture, `local-dir:` folders are read with
    the Hub's own loaders, and `weights: hub` downloads; without a network, with a missing folder, config or weights
    file, or with damaged weights, timm lets huggingface_hub's, safetensors' or torch's exception through as a
    40-line traceback. Those libraries raise many unrelated types (LocalEntryNotFoundError, SafetensorError,
    RuntimeError, FileNotFoundError, ...), so any exception is translated, naming the backbone and the fix.
    """
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # noqa: BLE001  (see above; the original is chained for --debug logs)
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
        if name.startswith("hf-hub:"):
            fix = ("it is fetched from the Hugging Face Hub (config.json, and its weights with weights: hub): connect "
                   "to the network once (it is cached after that), or download the repository and name the folder "
                   "as local-dir:<folder>")
        elif name.startswith("local-dir:"):
            fix = ("the folder must hold timm's config.json and a readable weights file (model.safetensors or "
                   "pytorch_model.bin), as timm's save_for_hf writes them")
        elif pretrained:
            fix = ("backbone.weights: hub downloads them: connect to the network once (they are cached), or use "
                   "weights: bundled (EfficientNet-Lite0/1/2) or a local weights file")
        else:
            raise
        raise WeightsError(f"backbone.name '{name}' cannot be loaded ({reason}); {fix}") from exc


SOURCES = ("hf-hub:", "local-dir:")  # timm names of a model folder on the Hugging Face Hub or on disk


def torchvision_weights(name: str):
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


def is_torchvision(name: str) -> bool:
    """torchvision when named with its weights (`resnet50.IMAGENET1K_V2`), or when timm has no such model."""
    import timm
    import torchvision

    if name.startswith(SOURCES):
        return False
    if torchvision_weights(name) is not None:
        return True
    return name in torchvision.models.list_models(module=torchvision.models) and not timm.is_model(name)


def check_name(name: str) -> None:
    import timm

    if not name.startswith(SOURCES) and not is_torchvision(name) and not timm.is_model(name):
        raise WeightsError(f"backbone.name '{name}' is neither a timm model name (optionally with a pretrained tag, "
                           "e.g. vit_small_patch14_reg4_dinov2.lvd142m), 'hf-hub:<repo>', 'local-dir:<folder>', nor a "
                           "torchvision name (resnet50, or with its weights: resnet50.IMAGENET1K_V2)")


def torchvision_data_cfg(name: str) -> dict:
    """A torchvision model's eval preprocessing in timm's data-config terms, from its weights' metadata."""
    import torchvision

    arch = name.partition(".")[0]
    weights = torchvision_weights(name) or torchvision.models.get_model_weights(arch).DEFAULT
    t = weights.transforms()  # metadata only; nothing is downloaded
    interp = t.interpolation.value if hasattr(t.interpolation, "value") else str(t.interpolation)
    return {"input_size": (3, t.crop_size[0], t.crop_size[0]), "crop_pct": t.crop_size[0] / t.resize_size[0],
            "mean": tuple(t.mean), "std": tuple(t.std), "interpolation": interp, "crop_mode": "center",
            "fixed_input_size": arch.startswith(("vit_", "swin_", "maxvit"))}


def architecture_data_cfg(name: str) -> dict:
    """The weights' own eval preprocessing (timm data-config terms) of backbone `name`, without loading weights,
    plus `fixed_input_size` (ViT-like models whose position embeddings fix the image size).

    The timm model is built on the `meta` device (no memory, no initialisation); torchvision's config comes from its
    weights' metadata. Extraction records it in the features file (`data_cfg`), so that stages checking the file
    can pass it back to the functions below (`data_cfg=`) instead of importing timm (~2 s) to rebuild it.
    """
    if ":" in name:  # hf-hub: / local-dir: read a config that may change; built each time
        return _build_data_cfg(name)
    # A registered name's config is fixed for the process: extraction asks for it up to four times (size
    # resolution, model build, file attributes), each a meta-device model build (~0.15-0.6 s on a 2-core CPU).
    return copy.deepcopy(_cached_data_cfg(name))  # a copy: callers may change theirs


@functools.lru_cache(maxsize=32)
def _cached_data_cfg(name: str) -> dict:
    return _build_data_cfg(name)


def _build_data_cfg(name: str) -> dict:
    check_name(name)
    if is_torchvision(name):
        return torchvision_data_cfg(name)
    import timm

    with torch.device("meta"):
        model = create_timm_model(name, pretrained=False, num_classes=0)
    return {**timm.data.resolve_model_data_config(model),
            "fixed_input_size": bool(model.pretrained_cfg.get("fixed_input_size", False))}
