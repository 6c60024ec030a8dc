"""Fine-tune throughput: the stage's own training loop against a bare training step of the same network (issue 27,
item 5b: goal >= 70 %), side by side in one process, on the GPU when there is one.

Why: a fine-tune on a GPU is only as fast as what feeds it. The bare step is the ceiling the GPU allows for this
network, batch and precision; the stage's loop adds JPEG decoding and augmentation in DataLoader workers, the host ->
device copy, gradient clipping, the schedule, the weight average and a loss read-back per step. Their ratio says how
much of the GPU the stage uses.

- `pipeline`: `train_epoch` (pipeline/core/finetune/training.py) with the stage's `make_loaders` DataLoader and
  augmentation over generated 500x375 JPEGs (bench/extract.py's generator, two classes), the stage's optimizer,
  schedule, BatchNorm policy and weight average (params.yaml `finetune`, with `precision` bf16 on a GPU); one epoch
  of warm-up (worker start, cuDNN, allocator), then one timed epoch; img/s = images trained / its wall time;
- `bare`: the same network and `make_optimizer`, one batch of random tensors already on the device (channels_last),
  the same autocast precision, forward + cross-entropy + backward + AdamW step in a loop with PyTorch's own kernels
  (no DataLoader, no clipping, schedule, average or per-step read-back): a few warm-up steps, then as many steps as
  the timed epoch had.
Both run under the stage's `set_deterministic()` (no cuDNN autotuning, TF32 off), as the stage trains; the GPU is
synchronized before every clock read. The network is the Lite0 body + a linear head on avg pooling (the
logreg head's shape) at `--image-size`; it starts from the bundled weights, not from a fitted head (speed only).

    python bench/finetune_speed.py                                        # cuda when present, else the CPU
    python bench/finetune_speed.py --generate 4096 --batch-size 32 128 --workers 14 --json /tmp/ft_speed.json  # GPU
    python bench/finetune_speed.py --generate 64 --image-size 96 --batch-size 16 --workers 2  # CPU (a minute)

On a CPU under portable numerics the stage's fp32 forward runs the portable convolutions (bench/finetune_kernels.py)
and the bare step PyTorch's own, which lowers the ratio there; on a GPU both run PyTorch's kernels.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402,F401  (the portable pins, before numpy and torch load)

# isort: split
import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

GOAL = 0.70


def _extract_bench():
    """bench/extract.py as a module: its JPEG generator and index writer (stdlib-only at import)."""
    spec = importlib.util.spec_from_file_location("bench_extract", REPO / "bench" / "extract.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its process pool pickles _make_jpeg by module name
    spec.loader.exec_module(module)
    return module


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    import platform

    import torch

    from pipeline.infra.numerics import cpu_model

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}"


def _network(backbone, classes: int, device):
    import torch

    from pipeline.core.finetune.network import TransferNet
    from pipeline.core.models.backbone import build_backbone

    torch.manual_seed(0)
    body, pre, _ = build_backbone(backbone)
    net = TransferNet(body, torch.nn.Linear(body.num_features, classes), "avg")
    return net.to(device, memory_format=torch.channels_last), pre


def time_pipeline(net, pre, index, cfg, device) -> dict:
    """The stage's loop: one warm-up epoch, then one timed epoch of `train_epoch`, as `finetune()` sets it up."""
    from pipeline.core.finetune.averaging import make_average
    from pipeline.core.finetune.optim import make_optimizer, make_scheduler, set_trainable
    from pipeline.core.finetune.portable_conv import training_convolutions
    from pipeline.core.finetune.training import make_loaders, train_epoch
    from pipeline.infra.runtime import dist_info, seed_everything

    gen = seed_everything(cfg.seed)
    loaders = make_loaders(index, pre, cfg, dist_info(), device, gen)
    set_trainable(net, cfg, cfg.freeze_epochs + 1)
    opt = make_optimizer(net, cfg)
    sched = make_scheduler(opt, cfg, len(loaders.train))
    average = make_average(net, cfg, cfg.epochs * len(loaders.train))
    seconds = []
    for epoch in (1, 2):
        _sync(device)
        t0 = time.perf_counter()
        _, _, seen = train_epoch(net, net, loaders.train, opt, sched, cfg, device, epoch, [average] if average else [])
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    kernels = type(training_convolutions(device, cfg.precision)).__name__
    return {"img_per_s": seen / seconds[1], "seconds": seconds[1], "images": int(seen), "steps": len(loaders.train),
            "warmup_epoch_seconds": seconds[0], "forward_kernels": kernels}


