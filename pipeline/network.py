"""The whole network: backbone -> pooling -> head, warm-started from a fitted head, and its checkpoint format.

A checkpoint is `model.safetensors` (the full state dict) + `model.json` (backbone config, head spec, preprocessing,
classes), so it loads with no pickle and no guessing of preprocessing.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pipeline.artifacts import atomic_path, read_json, write_json
from pipeline.backbone import FeatureNet, Preprocess, build_backbone, pool_avg_max
from pipeline.config import BackboneConfig, build
from pipeline.heads import build_head


class TransferNet(nn.Module):
    """Backbone, the head's pooling (`avg` or `catavgmax` = [avg, max]), and the head."""

    def __init__(self, body: FeatureNet, head: nn.Module, pooling: str):
        super().__init__()
        self.body = body
        self.head = head
        self.pooling = pooling

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        avg, mx = pool_avg_max(self.body(x))
        return avg if self.pooling == "avg" else torch.cat([avg, mx], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(x))


def warm_started(backbone: BackboneConfig, head: nn.Module, spec: dict) -> tuple[TransferNet, Preprocess]:
    """The pretrained backbone with the fitted head on top: before training it computes the head's logits."""
    body, pre, _ = build_backbone(backbone)
    return TransferNet(body, head, spec["pooling"]), pre


def save_checkpoint(out: Path, net: TransferNet, backbone: BackboneConfig, spec: dict, pre: Preprocess,
                    info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(out / "model.json", {"backbone": {"name": backbone.name, "weights": backbone.weights,
                                                 "image_size": backbone.image_size},
                                    "head": spec, "preprocess": pre.to_dict(), "classes": spec["classes"], **info})


def load_checkpoint(ckpt_dir: Path | str) -> tuple[TransferNet, Preprocess, dict]:
    """Rebuilds the fine-tuned network (eval mode) from its folder; no pretrained weights are fetched."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_json(ckpt_dir / "model.json")
    backbone = build(BackboneConfig, meta["backbone"], "model.json:backbone")
    body, _, _ = build_backbone(backbone, load_weights=False)
    net = TransferNet(body, build_head(meta["head"]), meta["head"]["pooling"])
    net.load_state_dict(load_file(str(ckpt_dir / "model.safetensors")))
    pre = Preprocess.from_dict(meta["preprocess"])
    return net.eval(), pre, meta
