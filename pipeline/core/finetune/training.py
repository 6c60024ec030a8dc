"""The fine-tune's training: loaders, the warm-started network and its parity check, the epoch loop with weight
averaging and the choice of the kept epoch, and the stage's whole run (`run_finetune`, what pipeline/finetune.py
calls; the parameters and their meaning are in its docstring and README "Fine-tuning").

The same code runs in one process and under torchrun: rank and world size come from the environment
(pipeline/infra/distributed.py); every rank trains, rank 0 alone logs to DVCLive and writes the model and metrics.
One training step is :func:`train_step`, which tests/finetune_step.py records byte for byte.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from pipeline.core.data.images import ImageDataset, eval_transform, train_transform
from pipeline.core.data.index import image_limits, read_image_sizes, read_index
from pipeline.core.data.preprocess import Preprocess
from pipeline.core.features.cache import read_split
from pipeline.core.features.staleness import verify_features
from pipeline.core.finetune.averaging import WeightAverage, make_average
from pipeline.core.finetune.network import TransferNet, predict_logits, save_finetuned, warm_started
from pipeline.core.finetune.optim import apply_bn_mode, make_optimizer, make_scheduler, set_trainable
from pipeline.core.finetune.portable_conv import training_convolutions
from pipeline.core.heads.divergence import check_finite_loss
from pipeline.core.heads.fitting import build_head, check_head_features, head_logits, load_head
from pipeline.core.heads.intervals import wilson_interval
from pipeline.core.heads.metrics import split_metrics
from pipeline.core.heads.selection import warm_start_head
from pipeline.core.models.preprocessing import resolve_image_size
from pipeline.infra import runlog
from pipeline.infra.artifacts import read_json, write_json
from pipeline.infra.config import BackboneConfig, ExtractConfig, FinetuneConfig, to_dict
from pipeline.infra.distributed import all_reduce_sum, process_group
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import (
    DistInfo,
    dist_info,
    progress_disabled,
    resolve_device,
    retained_heap,
    seed_everything,
    set_deterministic,
)

log = logging.getLogger(__name__)


class ParityError(PipelineError, RuntimeError):
    """The warm-started network does not reproduce the head it was built from."""


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


def _live(live_dir: Path | None, is_main: bool):
    """DVCLive logger on rank 0 (None elsewhere): no timestamps and no dvc.yaml edits, so runs stay reproducible."""
    if live_dir is None or not is_main:
        return None
    from dvclive import Live

    return Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)


def _better(accuracy: float, loss: float, best: dict, select: str) -> bool:
    """Whether an epoch replaces the one kept so far: by val accuracy (ties: lower loss), by val loss alone, or
    always (`last`: the warm start is weighed against the final epoch once training ends, see `finetune`)."""
    if select == "last":
        return True
    if select == "loss":
        return loss < best["val_loss"]
    return (accuracy, -loss) > (best["val_accuracy"], -best["val_loss"])


def unused_parameters(net: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of trainable parameters that get no gradient from a forward pass of `x` (eval mode: no dropout or
    BatchNorm statistics, no random numbers drawn), so the result leaves the training run as it was."""
    was_training = net.training
    net.eval()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(net(x).float().sum(), list(trainable.values()), allow_unused=True)
    net.train(was_training)
    return [n for n, g in zip(trainable, grads) if g is None]


