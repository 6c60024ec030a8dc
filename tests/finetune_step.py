"""One step of the project's own fine-tune on a tiny fixed input, hashed: the committed record that every CPU must
reproduce byte for byte (tests/finetune/test_finetune_bytes.py).

What runs is the stage's code: the bundled ImageNet EfficientNet-Lite0 with a linear head (pipeline/core/finetune/network.py),
the default `finetune` params (AdamW with discriminative learning rates, the schedule, BatchNorm in eval mode,
gradient clipping) and `training.train_step` under the kernels `training_convolutions` picks for the CPU. The input
is 8 of scikit-learn's digits at 64 px, two batches, so the second step starts from weights the first one moved.

    python -m tests.finetune_step --write    # after a deliberate change of the fine-tune's numerics; commit the file
    python -m tests.finetune_step            # print this machine's record
"""
from __future__ import annotations

import pipeline  # noqa: F401  (the portable pins, before numpy and torch load)

# isort: split
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

RECORD = Path(__file__).resolve().parent / "records" / "finetune_step.json"
SIZE, BATCH, CLASSES, STEPS = 64, 8, 4, 2


def _digest(t) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:16]


def _inputs():
    """Two batches of 8 digits (classes 0-3) as the network sees them: 64 px, channels-last, mean = std = 0.5."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(digits.target < CLASSES)[: BATCH * STEPS]
    pixels = torch.from_numpy(digits.images[keep] / 16.0).float()[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(pixels, size=(SIZE, SIZE), mode="nearest")
    x = ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
    return x.split(BATCH), torch.from_numpy(digits.target[keep]).long().split(BATCH)


def step_record() -> dict:
    """Loss, logits, every gradient and every weight after each of the steps, as SHA-256 prefixes (and sums, to
    show how far apart two machines are)."""
    import torch

    from pipeline.core.finetune.network import TransferNet
    from pipeline.core.finetune.optim import apply_bn_mode, make_optimizer, make_scheduler, set_trainable
    from pipeline.core.finetune.portable_conv import training_convolutions
    from pipeline.core.finetune.training import train_step
    from pipeline.core.models.backbone import build_backbone
    from pipeline.infra.config import BackboneConfig, FinetuneConfig
    from pipeline.infra.runtime import seed_everything, set_deterministic

    set_deterministic()
    body, _, _ = build_backbone(BackboneConfig(image_size=SIZE))
    # seeded after the build: the head's initial weights must not depend on how much of the RNG building the body
    # happens to draw (a meta-device template draws none, a CPU one did)
    seed_everything(0)
    head = torch.nn.Linear(body.num_features, CLASSES)
    net = TransferNet(body, head, "avg").to(memory_format=torch.channels_last)
    cfg = FinetuneConfig()
    set_trainable(net, cfg, 1)
    opt = make_optimizer(net, cfg)
    sched = make_scheduler(opt, cfg, STEPS)
    net.train()
    apply_bn_mode(net.body, cfg.bn)
    kernels = training_convolutions(torch.device("cpu"), cfg.precision)
    steps = []
    for images, labels in zip(*_inputs()):
        loss, logits = train_step(net, net, images, labels, opt, sched, cfg, kernels)
        named = list(net.named_parameters())
        steps.append({
            "loss": float(loss.detach()), "logits": _digest(logits),
            "grads": {n: _digest(p.grad) for n, p in named if p.grad is not None},
            "weights": {n: _digest(p) for n, p in named},
            "grad_sums": {n: float(p.grad.double().sum()) for n, p in named if p.grad is not None},
        })
    return {"kernels": type(kernels).__name__, "steps": steps}


def first_difference(expected: dict, actual: dict) -> str | None:
    """The first entry, in the order the step computes them, where `actual` departs from `expected`."""
    if expected["kernels"] != actual["kernels"]:
        return f"kernels: {expected['kernels']} recorded, {actual['kernels']} here"
    for i, (a, b) in enumerate(zip(expected["steps"], actual["steps"]), start=1):
        if a["loss"] != b["loss"]:
            return f"step {i} loss: {a['loss']!r} recorded, {b['loss']!r} here"
        if a["logits"] != b["logits"]:
            return f"step {i} logits"
        for part in ("grads", "weights"):
            for name, digest in a[part].items():
                if b[part].get(name) != digest:
                    extra = ""
                    if part == "grads" and name in b["grad_sums"]:
                        extra = f" (sum {a['grad_sums'][name]!r} recorded, {b['grad_sums'][name]!r} here)"
                    return f"step {i} {'gradient' if part == 'grads' else 'weight after AdamW'} of {name}{extra}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write the record to {RECORD}")
    args = parser.parse_args()
    record = step_record()
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.write:
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
