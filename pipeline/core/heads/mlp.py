"""MLP head on concat pooling: fastai-style BN-Dropout-Linear-ReLU blocks, trained on cached features.

Inputs are `[avg, max]` (2C). AdamW with early stopping on val loss; the best epoch's weights are kept. Seeded and
deterministic on CPU. On the GPU when present (`heads.mlp.device`); features in memory are shuffled row by row,
features left on disk (over `heads.mlp.in_memory_gb`) are read in blocks of :data:`STREAM_BLOCK_ROWS` rows, the
blocks in a shuffled order and the rows shuffled within each block, so memory stays one block whatever N.

On the CPU the training loop runs on one thread (:func:`pipeline.infra.runtime.single_threaded`) and the Linear
layers' products go through numpy's OpenBLAS (:class:`_BlasLinear`): the steps are small (64 x 2560 at the
defaults), where thread synchronisation and MKL's portable SSE2 branch cost most of the time (measured on the digits,
2-core shared EPYC, 16 epochs: 51-85 s before, ~4.5 s after). The model, the batches and the optimiser are the same;
the last bits differ from a two-thread MKL run, and reruns give the same bytes.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.features.cache import StreamedInputs, input_blocks
from pipeline.core.heads.divergence import TrainingDivergedError, TrainingOverfitError, check_finite_loss
from pipeline.core.heads.logreg import balanced_class_weight
from pipeline.infra.config import MlpConfig
from pipeline.infra.runtime import (
    progress_disabled,
    resolve_device,
    seed_everything,
    set_deterministic,
    single_threaded,
)

log = logging.getLogger(__name__)

# Rows per block read from HDF5 when streaming: 16 chunks of 256 rows, 42 MB of catavgmax float32 at 1280 channels.
STREAM_BLOCK_ROWS = 4096


class MlpHead(nn.Sequential):
    """[BN -> Dropout -> Linear -> ReLU] per hidden size, then BN -> Dropout -> Linear to the classes.

    fastai's `create_head` layout: every dropout but the last runs at half the rate, the last (before the classifier)
    at the full rate; with no hidden layer the single dropout is the last one.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: list[int], dropout: float):
        layers: list[nn.Module] = []
        sizes = [in_features, *hidden]
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.BatchNorm1d(n_in), nn.Dropout(dropout / 2), nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers += [nn.BatchNorm1d(sizes[-1]), nn.Dropout(dropout), nn.Linear(sizes[-1], num_classes)]
        super().__init__(*layers)


