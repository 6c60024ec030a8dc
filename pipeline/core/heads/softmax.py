"""Multinomial logistic regression in torch: scikit-learn's L2 objective, solved by L-BFGS, for data of any size.

The objective is scikit-learn's `LogisticRegression(C)` on standardised features, written in its mean form::

    f(W, b) = (1/S) sum_i s_i CE(W z_i + b, y_i) + ||W||^2 / (2 C S),    z = (x - mu) / sigma,  S = sum_i s_i

(s_i = 1, or n / (K n_k) for `class_weight: balanced`; the intercept is not penalised). scikit-learn's binary model is
a single weight vector w; the two-row softmax with the same penalty reaches it at W = [-w/2, w/2] with C halved.

Why this solver beside scikit-learn's: the standardisation is folded into the parameters (logits = x V^T + c with
V = W / sigma, c = b - V mu), so the features are never copied or standardised; the loss and its gradient are
summed over row blocks, so memory is one block of logits whatever N, and the blocks can come from memory or straight
from the HDF5 file; it runs in float32 (scikit-learn's lbfgs converts to float64: a second copy at twice the size),
on the GPU when there is one; and each C of the sweep starts from the previous C's solution (C ascending: the more
regularised problem is the easier one and lies on the way).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import torch

log = logging.getLogger("pipeline.logreg")

Blocks = Callable[[], Iterable[tuple[int, np.ndarray]]]


def standardizer(blocks: Blocks, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation per feature (StandardScaler's), in float64, over the blocks.

    Blocks are merged with Chan's parallel update, so no float32 sum of millions of rows loses digits; a feature of
    zero variance gets scale 1, as in StandardScaler.
    """
    n, mean, m2 = 0, np.zeros(d), np.zeros(d)
    for _, block in blocks():
        for s in range(0, len(block), 2048):  # float64 temporaries of 2,048 rows, not of a whole block
            b = block[s:s + 2048].astype(np.float64)
            nb, mb = len(b), b.mean(0)
            b -= mb
            m2b = np.einsum("ij,ij->j", b, b)
            delta = mb - mean
            mean = mean + delta * nb / (n + nb)
            m2 = m2 + m2b + delta ** 2 * n * nb / (n + nb)
            n += nb
    scale = np.sqrt(m2 / n)
    scale[scale == 0] = 1.0
    return mean, scale


# On the CPU the two products with the features go through numpy (OpenBLAS), not torch (MKL): under the portable
# numerics pin (pipeline/infra/numerics.py) MKL runs its COMPATIBLE (SSE2) branch and OpenBLAS its Haswell (AVX2)
# kernels; measured on the 2-core EPYC, 16,384 x 1280 @ 1280 x 100 in float32: 24 GFLOP/s in torch, 66 in numpy.
_CPU_MATMUL = "numpy"


