"""MLP head on concat pooling: fastai-style BN-Dropout-Linear-ReLU blocks, trained on cached features.

Inputs are `[avg, max]` (2C). Training is full-feature-in-memory AdamW with early stopping on val loss; the best
epoch's weights are kept. Seeded and deterministic on CPU.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.divergence import TrainingDivergedError, check_finite_loss
from pipeline.infra.config import MlpConfig
from pipeline.infra.runtime import progress_disabled, seed_everything, set_deterministic

log = logging.getLogger("pipeline.mlp")


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


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def fit_mlp(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, cfg: MlpConfig,
            num_classes: int) -> tuple[MlpHead, dict]:
    """Trains the head; returns the best-on-val model (eval mode) and its training history.

    Raises:
        TrainingDivergedError: a train or val loss became NaN/inf, or no epoch did better on val than the untrained
            head (the weights would be initial ones or garbage, reported as a result).
    """
    set_deterministic()
    gen = seed_everything(cfg.seed)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    xv, yv = torch.from_numpy(x_val), torch.from_numpy(y_val).long()
    model = MlpHead(xt.shape[1], num_classes, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hint = _hint(cfg)
    # The untrained head's val loss is the bar: a run whose best epoch does not beat it learned nothing usable.
    untrained_loss, _ = _evaluate(model, xv, yv)
    check_finite_loss(untrained_loss, "heads@mlp val loss of the untrained head", 0, hint)
    best = {"val_loss": float("inf"), "epoch": -1}
    best_state = copy.deepcopy(model.state_dict())
    history = []
    bar = tqdm(range(cfg.epochs), desc="mlp", unit="epoch", disable=progress_disabled())
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples; the remainder joins the next epoch's shuffle
                continue
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            check_finite_loss(loss.item(), "heads@mlp train loss", epoch, hint)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        val_loss, val_acc = _evaluate(model, xv, yv)
        check_finite_loss(val_loss, "heads@mlp val loss", epoch, hint)
        history.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss, "val_accuracy": val_acc})
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "val_accuracy": val_acc, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best["epoch"] >= cfg.patience:
            log.info("mlp: early stop at epoch %d (best epoch %d, val loss %.4f)", epoch, best["epoch"],
                     best["val_loss"])
            break
    if best["epoch"] < 0 or not best["val_loss"] < untrained_loss:
        raise TrainingDivergedError(
            f"heads@mlp never did better on val than its untrained weights (best val loss {best['val_loss']:.4g} at "
            f"epoch {best['epoch']}, untrained {untrained_loss:.4g}): training diverged; {hint}")
    model.load_state_dict(best_state)
    return model.eval(), {"best_epoch": best["epoch"], "epochs_run": len(history), "history": history}


def _hint(cfg: MlpConfig) -> str:
    """What to change when the MLP diverges: the step size first, then the inputs."""
    return (f"lower heads.mlp.lr (now {cfg.lr:g}) or heads.mlp.weight_decay (now {cfg.weight_decay:g}), and check "
            "that the features file holds finite values (rerun extract)")