class _BlasLinear(torch.autograd.Function):
    """`F.linear` whose three products (forward, input and weight gradients) run in numpy's OpenBLAS, CPU only.

    Why: under the portable numerics pin (pipeline/infra/numerics.py) torch's MKL runs its COMPATIBLE (SSE2) branch,
    and OpenBLAS its Haswell (AVX2 + FMA) kernels, also pinned, so the same on every x86-64 CPU; the MLP's training
    time is mostly these products (measured, one thread: 16 epochs 7.0 s through MKL, 4.5 s through OpenBLAS).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return torch.from_numpy(x.detach().numpy() @ weight.detach().numpy().T).add_(bias.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        g = grad.numpy()
        grad_x = torch.from_numpy(g @ weight.detach().numpy()) if ctx.needs_input_grad[0] else None
        return grad_x, torch.from_numpy(g.T @ x.detach().numpy()), grad.sum(0)


def _train_forward(model: nn.Sequential, x: torch.Tensor, blas: bool) -> torch.Tensor:
    """The model's forward, its Linear layers through :class:`_BlasLinear` when `blas` (CPU)."""
    if not blas:
        return model(x)
    for layer in model:
        x = _BlasLinear.apply(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(x)
    return x


@torch.no_grad()
def _evaluate(model: nn.Module, x: np.ndarray | StreamedInputs, y: np.ndarray, device: torch.device,
              weight: torch.Tensor | None) -> tuple[float, float]:
    """(val loss, val accuracy) block by block; the loss is weighted like training's (class_weight)."""
    model.eval()
    loss_sum, weight_sum, correct = 0.0, 0.0, 0
    for start, block in input_blocks(x):
        yb = torch.from_numpy(y[start:start + len(block)]).long().to(device)
        logits = model(torch.from_numpy(block).to(device))
        w = torch.ones_like(yb, dtype=logits.dtype) if weight is None else weight[yb]
        loss_sum += float((F.cross_entropy(logits, yb, reduction="none") * w).sum(dtype=torch.float64))
        weight_sum += float(w.sum(dtype=torch.float64))
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum / weight_sum, correct / len(y)


def _batches(x: np.ndarray | StreamedInputs | torch.Tensor, y: torch.Tensor, batch_size: int,
             gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled (inputs, labels) mini-batches on the CPU.

    In memory: one permutation of all rows (the order the head has always been trained in). Streamed: the blocks
    in a random order, the rows of each block permuted; a batch never spans two blocks, so a block's remainder under
    two rows is skipped (BatchNorm needs two) and rejoins the shuffle next epoch.
    """
    if not isinstance(x, StreamedInputs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            yield x[idx], y[idx]
        return
    starts = torch.randperm((len(x) + STREAM_BLOCK_ROWS - 1) // STREAM_BLOCK_ROWS, generator=gen) * STREAM_BLOCK_ROWS
    for start, block in input_blocks(x, STREAM_BLOCK_ROWS, starts.tolist()):
        xb, yb = torch.from_numpy(block), y[start:start + len(block)]
        perm = torch.randperm(len(block), generator=gen)
        for s in range(0, len(block), batch_size):
            idx = perm[s:s + batch_size]
            yield xb[idx], yb[idx]


class FusedAdamW:
    """`torch.optim.AdamW(params, lr, weight_decay, fused=True)` on the CPU: the same kernel (`torch._fused_adamw_`),
    the same state and order of operations, so the same bytes (tests/heads/test_heads.py checks it step by step).

    Why not the class itself: torch.optim's optimizers import torch._dynamo on first use (~1.2 s here), a tenth of
    the head-swap loop (`dvc repro select` after a heads.mlp change) for a 200 k-parameter head.
    """

    def __init__(self, params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]  # as torch.optim: no grad, no step
        if not live:
            return
        steps = [self.steps[i] for i in live]
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_([self.params[i] for i in live], [self.params[i].grad for i in live],
                            [self.exp_avgs[i] for i in live], [self.exp_avg_sqs[i] for i in live], [], steps,
                            amsgrad=False, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
                            weight_decay=self.weight_decay, eps=self.eps, maximize=False, grad_scale=None,
                            found_inf=None)


def fit_mlp(x_train: np.ndarray | StreamedInputs, y_train: np.ndarray, x_val: np.ndarray | StreamedInputs,
            y_val: np.ndarray, cfg: MlpConfig, num_classes: int) -> tuple[MlpHead, dict]:
    """Trains the head; returns the best-on-val model (eval mode, on the CPU) and its training history.

    Raises:
        TrainingDivergedError: a train or val loss became NaN/inf, or no epoch did better on val than the untrained
            head while the train loss did not go down either (the weights would be initial ones or garbage).
        TrainingOverfitError: no epoch did better on val than the untrained head, but the train loss went down.
    """
    set_deterministic()
    gen = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    with single_threaded(device.type == "cpu"):  # see the module docstring
        return _train(x_train, y_train, x_val, y_val, cfg, num_classes, device, gen)


def _train(x_train: np.ndarray | StreamedInputs, y_train: np.ndarray, x_val: np.ndarray | StreamedInputs,
           y_val: np.ndarray, cfg: MlpConfig, num_classes: int, device: torch.device,
           gen: torch.Generator) -> tuple[MlpHead, dict]:
    """fit_mlp's training loop, on `device`, shuffling with `gen`."""
    blas = device.type == "cpu"
    xt = x_train if isinstance(x_train, StreamedInputs) else torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train).long()
    model = MlpHead(x_train.shape[1], num_classes, cfg.hidden, cfg.dropout).to(device)
    opt = (FusedAdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay) if blas
           else torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))
    weight = None
    if cfg.class_weight == "balanced":
        weight = torch.from_numpy(balanced_class_weight(y_train, num_classes)).float().to(device)
    hint = _hint(cfg)
    # The untrained head's val loss is the bar: a run whose best epoch does not beat it learned nothing usable.
    untrained_loss, _ = _evaluate(model, x_val, y_val, device, weight)
    check_finite_loss(untrained_loss, "heads@mlp val loss of the untrained head", 0, hint)
    # ... and its train loss, to tell overfitting (train loss down, val never better) from divergence (neither down)
    untrained_train_loss, _ = _evaluate(model, x_train, y_train, device, weight)
    best = {"val_loss": float("inf"), "epoch": -1}
    best_state = copy.deepcopy(model.state_dict())
    history = []
    bar = tqdm(range(cfg.epochs), desc="mlp", unit="epoch", disable=progress_disabled())
    for epoch in bar:
        model.train()
        total = 0.0
        for xb, yb in _batches(xt, yt, cfg.batch_size, gen):
            if len(yb) < 2:  # BatchNorm needs two samples; the remainder joins the next epoch's shuffle
                continue
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(_train_forward(model, xb, blas), yb, weight=weight)
            check_finite_loss(loss.item(), "heads@mlp train loss", epoch, hint)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
        val_loss, val_acc = _evaluate(model, x_val, y_val, device, weight)
        check_finite_loss(val_loss, "heads@mlp val loss", epoch, hint)
        history.append({"epoch": epoch, "train_loss": total / len(yt), "val_loss": val_loss, "val_accuracy": val_acc})
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_accuracy": val_acc, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best["epoch"] >= cfg.patience:
            log.info("mlp: early stop at epoch %d (best epoch %d, val loss %.4f)", epoch, best["epoch"],
                     best["val_loss"])
            break
    if best["epoch"] < 0 or not best["val_loss"] < untrained_loss:
        raise _no_better_than_untrained(best, untrained_loss, untrained_train_loss, history, cfg)
    model.load_state_dict(best_state)
    return model.cpu().eval(), {"best_epoch": best["epoch"], "epochs_run": len(history), "history": history}


