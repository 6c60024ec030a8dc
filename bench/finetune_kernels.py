"""What the portable convolutions cost: the fine-tune with PyTorch's own CPU kernels (oneDNN's backward, whose bytes
depend on the CPU model) against pipeline/core/finetune/portable_conv.py (the default), side by side in one process.

Two measurements, each alternating the two kernel choices so that a busy machine slows both alike:
- `steps`: seconds per training step of the stage's own `train_step` (bundled Lite0 + linear head, default
  `finetune` params, batch 32 at 96 px: the default data's), after one warm-up step;
- `stage`: the whole `run_finetune` (warm start, parity check, every epoch, checkpoint) on this checkout's own
  `dvc repro` outputs (data/prepared, data/features.h5, models/heads, models/selected.json), written to a
  scratch folder, so tracked files are untouched.

    python bench/finetune_kernels.py --steps 10                 # per-step times only (a minute)
    python bench/finetune_kernels.py --steps 10 --stage         # and the whole stage twice (several minutes)

Prints a table and the ratio portable / PyTorch's; nothing is written to tracked files.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (the portable pins, before numpy and torch load)

# isort: split
import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402


def _kernels(name: str, device):
    from pipeline.core.finetune.portable_conv import training_convolutions

    return contextlib.nullcontext() if name == "pytorch" else training_convolutions(device, "fp32")


def time_steps(steps: int, batch: int, size: int) -> dict[str, list[float]]:
    """Seconds per `train_step` for each kernel choice, interleaved step by step."""
    import torch

    from pipeline.core.finetune.network import TransferNet
    from pipeline.core.finetune.optim import apply_bn_mode, make_optimizer, make_scheduler, set_trainable
    from pipeline.core.finetune.training import train_step
    from pipeline.core.models.backbone import build_backbone
    from pipeline.infra.config import BackboneConfig, FinetuneConfig
    from pipeline.infra.runtime import retained_heap, set_deterministic

    set_deterministic()
    cfg = FinetuneConfig()
    device = torch.device("cpu")
    runs = {}
    for name in ("pytorch", "portable"):
        torch.manual_seed(0)
        body, _, _ = build_backbone(BackboneConfig(image_size=size))
        net = TransferNet(body, torch.nn.Linear(body.num_features, 10), "avg").to(memory_format=torch.channels_last)
        set_trainable(net, cfg, 1)
        opt = make_optimizer(net, cfg)
        net.train()
        apply_bn_mode(net.body, cfg.bn)
        runs[name] = (net, opt, make_scheduler(opt, cfg, steps + 1), _kernels(name, device))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch) % 10
    times: dict[str, list[float]] = {name: [] for name in runs}
    with retained_heap():  # as the stage runs
        for step in range(steps + 1):
            for name, (net, opt, sched, kernels) in runs.items():
                t0 = time.perf_counter()
                train_step(net, net, x, y, opt, sched, cfg, kernels)
                if step:  # the first step of each pays for allocation and oneDNN's kernel generation
                    times[name].append(time.perf_counter() - t0)
    return times


def time_stage(epochs: int | None) -> dict[str, float]:
    """Wall seconds of the whole fine-tune stage for each kernel choice, on this checkout's pipeline outputs."""
    import dataclasses

    import torch

    import pipeline.core.finetune.training as training
    from pipeline.infra.config import load_section

    cfg = load_section("finetune", REPO / "params.yaml")
    if epochs:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    backbone, extract = load_section("backbone", REPO / "params.yaml"), load_section("extract", REPO / "params.yaml")
    seconds = {}
    for name in ("pytorch", "portable"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            metrics = training.run_finetune(cfg, backbone, extract, REPO / "data/prepared", REPO / "data/features.h5",
                                            REPO / "models/heads", REPO / "models/selected.json",
                                            Path(tmp) / "model", Path(tmp) / "metrics.json",
                                            kernels=_kernels(name, torch.device("cpu")))
            seconds[name] = time.perf_counter() - t0
        logging.info("%s: %.1f s, val accuracy %.4f", name, seconds[name], metrics["val"]["accuracy"])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per kernel choice (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--stage", action="store_true", help="also time the whole fine-tune stage, both ways")
    parser.add_argument("--epochs", type=int, help="the stage's epochs (default: params.yaml's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipeline.infra.numerics import cpu_model

    print(f"machine: {cpu_model()}, {platform.machine()}; torch threads pinned (pipeline/infra/numerics.py)")
    times = time_steps(args.steps, args.batch, args.size)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"train_step, batch {args.batch} at {args.size} px, median of {args.steps}:")
    print(f"  PyTorch's kernels (oneDNN backward): {1000 * med['pytorch']:8.1f} ms")
    print(f"  portable convolutions (default):     {1000 * med['portable']:8.1f} ms")
    print(f"  ratio portable / PyTorch's: {med['portable'] / med['pytorch']:.2f}x")
    if args.stage:
        seconds = time_stage(args.epochs)
        print("whole fine-tune stage (run_finetune):")
        print(f"  PyTorch's kernels: {seconds['pytorch']:7.1f} s")
        print(f"  portable:          {seconds['portable']:7.1f} s")
        print(f"  ratio portable / PyTorch's: {seconds['portable'] / seconds['pytorch']:.2f}x")


if __name__ == "__main__":
    main()
