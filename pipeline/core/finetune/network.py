"""The whole network: backbone -> pooling -> head, warm-started from a fitted head, and its saved model format.

The saved model is `model.safetensors` (the full state dict) + `model.json` (backbone config, head spec, preprocessing,
classes), so it loads with no pickle and no guessing of preprocessing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.core.data.preprocess import Preprocess
from pipeline.core.heads.fitting import build_head, check_class_binding
from pipeline.core.heads.spec import HeadSpec
from pipeline.core.models.backbone import build_backbone
from pipeline.core.models.feature_sets import pooling_datasets
from pipeline.core.models.pooling import FeatureNet
from pipeline.infra.artifacts import atomic_path, read_json, write_json
from pipeline.infra.config import BackboneConfig, build
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import progress_disabled


class TransferNet(nn.Module):
    """Backbone, the head's pooling (`avg`, `pre_logits` or `catavgmax` = [avg, max]), and the head.

    The pooling goes through the same functions as extraction (pipeline/core/models/pooling.py), so the warm start
    computes the head's logits on the cached features for every backbone family.
    """

    def __init__(self, body: FeatureNet, head: nn.Module, pooling: str):
        super().__init__()
        self.body = body
        self.head = head
        self.pooling = pooling
        self._sets = pooling_datasets(pooling)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        sets = self.body.feature_sets(self.body(x), self._sets)
        return sets[self._sets[0]] if len(self._sets) == 1 else torch.cat([sets[k] for k in self._sets], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))


def warm_started(backbone: BackboneConfig, head: nn.Module, spec: HeadSpec) -> tuple[TransferNet, Preprocess]:
    """The pretrained backbone with the fitted head on top: before training it computes the head's logits."""
    body, pre, _ = build_backbone(backbone)
    return TransferNet(body, head, spec.pooling), pre


def save_finetuned(out: Path, net: TransferNet, backbone: BackboneConfig, spec: HeadSpec, pre: Preprocess,
               info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out / "model.safetensors", sum(t.nbytes for t in state.values())) as tmp:
        save_file(state, str(tmp))
    write_json(out / "model.json", {"backbone": {"name": backbone.name, "weights": backbone.weights,
                                                 "image_size": backbone.image_size},
                                    "head": spec.to_dict(), "preprocess": pre.to_dict(), "classes": spec.classes,
                                    **info})


class ModelFileError(PipelineError, ValueError):
    """A fine-tuned model folder that is missing or not what the finetune stage writes (never unpickled)."""


def load_finetuned(ckpt_dir: Path | str) -> tuple[TransferNet, Preprocess, dict]:
    """Rebuilds the fine-tuned network (eval mode) from its folder; no pretrained weights are fetched.

    Raises:
        ModelFileError: model.json or model.safetensors is missing or cannot be read as what the finetune stage
            writes (a pickle or any other file in its place is refused, never unpickled).
        HeadFileError: the classes in model.json were edited after fitting (checksum).
    """
    ckpt_dir = Path(ckpt_dir)
    rerun = "rerun `dvc repro` (or `python -m pipeline.finetune`)"
    if not (ckpt_dir / "model.json").is_file() or not (ckpt_dir / "model.safetensors").is_file():
        raise ModelFileError(f"no fine-tuned model in '{ckpt_dir}' (model.json + model.safetensors); {rerun}")
    meta = read_json(ckpt_dir / "model.json")
    backbone = build(BackboneConfig, meta["backbone"], "model.json:backbone")
    body, _, _ = build_backbone(backbone, load_weights=False)
    try:
        spec = HeadSpec.from_dict(meta["head"])  # a model.json that is not ours may lack any of its keys
        net = TransferNet(body, build_head(spec), spec.pooling)
        net.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
    except Exception as exc:  # safetensors, load_state_dict and a malformed head spec raise their own types
        raise ModelFileError(f"'{ckpt_dir}' does not hold a model the finetune stage wrote "
                             f"({type(exc).__name__}: {str(exc)[:200]}); {rerun}") from None
    # Classes are positional: an edited list in model.json would relabel every prediction without an error.
    check_class_binding(meta["head"], ckpt_dir / "model.json", meta.get("classes"))
    pre = Preprocess.from_dict(meta["preprocess"])
    return net.eval(), pre, meta


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval") -> np.ndarray:
    net.eval()
    out = []
    for images, _, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=progress_disabled()):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        out.append(net(images).float().cpu())
    return torch.cat(out).numpy()  # one concatenation at the end, not one per batch
