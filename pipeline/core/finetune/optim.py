"""What trains and how fast during fine-tuning: parameter groups with discriminative learning rates, the schedule,
the BatchNorm policy, and the optional head-first phase.

BatchNorm policies (`finetune.bn`):
- `frozen`: body BatchNorm in eval mode (running statistics kept) and its affine parameters not trained;
- `eval`: everything trains, but body BatchNorm stays in eval mode, so the ImageNet statistics are kept;
- `train`: BatchNorm in train mode (statistics follow the new data) with its affine trained; during the first
  `freeze_epochs` only the head and the BatchNorm layers train (the rest of the body is frozen).
With `freeze_epochs` > 0 the other policies train only the head in that first phase.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from pipeline.infra.config import FinetuneConfig

_BN = nn.modules.batchnorm._BatchNorm


def _is_bn_param(body: nn.Module) -> set[int]:
    return {id(p) for m in body.modules() if isinstance(m, _BN) for p in m.parameters(recurse=False)}


def body_param_groups(body: nn.Module, base_lr: float, weight_decay: float, layer_decay: float) -> list[dict]:
    """Body parameters in groups, each at `base_lr` scaled down by `layer_decay` per layer below the top.

    timm models are split by their own layer grouping (`group_matcher`, e.g. per EfficientNet block), others by
    top-level child; 1-D parameters (norms, biases) get no weight decay, as is usual.
    """
    inner = getattr(body, "body", body)
    if layer_decay < 1.0 and hasattr(inner, "group_matcher"):
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(inner, weight_decay=weight_decay, layer_decay=layer_decay)
        return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": base_lr * g["lr_scale"]}
                for g in groups if g["params"]]
    # only children with parameters count as layers (pooling, activations and flattening have none)
    children = [c for c in inner.children() if any(True for _ in c.parameters())] or [inner]
    groups = []
    for depth, child in enumerate(reversed(children)):
        scale = layer_decay ** depth
        params = [p for p in child.parameters()]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": decay, "weight_decay": weight_decay, "lr": base_lr * scale},
                   {"params": no_decay, "weight_decay": 0.0, "lr": base_lr * scale}]
    return [g for g in groups if g["params"]]


def make_optimizer(net: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW: the head at `lr`, the body at `body_lr_ratio` x `lr` (x `layer_decay` per layer below the top)."""
    head = [{"params": list(net.head.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    body = body_param_groups(net.body, cfg.lr * cfg.body_lr_ratio, cfg.weight_decay, cfg.layer_decay)
    opt = torch.optim.AdamW(head + body, lr=cfg.lr)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of every group's learning rate at `step`: linear warm-up, then cosine decay to zero.

    `onecycle` warms up over 30 % of the steps from 1/25 of the rate (torch's OneCycleLR shape, cosine annealed).
    """
    if schedule == "onecycle":
        warm = max(1, int(0.3 * total_steps))
        if step < warm:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * step / warm)) / 2
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(opt: torch.optim.Optimizer, cfg: FinetuneConfig, steps_per_epoch: int):
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.schedule))


def set_trainable(net: nn.Module, cfg: FinetuneConfig, epoch: int) -> None:
    """requires_grad for this epoch: the head always; the body after the head-first phase; BN per the policy."""
    bn_ids = _is_bn_param(net.body)
    first_phase = epoch <= cfg.freeze_epochs
    for p in net.head.parameters():
        p.requires_grad_(True)
    for p in net.body.parameters():
        if id(p) in bn_ids:
            p.requires_grad_(cfg.bn == "train" or (cfg.bn == "eval" and not first_phase))
        else:
            p.requires_grad_(not first_phase)


def apply_bn_mode(body: nn.Module, policy: str) -> None:
    """After `model.train()`: `frozen` and `eval` put body BatchNorm back in eval mode (statistics kept)."""
    if policy in ("frozen", "eval"):
        for m in body.modules():
            if isinstance(m, _BN):
                m.eval()