class _Objective:
    """f(W, b) and its gradient, summed block by block (no autograd graph: the gradient is closed-form)."""

    def __init__(self, blocks: Blocks, labels: np.ndarray, row_weight: np.ndarray, mean: np.ndarray,
                 scale: np.ndarray, device: torch.device):
        self.blocks, self.device = blocks, device
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.row_weight = torch.from_numpy(row_weight.astype(np.float32))
        self.total_weight = float(row_weight.astype(np.float64).sum())
        self.mean = torch.from_numpy(mean.astype(np.float32)).to(device)
        self.inv_scale = torch.from_numpy((1.0 / scale).astype(np.float32)).to(device)
        self.cache: list[torch.Tensor] | None = None

    def keep_on_device(self) -> None:
        """Copies the blocks to the device once (a GPU with room for them): no transfer per evaluation."""
        self.cache = [torch.from_numpy(np.ascontiguousarray(b)).to(self.device) for _, b in self.blocks()]

    def _device_blocks(self) -> Iterable[tuple[int, torch.Tensor]]:
        if self.cache is not None:
            start = 0
            for block in self.cache:
                yield start, block
                start += len(block)
            return
        for start, block in self.blocks():
            yield start, torch.from_numpy(block).to(self.device, non_blocking=True)

    def _logits(self, x: torch.Tensor, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":  # see _CPU_MATMUL
            return torch.from_numpy(x.numpy() @ v.numpy().T).add_(c)
        return torch.addmm(c, x, v.t())

    def _add_grad(self, grad_v: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> None:
        if self.device.type == "cpu":  # x^T p, transposed: the layout OpenBLAS runs at full speed
            grad_v += torch.from_numpy((x.numpy().T @ p.numpy()).T)
        else:
            grad_v.addmm_(p.t(), x)

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, b: torch.Tensor, c_reg: float) -> float:
        """Sets w.grad and b.grad; returns f."""
        v = w * self.inv_scale
        c = b - v @ self.mean
        grad_v, grad_c = torch.zeros_like(w), torch.zeros_like(b)
        total = 0.0
        for start, x in self._device_blocks():
            y = self.labels[start:start + len(x)].to(self.device)
            s = self.row_weight[start:start + len(x)].to(self.device) / self.total_weight
            logits = self._logits(x, v, c)
            lse = torch.logsumexp(logits, 1)
            total += float(((lse - logits.gather(1, y[:, None]).squeeze(1)) * s).sum(dtype=torch.float64))
            p = logits.sub_(lse[:, None]).exp_()  # softmax in place of the logits
            p[torch.arange(len(y), device=self.device), y] -= 1.0
            p.mul_(s[:, None])
            self._add_grad(grad_v, p, x)
            grad_c += p.sum(0)
        reg = 1.0 / (c_reg * self.total_weight)
        # chain rule through V = W / sigma and c = b - V mu
        w.grad = (grad_v - grad_c[:, None] * self.mean[None, :]) * self.inv_scale + reg * w
        b.grad = grad_c
        return total + 0.5 * reg * float((w.double() ** 2).sum())


def fit_softmax_path(blocks: Blocks, labels: np.ndarray, num_classes: int, d: int, cs: list[float], *,
                     class_weight: np.ndarray | None, tol: float, max_iter: int, device: torch.device,
                     on_device: bool = False) -> tuple[dict[float, tuple[np.ndarray, np.ndarray, int]], np.ndarray,
                                                        np.ndarray]:
    """Solves the objective for every C, warm-starting each from the previous (C ascending).

    Args:
        blocks: a callable giving (first row, float32 block) over the training inputs, the same order every time.
        labels: int labels of all training rows.
        class_weight: per-class weights (balanced), or None for 1.
        tol: stop when the largest gradient component is below it (scikit-learn's lbfgs `tol`, same objective
            scale); a warm-started C must also reduce it 10x from where it starts (:data:`WARM_START_REDUCTION`).
        max_iter: L-BFGS iterations per C.
        on_device: copy the blocks to `device` once (they fit there).

    Returns:
        ({C: (coef K x D, intercept K, iterations)} in standardised space, mean, scale).
    """
    mean, scale = standardizer(blocks, d)
    row_weight = np.ones(len(labels)) if class_weight is None else class_weight[labels]
    objective = _Objective(blocks, labels, row_weight, mean, scale, device)
    if on_device:
        objective.keep_on_device()
    w = torch.zeros(num_classes, d, device=device)
    b = torch.zeros(num_classes, device=device)
    # scikit-learn's binary model is one vector; the symmetric two-row softmax matches it at half the C
    c_factor = 0.5 if num_classes == 2 else 1.0
    first = min(cs) * c_factor
    warm = False  # (w, b) = 0: the first solve is a cold start
    if len(labels) >= SUBSAMPLE_EVERY * SUBSAMPLE_MIN_ROWS:
        # Start the first (hardest, from-zero) solve on every 8th row, C scaled so that the penalty per row is the
        # same: its solution is close to the full one at an eighth of the cost per evaluation.
        sub = _subsample(blocks, labels, row_weight, mean, scale, device)
        iterations, evaluations = _lbfgs(sub, w, b, first * objective.total_weight / sub.total_weight, tol, max_iter)
        warm = True
        log.info("logreg (torch): warm start on %d rows (C=%g) in %d iterations", len(sub.labels), min(cs),
                 iterations)
    out = {}
    for c in sorted(cs):
        iterations, evaluations = _lbfgs(objective, w, b, c * c_factor, tol, max_iter, warm=warm)
        warm = True
        if iterations >= max_iter:
            log.warning("logreg (torch): C=%g stopped at max_iter=%d before the gradient reached tol=%g", c,
                        max_iter, tol)
        log.info("logreg (torch): C=%g solved in %d iterations (%d evaluations over the data)", c, iterations,
                 evaluations)
        out[c] = (w.detach().cpu().double().numpy().copy(), b.detach().cpu().double().numpy().copy(), iterations)
    return out, mean, scale


SUBSAMPLE_EVERY = 8  # the warm start's subsample: every 8th row ...
SUBSAMPLE_MIN_ROWS = 16_384  # ... when that gives at least this many rows


def _subsample(blocks: Blocks, labels: np.ndarray, row_weight: np.ndarray, mean: np.ndarray, scale: np.ndarray,
               device: torch.device) -> _Objective:
    """The objective on every SUBSAMPLE_EVERY-th row (rows strided, so a file sorted by class keeps every class)."""
    parts, rows = [], []
    for start, block in blocks():
        first = (-start) % SUBSAMPLE_EVERY
        parts.append(block[first::SUBSAMPLE_EVERY].copy())
        rows.append(np.arange(start + first, start + len(block), SUBSAMPLE_EVERY))
    x, idx = np.concatenate(parts), np.concatenate(rows)
    del parts
    return _Objective(lambda: iter([(0, x)]), labels[idx], row_weight[idx], mean, scale, device)


# A warm-started solve must also bring the largest gradient component down to this fraction of its value at the start.
# Why: the absolute `tol` alone fails warm starts at scale. Moving C changes the gradient only by the change of the
# penalty's, (1/C_old - 1/C_new) W / S, which at ~100,000 rows is ~1e-5: below tol = 1e-4 already at the previous
# C's solution, so L-BFGS stopped after 0 iterations and returned the previous C's model (bench/results/heads_cpu.md).
# A cold start is unaffected: from zero the gradient is orders of magnitude above tol, so min(tol, 0.1 g0) = tol.
WARM_START_REDUCTION = 0.1


def _lbfgs(objective: _Objective, w: torch.Tensor, b: torch.Tensor, c_reg: float, tol: float,
           max_iter: int, *, warm: bool = False) -> tuple[int, int]:
    """Minimises the objective at `c_reg` from the current (w, b), in place; returns (iterations, evaluations).

    Stops when the largest gradient component is at most `tol` (scikit-learn's lbfgs criterion) and, for a warm
    start (`warm`: (w, b) is another problem's solution), also at most :data:`WARM_START_REDUCTION` times its value
    at the start. When that is below what float32 sums resolve, L-BFGS's own stalls end the solve (loss or step
    change under 1e-12; measured: a tol of 1e-9 on 8,000 rows stops after the same 182 iterations as 1e-6).
    """
    evaluations = 0
    first: float | None = None
    if warm:
        # evaluated once here to set the stop; the closure's first call returns it instead of recomputing
        first = objective(w, b, c_reg)
        evaluations = 1
        start_grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
        tol = min(tol, WARM_START_REDUCTION * start_grad)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=tol,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        nonlocal evaluations, first
        if first is not None:  # (w, b) unchanged since the evaluation above; w.grad, b.grad still hold its gradient
            value, first = first, None
            return torch.tensor(value, dtype=torch.float64)
        evaluations += 1
        return torch.tensor(objective(w, b, c_reg), dtype=torch.float64)

    opt.step(closure)
    return int(opt.state[opt._params[0]].get("n_iter", 0)), evaluations
