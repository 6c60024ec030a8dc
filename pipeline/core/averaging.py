"""Weight averaging for fine-tuning: an exponential moving average (EMA) of the network's weights.

Why: with a few hundred steps on a small data set, where the last SGD step lands depends on the seed (batch order,
augmentation), and so does the checkpoint picked on a small val split. The average of the recent weights sits nearer
the middle of that spread (Polyak averaging; timm's `ModelEmaV3`, used by most ImageNet recipes), so results move less
with the seed. `finetune.ema_decay` is the weight kept per optimizer step: 0 turns averaging off, 0.99 averages over
the last ~100 steps. Validation, checkpoint selection and the saved model all use the averaged weights when it is on.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightAverage:
    """An EMA copy of `net` (same device), updated after each optimizer step.

    Floating-point parameters and buffers (BatchNorm statistics under `bn: train`) are averaged; integer buffers
    (`num_batches_tracked`) are copied.
    """

    def __init__(self, net: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(net).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """ema = decay * ema + (1 - decay) * weights, for every entry of the state dict."""
        current = net.state_dict()
        for name, avg in self.module.state_dict().items():
            value = current[name].detach()
            if avg.dtype.is_floating_point:
                avg.lerp_(value.to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(value)