def _no_better_than_untrained(best: dict, untrained_val: float, untrained_train: float, history: list[dict],
                               cfg: MlpConfig) -> TrainingDivergedError:
    """The error when no epoch beat the untrained head on val, worded after what the training loss did.

    The training loss going down (below the untrained head's) means the optimiser works and the head learned the
    training set, but nothing of it carries over to val: overfitting (labels with no signal in the features, such as
    random labels; or far too little data). The training loss not going down means the steps do not descend:
    divergence (a step size too large, broken inputs). Each gets its own words and its own params to look at.
    """
    first, lowest = history[0]["train_loss"], min(h["train_loss"] for h in history)
    where = (f"best val loss {best['val_loss']:.4g} at epoch {best['epoch']}, untrained {untrained_val:.4g}"
             if best["epoch"] >= 0 else f"untrained val loss {untrained_val:.4g}")
    if lowest < untrained_train:
        steps = ("" if best["val_loss"] < 10 * untrained_val else
                 f"; a val loss this far above the untrained head's also comes from steps far too large: lower "
                 f"heads.mlp.lr (now {cfg.lr:g})")
        return TrainingOverfitError(
            f"heads@mlp never did better on val than its untrained weights ({where}) although its train loss went "
            f"down (untrained {untrained_train:.4g}, epoch 0 {first:.4g}, lowest {lowest:.4g}): it overfits the "
            "train set, and what it learns there does not hold on val. Check that the class folders hold what they "
            "say (labels that carry no signal in the features look like this), add images, or regularise: raise "
            f"heads.mlp.dropout (now {cfg.dropout:g}) or heads.mlp.weight_decay (now {cfg.weight_decay:g}), fewer "
            f"heads.mlp.hidden units (now {cfg.hidden}); the logreg head is the simpler baseline{steps}")
    return TrainingDivergedError(
        f"heads@mlp never did better on val than its untrained weights ({where}) and its train loss never went "
        f"below the untrained head's (untrained {untrained_train:.4g}, epoch 0 {first:.4g}, lowest {lowest:.4g}): "
        f"training diverged; {_hint(cfg)}")


def _hint(cfg: MlpConfig) -> str:
    """What to change when the MLP diverges: the step size first, then the inputs."""
    return (f"lower heads.mlp.lr (now {cfg.lr:g}) or heads.mlp.weight_decay (now {cfg.weight_decay:g}), and check "
            "that the features file holds finite values (rerun extract)")