def time_bare(net, cfg, batch: int, size: int, classes: int, steps: int, warmup: int, device) -> dict:
    """Forward + loss + backward + AdamW on one pre-loaded batch, looped: what the GPU allows for this network."""
    import torch
    import torch.nn.functional as F

    from pipeline.core.finetune.optim import apply_bn_mode, make_optimizer

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(batch) % classes).to(device)
    opt = make_optimizer(net, cfg)
    net.train()
    apply_bn_mode(net.body, cfg.bn)
    bf16 = cfg.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"img_per_s": steps * batch / seconds, "seconds": seconds, "images": steps * batch, "steps": steps,
            "warmup_steps": warmup}


def measure(a: argparse.Namespace) -> dict:
    import torch

    from pipeline.infra.config import load_section
    from pipeline.infra.runtime import resolve_device, retained_heap, set_deterministic

    device = resolve_device(a.device)
    precision = a.precision or ("bf16" if device.type == "cuda" else load_section("finetune", a.params).precision)
    base = load_section("finetune", a.params)
    backbone = dataclasses.replace(load_section("backbone", a.params), image_size=a.image_size)
    ex = _extract_bench()
    width, height = (int(v) for v in a.size.lower().split("x"))
    work = Path(a.workdir)
    t0 = time.perf_counter()
    root = ex.generate_images(work / f"jpeg-{width}x{height}-{a.generate}", a.generate, width, height,
                              os.cpu_count() or 1)
    classes, samples = ex.image_list(root)
    index = ex.write_index(work / f"index-{a.generate}", root, classes, samples)
    for p, _ in samples:  # page cache: the loop pays for decoding, not for the disk
        (root / p).read_bytes()
    gen_s = time.perf_counter() - t0
    set_deterministic()  # as the stage runs (no cuDNN autotuning, TF32 off): both measurements under it
    out = {"device": device_name(device), "torch": torch.__version__, "images": len(samples),
           "image_files": f"{width}x{height} JPEG", "image_size": a.image_size, "precision": precision,
           "workers": a.workers if a.workers is not None else base.workers, "backbone": backbone.name,
           "generate_seconds": gen_s, "goal": GOAL, "runs": []}
    for batch in a.batch_size:
        cfg = dataclasses.replace(base, batch_size=batch, precision=precision, workers=out["workers"])
        with retained_heap(enabled=device.type == "cpu"):  # as the stage runs on a CPU
            net, pre = _network(backbone, len(classes), device)
            pipe = time_pipeline(net, pre, index, cfg, device)
            bare = time_bare(net, cfg, batch, pre.size, len(classes), a.bare_steps or pipe["steps"], a.warmup, device)
        run = {"batch_size": batch, "pipeline": pipe, "bare": bare, "ratio": pipe["img_per_s"] / bare["img_per_s"]}
        out["runs"].append(run)
        print(_row(run), flush=True)
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _row(r: dict) -> str:
    p, b = r["pipeline"], r["bare"]
    return (f"| {r['batch_size']} | {p['img_per_s']:.1f} ({p['images']} img, {p['seconds']:.2f} s) | "
            f"{b['img_per_s']:.1f} ({b['steps']} steps, {b['seconds']:.2f} s) | **{100 * r['ratio']:.1f} %** "
            f"{'meets' if r['ratio'] >= GOAL else 'misses'} >= {100 * GOAL:.0f} % |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generate", type=int, default=2048, help="generated JPEGs, the epoch (default: %(default)s)")
    p.add_argument("--size", default="500x375", help="WxH of the generated JPEGs (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="crop size the network sees (default: %(default)s)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[32],
                   help="one run per value (default: 32, params.yaml's finetune.batch_size)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: params.yaml's finetune.workers)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on a GPU, params.yaml's on a CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--bare-steps", type=int, help="timed bare steps (default: as many as the timed epoch had)")
    p.add_argument("--warmup", type=int, default=5, help="bare warm-up steps (default: %(default)s)")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--workdir", type=Path, help="keep the generated images here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    own = a.workdir is None
    if own:
        a.workdir = Path(tempfile.mkdtemp(prefix="bench-ft-speed-"))
    try:
        print(f"fine-tune img/s, stage loop vs bare step: {a.generate} generated {a.size} JPEGs, {a.image_size} px",
              flush=True)
        print("| batch | pipeline img/s (train_epoch + make_loaders) | bare step img/s | pipeline / bare |")
        print("|---|---|---|---|", flush=True)
        out = measure(a)
    finally:
        if own:
            import shutil

            shutil.rmtree(a.workdir, ignore_errors=True)
    print(f"device: {out['device']}; torch {out['torch']}, {out['precision']}, {out['workers']} DataLoader workers, "
          f"{out['backbone']} at {out['image_size']} px; generating the images took {out['generate_seconds']:.1f} s")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
