"""Training that never gets a finite loss stops with one line instead of saving garbage.

A learning rate far too high (or features with NaN/inf) makes the loss overflow to inf or NaN; early stopping on
val would then keep the initial, untrained weights (best epoch -1) or an epoch with a loss of 1e27 and report it as
a result with exit 0. Every training loop checks its losses here and raises :class:`TrainingDivergedError`, which
names the params to look at.
"""
from __future__ import annotations

import math

from pipeline.infra.errors import PipelineError


class TrainingDivergedError(PipelineError, ArithmeticError):
    """The loss became NaN/inf, or no epoch ever reached a usable val loss while the train loss did not go down."""


class TrainingOverfitError(PipelineError, ValueError):
    """The train loss went down but no epoch did better on val than the untrained weights: the model learned the
    train set and nothing that carries over (not a divergence: the step size is not what to change)."""


def check_finite_loss(value: float, what: str, epoch: int, hint: str) -> None:
    """Raises TrainingDivergedError when `value` (a loss) is NaN or infinite.

    Args:
        value: the loss just computed.
        what: where it comes from, e.g. ``heads@mlp train loss``.
        epoch: the epoch it belongs to (for the message).
        hint: the params (and inputs) to look at, e.g. ``lower heads.mlp.lr (now 1e+06)``.
    """
    if not math.isfinite(value):
        raise TrainingDivergedError(f"{what} is {value} at epoch {epoch}: training diverged; {hint}")