def train_step(model: nn.Module, net: TransferNet, images: torch.Tensor, labels: torch.Tensor,
               opt: torch.optim.Optimizer, sched, cfg: FinetuneConfig,
               kernels: contextlib.AbstractContextManager) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: forward (under `kernels`, see :func:`training_convolutions`, and bf16 autocast when
    asked), cross-entropy, backward, gradient clipping, AdamW and the schedule. Returns (loss, logits); the gradients
    stay on the parameters until the next step.

    The whole of what a fine-tune computes per batch, so tests/finetune/test_finetune_bytes.py can check its bytes against a
    committed record.
    """
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with autocast, kernels:
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad_norm > 0:
        nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], cfg.clip_grad_norm)
    opt.step()
    sched.step()
    return loss, logits


def train_epoch(model: nn.Module, net: TransferNet, loader: DataLoader, opt: torch.optim.Optimizer, sched,
                cfg: FinetuneConfig, device: torch.device, epoch: int,
                averages: Sequence[WeightAverage] = (),
                kernels: contextlib.AbstractContextManager | None = None) -> tuple[float, float, float]:
    """One epoch of fine-tuning steps, with what trains in this epoch per `cfg`; every average in `averages` is
    updated after each optimizer step. `model` runs the forward pass (`net`, or `net` inside DDP); `kernels` is the
    context of each forward pass (None: :func:`training_convolutions`' choice; bench/finetune_kernels.py passes
    `contextlib.nullcontext()` to time PyTorch's own kernels).

    Returns this process's summed train loss, correct predictions and images seen.
    """
    loader.dataset.set_epoch(epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    set_trainable(net, cfg, epoch)
    model.train()
    apply_bn_mode(net.body, cfg.bn)
    kernels = training_convolutions(device, cfg.precision) if kernels is None else kernels
    total, correct, seen = 0.0, 0.0, 0.0
    for images, labels, _ in tqdm(loader, desc=f"finetune {epoch}/{cfg.epochs}", unit="batch",
                                  disable=progress_disabled()):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        loss, logits = train_step(model, net, images, labels, opt, sched, cfg, kernels)
        for average in averages:
            average.update(net)
        total += loss.item() * len(labels)
        correct += float((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return total, correct, seen


def finetune(net: TransferNet, train_loader: DataLoader, val_loader: DataLoader, val_labels: np.ndarray,
             start_logits: np.ndarray, cfg: FinetuneConfig, device: torch.device, live=None,
             ddp: bool = False, kernels: contextlib.AbstractContextManager | None = None,
             start_in_sample: bool = False) -> tuple[dict, list[dict], dict]:
    """Trains `net` in place; returns the best state dict (CPU), the per-epoch history and the best epoch's record.
    `kernels`: see :func:`train_epoch`. `start_in_sample`: the warm start has trained on val (a head refitted on
    train + val, `heads.logreg.refit`): its val scores are recorded as epoch 0 but are no yardstick, too good by an
    unknown amount, so with epochs to train the kept epoch is one of those trained (whatever `select`).

    Raises:
        TrainingDivergedError: the warm start's val loss, an epoch's train loss (summed over every rank, so all
            ranks stop together) or its val loss is NaN/inf.
    """
    hint = (f"lower finetune.lr (now {cfg.lr:g}) or finetune.body_lr_ratio (now {cfg.body_lr_ratio:g}), keep "
            f"finetune.clip_grad_norm > 0 (now {cfg.clip_grad_norm:g}), try finetune.precision: fp32 (now "
            f"{cfg.precision}), and check the selected head and the features it was fitted on")
    set_trainable(net, cfg, cfg.freeze_epochs + 1)  # DDP must see every parameter that trains in any phase
    opt = make_optimizer(net, cfg)
    sched = make_scheduler(opt, cfg, len(train_loader))
    model: nn.Module = net
    if ddp:
        # Parameters the chosen pooling never reaches (a ViT's final norm under `avg`, SigLIP's attention pool,
        # DINOv2's mask token) would make DDP wait for their gradients forever: it must be told to look for them.
        unused = cfg.freeze_epochs > 0 or bool(unused_parameters(net, train_loader.dataset[0][0][None].to(device)))
        model = DistributedDataParallel(net, find_unused_parameters=unused)
    # With averaging on, what is validated, selected and saved is the average, not the last step's weights.
    average = make_average(net, cfg, cfg.epochs * len(train_loader))
    scored = average.module if average is not None else net
    start = split_metrics(start_logits, val_labels)
    check_finite_loss(start["loss"], "finetune val loss of the warm start", 0, hint)
    start_competes = not start_in_sample or cfg.epochs == 0
    if not start_competes:
        log.info("finetune: the warm start was refitted on train + val, so its val scores (accuracy %.4f) are "
                 "in-sample: it is not weighed against the trained epochs", start["accuracy"])
    best = ({"epoch": 0, "val_accuracy": start["accuracy"], "val_loss": start["loss"]} if start_competes
            else {"epoch": 0, "val_accuracy": -math.inf, "val_loss": math.inf})  # any trained epoch replaces it
    best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    start_kept = (best, best_state)
    history = [{"epoch": 0, "train_loss": None, "train_accuracy": None, "val_accuracy": start["accuracy"],
                "val_loss": start["loss"]}]
    if live is not None:
        live.log_metric("val/accuracy", start["accuracy"])
        live.log_metric("val/loss", start["loss"])
        live.next_step()
    for epoch in range(1, cfg.epochs + 1):
        sums = train_epoch(model, net, train_loader, opt, sched, cfg, device, epoch, [average] if average else [],
                           kernels)
        total, correct, seen = all_reduce_sum(list(sums), device)
        check_finite_loss(total / max(seen, 1.0), "finetune train loss", epoch, hint)
        val = split_metrics(predict_logits(scored, val_loader, device, "val"), val_labels)
        check_finite_loss(val["loss"], "finetune val loss", epoch, hint)
        record = {"epoch": epoch, "train_loss": total / seen, "train_accuracy": correct / seen,
                  "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
        history.append(record)
        if live is not None:
            for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
                live.log_metric(key.replace("_", "/", 1), record[key])
            live.next_step()
        log.info("finetune: epoch %d/%d train loss %.4f acc %.4f, val loss %.4f acc %.4f", epoch, cfg.epochs,
                 record["train_loss"], record["train_accuracy"], val["loss"], val["accuracy"])
        if _better(val["accuracy"], val["loss"], best, cfg.select):
            best = {"epoch": epoch, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
            best_state = {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()}
        elif cfg.patience and epoch - best["epoch"] >= cfg.patience:
            log.info("finetune: early stop after epoch %d (best epoch %d)", epoch, best["epoch"])
            break
    # `last` keeps the final epoch, but never a network worse on val than the head it started from.
    if cfg.select == "last" and start_competes and best["epoch"] > 0 and _better(start["accuracy"], start["loss"], best, "accuracy"):
        log.info("finetune: the warm start scores better on val than epoch %d (accuracy %.4f vs %.4f): keeping it",
                 best["epoch"], start["accuracy"], best["val_accuracy"])
        best, best_state = start_kept
    return best_state, history, best


@dataclass(frozen=True)
class Loaders:
    """The fine-tune's data: shuffled (or per-rank) train batches, val in index order, and the val labels."""

    train: DataLoader
    val: DataLoader
    val_labels: np.ndarray


def make_loaders(index_dir: Path, pre: Preprocess, cfg: FinetuneConfig, rank: DistInfo, device: torch.device,
                 gen: torch.Generator) -> Loaders:
    """Train loader (augmented; DistributedSampler under torchrun) and val loader (eval transform) from the index."""
    rows, meta = read_index(index_dir)
    root = Path(meta["source"])
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    loader_args = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    limits = image_limits(meta)
    val_loader = DataLoader(ImageDataset(root, val_rows, eval_transform(pre), limits=limits), shuffle=False,
                            **loader_args)
    augmented = train_transform(pre, cfg.augment, cfg.crop_scale, cfg.hflip)
    train_set = ImageDataset(root, train_rows, augmented, seed=cfg.seed, limits=limits)
    drop_last = len(train_rows) > cfg.batch_size * rank.world_size
    sampler = (DistributedSampler(train_set, rank.world_size, rank.rank, shuffle=True, seed=cfg.seed,
                                  drop_last=drop_last) if rank.world_size > 1 else None)
    train_loader = DataLoader(train_set, shuffle=sampler is None, sampler=sampler, drop_last=drop_last,
                              generator=gen, **loader_args)
    return Loaders(train_loader, val_loader, np.array([int(r["label"]) for r in val_rows]))


def _start_network(backbone: BackboneConfig, cfg: FinetuneConfig, heads_dir: Path, choice: dict, attrs: dict,
                   features: Path) -> tuple[TransferNet, Preprocess, nn.Module, dict]:
    """Backbone + the selected warm-start head (or, with `warm_start: false`, a random head of the same shape)."""
    name = warm_start_head(choice)
    head, spec = load_head(heads_dir / name)
    check_head_features(heads_dir / name, spec, attrs, features)
    net, pre = warm_started(backbone, head, spec)
    if not cfg.warm_start:  # the LP-FT comparison: same budget and seed, randomly initialised head
        torch.manual_seed(cfg.seed)
        net.head = build_head(spec)
    return net, pre, head, spec


def _warm_start_parity(net: nn.Module, loaders: Loaders, device: torch.device, reference: np.ndarray | None,
                       cfg: FinetuneConfig, head: str) -> tuple[np.ndarray, dict | None]:
    """The network's val logits before any step, and (warm start) the check that they are the head's own."""
    start_logits = predict_logits(net, loaders.val, device, "parity")
    if not cfg.warm_start:
        return start_logits, None
    parity = check_parity(start_logits, reference, cfg.parity_atol, cfg.parity_max_flips)
    log.info("finetune: warm start reproduces %s on val (max |logit diff| %.2e, %.2f%% argmax flips)", head,
             parity["max_abs_logit_diff"], 100 * parity["argmax_flip_fraction"])
    return start_logits, parity


def _stage_metrics(best: dict, history: list[dict], cfg: FinetuneConfig, n_val: int) -> dict:
    """metrics/finetune.json: the kept epoch's val scores (accuracy with its Wilson 95 % interval over the `n_val`
    val images), which epoch that is, and where it started."""
    def scores(accuracy: float, loss: float) -> dict:
        # accuracy is a count of images over n_val: round() undoes the division's last bit
        return {"accuracy": accuracy, "accuracy_ci95": wilson_interval(round(accuracy * n_val), n_val), "loss": loss}

    return {"val": scores(best["val_accuracy"], best["val_loss"]), "best_epoch": best["epoch"],
            "start_val": scores(history[0]["val_accuracy"], history[0]["val_loss"]),
            "warm_start": cfg.warm_start}


def run_finetune(cfg: FinetuneConfig, backbone: BackboneConfig, extract: ExtractConfig, index_dir: Path,
                 features: Path, heads_dir: Path, selected: Path, out: Path, metrics_path: Path,
                 live_dir: Path | None = None, kernels: contextlib.AbstractContextManager | None = None) -> dict:
    """The fine-tune stage's work: warm start, parity check, training, saved model and metrics; returns the metrics.
    `kernels`: see :func:`train_epoch` (None: the stage's own choice).

    Under torchrun every rank calls this; rank 0 alone logs to DVCLive and writes the model and metrics.
    """
    # The size extraction used (auto: from the index's train image sizes), so the network sees the images the
    # features were computed from, and model.json records a number, not the rule.
    backbone, size_reason = resolve_image_size(backbone, read_image_sizes(index_dir))
    if dist_info().is_main:
        log.info("finetune: image size %d px (%s)", backbone.image_size, size_reason)
    # Refuse stale inputs before any work: features made with other params or another index, or a head fitted on
    # other features, would train (and be compared in the parity check) against the wrong thing.
    attrs = verify_features(features, backbone, extract, index_dir)
    set_deterministic()
    device = resolve_device(cfg.device)
    with process_group(device) as (rank, barrier):
        runlog.note(device=str(device), world_size=rank.world_size, precision=cfg.precision)  # verify's provenance
        gen = seed_everything(cfg.seed)
        choice = read_json(selected)
        net, pre, head, spec = _start_network(backbone, cfg, heads_dir, choice, attrs, features)
        # The head's own val logits from the cached features, computed before the network (and the head inside it)
        # moves to the device: the parity check's reference.
        reference = head_logits(head, spec, read_split(features, "val")) if cfg.warm_start else None
        if cfg.sync_bn and rank.world_size > 1 and device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = net.to(device, memory_format=torch.channels_last)
        loaders = make_loaders(index_dir, pre, cfg, rank, device, gen)
        t0 = time.perf_counter()
        start_logits, parity = _warm_start_parity(net, loaders, device, reference, cfg, spec.head)
        live = _live(live_dir, rank.is_main)
        with retained_heap(enabled=device.type == "cpu"):  # 2x on CPU: no page faults for activations
            best_state, history, best = finetune(net, loaders.train, loaders.val, loaders.val_labels, start_logits,
                                                 cfg, device, live, ddp=rank.world_size > 1, kernels=kernels,
                                                 start_in_sample=cfg.warm_start and bool(spec.fit.get("refit")))
        if live is not None:
            live.end()
        metrics = _stage_metrics(best, history, cfg, len(loaders.val_labels))
        if rank.is_main:
            net.load_state_dict(best_state)
            save_finetuned(out, net.cpu(), backbone, spec, pre,
                           {"finetune": to_dict(cfg), "warm_start": spec.head if cfg.warm_start else None,
                            "best_epoch": best["epoch"], "history": history, "parity": parity,
                            "world_size": rank.world_size})
            write_json(metrics_path, metrics)
            log.info("finetune: kept epoch %d, val accuracy %.4f (start %.4f), %.1f s", best["epoch"],
                     best["val_accuracy"], history[0]["val_accuracy"], time.perf_counter() - t0)
        barrier()  # the other ranks wait for rank 0's files before the group goes away
    return metrics
