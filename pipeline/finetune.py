"""Stage `finetune`: trains the whole network, warm-started from the selected head (LP-FT).

Before any step it checks on val that backbone + head reproduce the head's own predictions from the cached features
(logits within `finetune.parity_atol`, argmax flips at most `finetune.parity_max_flips`), and stops loudly otherwise:
a mismatch means the features, the preprocessing or the head conversion are not what the head was fitted on.
Training: AdamW with discriminative learning rates (body at `body_lr_ratio` x the head's), linear warm-up then cosine
decay, gradient clipping, a BatchNorm policy, light augmentation, and the best-on-val checkpoint. The warm start
itself is epoch 0, so the saved model is never worse on val than the head it started from.

    python -m pipeline.finetune --params params.yaml
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.errors import run_main
from pipeline.errors import PipelineError
from pipeline.artifacts import read_json, write_json
from pipeline.config import BackboneConfig, FinetuneConfig, load_section, to_dict
from pipeline.data import ImageDataset, eval_transform, train_transform
from pipeline.features import read_split
from pipeline.heads import head_logits, load_head, split_metrics
from pipeline.network import TransferNet, save_checkpoint, warm_started
from pipeline.prepare import read_index
from pipeline.runtime import progress_disabled, resolve_device, seed_everything, set_deterministic, setup_logging

log = logging.getLogger("pipeline.finetune")


class ParityError(PipelineError, RuntimeError):
    """The warm-started network does not reproduce the head it was built from."""


@torch.no_grad()
def predict_logits(net: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval") -> np.ndarray:
    net.eval()
    out = []
    for images, _, _ in tqdm(loader, desc=desc, unit="batch", leave=False, disable=progress_disabled()):
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        out.append(net(images).float().cpu())
    return torch.cat(out).numpy()  # one concatenation at the end, not one per batch


def check_parity(net_logits: np.ndarray, head_logits_: np.ndarray, atol: float, max_flips: float) -> dict:
    """Compares the network's val logits with the head's; raises ParityError beyond the tolerances."""
    diff = float(np.abs(net_logits - head_logits_).max())
    flips = float((net_logits.argmax(1) != head_logits_.argmax(1)).mean())
    report = {"max_abs_logit_diff": diff, "argmax_flip_fraction": flips, "atol": atol, "max_flips": max_flips}
    if diff > atol or flips > max_flips:
        raise ParityError(
            f"warm start does not reproduce the head on val: max |logit difference| {diff:.3g} (allowed {atol:g}), "
            f"argmax differs on {flips:.2%} of images (allowed {max_flips:.2%}). The features file, the "
            "preprocessing or the backbone differ from what the head was fitted on: rerun `dvc repro`, or raise "
            "finetune.parity_atol if extraction used bf16/float16.")
    return report


def _apply_bn_policy(body: nn.Module, policy: str) -> None:
    """`frozen`/`eval`: body BatchNorm keeps its running statistics; `frozen` also stops training its affine."""
    for m in body.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if policy in ("frozen", "eval"):
                m.eval()
            if policy == "frozen":
                for p in m.parameters():
                    p.requires_grad_(False)


def _schedule(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def finetune(net: TransferNet, train_loader: DataLoader, val_loader: DataLoader, val_labels: np.ndarray,
             start_logits: np.ndarray, cfg: FinetuneConfig, device: torch.device) -> tuple[dict, list[dict], dict]:
    """Trains `net` in place; returns the best state dict (CPU), the per-epoch history and the best epoch's record."""
    body_params = [p for p in net.body.parameters()]
    head_params = list(net.head.parameters())
    opt = torch.optim.AdamW([{"params": head_params, "lr": cfg.lr},
                             {"params": body_params, "lr": cfg.lr * cfg.body_lr_ratio}],
                            weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(train_loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, int(cfg.warmup_epochs * len(train_loader))))
    start = split_metrics(start_logits, val_labels)
    best = {"epoch": 0, "val_accuracy": start["accuracy"], "val_loss": start["loss"]}
    best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    history = [{"epoch": 0, "train_loss": None, "val_accuracy": start["accuracy"], "val_loss": start["loss"]}]
    for epoch in range(1, cfg.epochs + 1):
        train_loader.dataset.set_epoch(epoch)
        net.train()
        _apply_bn_policy(net.body, cfg.bn)
        total, seen = 0.0, 0
        for images, labels, _ in tqdm(train_loader, desc=f"finetune {epoch}/{cfg.epochs}", unit="batch",
                                      disable=progress_disabled()):
            images = images.to(device).contiguous(memory_format=torch.channels_last)
            labels = labels.to(device)
            loss = F.cross_entropy(net(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg.clip_grad_norm)
            opt.step()
            sched.step()
            total += loss.item() * len(labels)
            seen += len(labels)
        val = split_metrics(predict_logits(net, val_loader, device, "val"), val_labels)
        history.append({"epoch": epoch, "train_loss": total / seen, "val_accuracy": val["accuracy"],
                        "val_loss": val["loss"]})
        log.info("finetune: epoch %d/%d train loss %.4f, val accuracy %.4f, val loss %.4f", epoch, cfg.epochs,
                 total / seen, val["accuracy"], val["loss"])
        if (val["accuracy"], -val["loss"]) > (best["val_accuracy"], -best["val_loss"]):
            best = {"epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return best_state, history, best


def run(params: Path, index_dir: Path, features: Path, heads_dir: Path, selected: Path, out: Path,
        metrics_path: Path) -> dict:
    """The stage: warm start, parity check, training, checkpoint and metrics; returns the metrics."""
    cfg: FinetuneConfig = load_section("finetune", params)
    backbone: BackboneConfig = load_section("backbone", params)
    set_deterministic()
    gen = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    choice = read_json(selected)
    head, spec = load_head(heads_dir / choice["head"])
    net, pre = warm_started(backbone, head, spec)
    net = net.to(device, memory_format=torch.channels_last)
    rows, meta = read_index(index_dir)
    root = Path(meta["source"])
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    val_loader = DataLoader(ImageDataset(root, val_rows, eval_transform(pre)), shuffle=False, **loader_args)
    train_set = ImageDataset(root, train_rows, train_transform(pre, cfg.crop_scale, cfg.hflip), seed=cfg.seed)
    train_loader = DataLoader(train_set,
                              shuffle=True, drop_last=len(train_rows) > cfg.batch_size, generator=gen, **loader_args)

    val_feats = read_split(features, "val")
    t0 = time.perf_counter()
    start_logits = predict_logits(net, val_loader, device, "parity")
    parity = check_parity(start_logits, head_logits(head, spec, val_feats), cfg.parity_atol, cfg.parity_max_flips)
    log.info("finetune: warm start reproduces %s on val (max |logit diff| %.2e, %.2f%% argmax flips)",
             choice["head"], parity["max_abs_logit_diff"], 100 * parity["argmax_flip_fraction"])
    val_labels = np.array([int(r["label"]) for r in val_rows])
    best_state, history, best = finetune(net, train_loader, val_loader, val_labels, start_logits, cfg, device)
    net.load_state_dict(best_state)
    seconds = time.perf_counter() - t0
    save_checkpoint(out, net.cpu(), backbone, spec, pre,
                    {"finetune": to_dict(cfg), "warm_start": choice["head"], "best_epoch": best["epoch"],
                     "history": history, "parity": parity})
    metrics = {"val": {"accuracy": best["val_accuracy"], "loss": best["val_loss"]}, "best_epoch": best["epoch"],
               "warm_start_val": {"accuracy": history[0]["val_accuracy"], "loss": history[0]["val_loss"]}}
    write_json(metrics_path, metrics)
    log.info("finetune: best epoch %d, val accuracy %.4f (warm start %.4f), %.1f s", best["epoch"],
             best["val_accuracy"], history[0]["val_accuracy"], seconds)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.finetune", description=__doc__.split("\n\n")[0],
        epilog="Params: finetune.* (epochs, lr, body_lr_ratio, weight_decay, warmup_epochs, batch_size, bn, hflip, "
               "crop_scale, clip_grad_norm, workers, seed, parity_atol, parity_max_flips, device); backbone.*.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("--index", type=Path, default=Path("data/prepared"), help="prepare's output folder")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="extract's features file")
    parser.add_argument("--heads-dir", type=Path, default=Path("models/heads"), help="folder of fitted heads")
    parser.add_argument("--selected", type=Path, default=Path("models/selected.json"), help="select's choice")
    parser.add_argument("--out", type=Path, default=Path("models/finetune"), help="checkpoint folder to write")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/finetune.json"), help="metrics JSON to write")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run(args.params, args.index, args.features, args.heads_dir, args.selected, args.out, args.metrics)
    except ParityError as exc:
        raise SystemExit(f"finetune: {exc}") from None


if __name__ == "__main__":
    run_main(main, "finetune")
