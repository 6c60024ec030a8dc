"""Multinomial logistic regression in torch: scikit-learn's L2 objective, solved by L-BFGS, for data of any size.

The objective is scikit-learn's `LogisticRegression(C)` on standardised features, written in its mean form::

    f(W, b) = (1/S) sum_i s_i CE(W z_i + b, y_i) + ||W||^2 / (2 C S),    z = (x - mu) / sigma,  S = sum_i s_i

(s_i = 1, or n / (K n_k) for `class_weight: balanced`; the intercept is not penalised). scikit-learn's binary model is
a single weight vector w; the two-row softmax with the same penalty reaches it at W = [-w/2, w/2] with C halved.

Why this solver beside scikit-learn's: the standardisation is folded into the parameters (logits = x V^T + c with
V = W / sigma, c = b - V mu), so the features are never copied or standardised; the loss and its gradient are
summed over row blocks, so memory is one block of logits whatever N, and the blocks can come from memory or straight
from the HDF5 file; it runs in float32 (scikit-learn's lbfgs converts to float64: a second copy at twice the size),
on the GPU when there is one; each C of the sweep starts from the previous C's solution (C ascending: the more
regularised problem is the easier one and lies on the way); and L-BFGS runs in whitened coordinates (W = u P, see
`_whitener`), which leave the objective and its minimum as they are and shorten the path to it.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import torch

log = logging.getLogger(__name__)

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
        self.precond: torch.Tensor | None = None  # P: the solver's variable is u, with W = u P (see _whitener)
        self.grad_max = float("inf")  # largest component of the last evaluation's gradient in (W, b)

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
    def __call__(self, u: torch.Tensor, b: torch.Tensor, c_reg: float) -> float:
        """Returns f at (W = u P, b); sets u.grad and b.grad (the gradient in u) and :attr:`grad_max` (in W, b)."""
        w = u if self.precond is None else u @ self.precond
        v = w * self.inv_scale
        c = b - v @ self.mean
        grad_v, grad_c = torch.zeros_like(w), torch.zeros_like(b)
        total = 0.0
        for start, x in self._device_blocks():
            y = self.labels[start:start + len(x)].to(self.device)
            s = self.row_weight[start:start + len(x)].to(self.device) / self.total_weight
            logits = self._logits(x, v, c)
            # softmax in place of the logits, one exp per element (logsumexp and then exp would be two)
            top = logits.amax(1, keepdim=True)
            true_logit = logits.gather(1, y[:, None]).squeeze(1)
            p = logits.sub_(top).exp_()
            norm = p.sum(1, keepdim=True)
            p.div_(norm)
            lse = top.squeeze(1) + norm.squeeze(1).log()
            total += float(((lse - true_logit) * s).sum(dtype=torch.float64))
            p[torch.arange(len(y), device=self.device), y] -= 1.0
            p.mul_(s[:, None])
            self._add_grad(grad_v, p, x)
            grad_c += p.sum(0)
        reg = 1.0 / (c_reg * self.total_weight)
        # chain rule through V = W / sigma and c = b - V mu
        grad_w = (grad_v - grad_c[:, None] * self.mean[None, :]) * self.inv_scale + reg * w
        self.grad_max = max(float(grad_w.abs().max()), float(grad_c.abs().max()))
        u.grad = grad_w if self.precond is None else grad_w @ self.precond  # P is symmetric
        b.grad = grad_c
        return total + 0.5 * reg * float((w.double() ** 2).sum())


class SoftmaxPath:
    """The objective on one training set, solved for C after C; each solution kept, to warm-start later Cs from.

    Building it costs what every C shares (the standardisation's pass over the data, the whitener); :meth:`solve`
    can then be called again for more Cs (logreg's refinement around the best C) without a second sweep.

    Args:
        blocks: a callable giving (first row, float32 block) over the training inputs, the same order every time.
        labels: int labels of all training rows.
        class_weight: per-class weights (balanced), or None for 1.
        tol: stop when the largest gradient component is below it (scikit-learn's lbfgs `tol`, same objective
            scale); a warm-started C must also bring it to 0.3x where the change of C alone puts it
            (:data:`WARM_START_REDUCTION`).
        max_iter: L-BFGS iterations per C.
        on_device: copy the blocks to `device` once (they fit there).
    """

    def __init__(self, blocks: Blocks, labels: np.ndarray, num_classes: int, d: int, *,
                 class_weight: np.ndarray | None, tol: float, max_iter: int, device: torch.device,
                 on_device: bool = False):
        self.blocks, self.labels, self.tol, self.max_iter, self.device = blocks, labels, tol, max_iter, device
        self.mean, self.scale = standardizer(blocks, d)
        self.row_weight = np.ones(len(labels)) if class_weight is None else class_weight[labels]
        self.objective = _Objective(blocks, labels, self.row_weight, self.mean, self.scale, device)
        if on_device:
            self.objective.keep_on_device()
        self.precond = torch.from_numpy(_whitener(blocks, len(labels), self.mean, self.scale).astype(np.float32)
                                        ).to(device)
        self.objective.precond = self.precond
        self.w = torch.zeros(num_classes, d, device=device)  # u, the solver's variable: W = u P
        self.b = torch.zeros(num_classes, device=device)
        # scikit-learn's binary model is one vector; the symmetric two-row softmax matches it at half the C
        self.c_factor = 0.5 if num_classes == 2 else 1.0
        self.solutions: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}  # C -> (u, b)

    def solve(self, cs: list[float], warm_from: float | None = None) -> dict[float, tuple[np.ndarray, np.ndarray,
                                                                                           int]]:
        """Solves for every C of `cs` (ascending), each from the previous one's solution, or, with `warm_from`
        (a C solved before), each from that C's solution.

        Returns:
            {C: (coef K x D, intercept K, iterations)} in standardised space.
        """
        w, b, objective, tol, max_iter = self.w, self.b, self.objective, self.tol, self.max_iter
        # Large data: the first C (the hardest solve, from zero) starts on every 8th row, C scaled so that the
        # penalty per row is the same: its solution is close to the full one at an eighth of the cost per evaluation.
        if not self.solutions and len(self.labels) >= SUBSAMPLE_EVERY * SUBSAMPLE_MIN_ROWS:
            sub = _subsample(self.blocks, self.labels, self.row_weight, self.mean, self.scale, self.device)
            sub.precond = self.precond
            iterations, _ = _lbfgs(sub, w, b, min(cs) * self.c_factor * sub.total_weight / objective.total_weight,
                                   tol, max_iter)
            log.info("logreg (torch): warm start on %d rows (C=%g) in %d iterations", len(sub.labels), min(cs),
                     iterations)
        out: dict[float, tuple[np.ndarray, np.ndarray, int]] = {}
        warm = bool(self.solutions)  # (w, b) = 0 or the subsample's solution: the first C stops at tol
        for c in sorted(cs):
            if warm_from is not None:
                w.copy_(self.solutions[warm_from][0])
                b.copy_(self.solutions[warm_from][1])
            c_reg = c * self.c_factor
            # a later C starts from another C's solution and must bring the gradient to 0.3x what the change of C
            # alone puts there, not merely below tol (see WARM_START_REDUCTION)
            stop, start_value = _warm_stop(objective, w, b, c_reg, tol) if warm else (None, None)
            iterations, evaluations = _lbfgs(objective, w, b, c_reg, stop or tol, max_iter, start_value=start_value)
            warm = True
            if iterations >= max_iter:
                log.warning("logreg (torch): C=%g stopped at max_iter=%d before the gradient reached tol=%g", c,
                            max_iter, tol)
            log.info("logreg (torch): C=%g solved in %d iterations (%d evaluations over the data)", c, iterations,
                     evaluations)
            self.solutions[c] = (w.detach().clone(), b.detach().clone())
            out[c] = ((w @ self.precond).cpu().double().numpy(), b.detach().cpu().double().numpy().copy(),
                      iterations)
        return out


def fit_softmax_path(blocks: Blocks, labels: np.ndarray, num_classes: int, d: int, cs: list[float], *,
                     class_weight: np.ndarray | None, tol: float, max_iter: int, device: torch.device,
                     on_device: bool = False) -> tuple[dict[float, tuple[np.ndarray, np.ndarray, int]], np.ndarray,
                                                        np.ndarray]:
    """Solves the objective for every C, warm-starting each from the previous (C ascending); see
    :class:`SoftmaxPath` for the arguments.

    Returns:
        ({C: (coef K x D, intercept K, iterations)} in standardised space, mean, scale).
    """
    path = SoftmaxPath(blocks, labels, num_classes, d, class_weight=class_weight, tol=tol, max_iter=max_iter,
                       device=device, on_device=on_device)
    return path.solve(cs), path.mean, path.scale


def _warm_stop(objective: _Objective, w: torch.Tensor, b: torch.Tensor, c_reg: float,
               tol: float) -> tuple[float, float]:
    """The stopping gradient for a solve at `c_reg` warm-started from another C's solution (w, b): `tol`, or
    :data:`WARM_START_REDUCTION` times the largest gradient component at (w, b), whichever is smaller; and f at
    (w, b), whose gradient the evaluation left in w.grad and b.grad (L-BFGS starts from it, see :func:`_lbfgs`)."""
    value = objective(w, b, c_reg)
    return min(tol, WARM_START_REDUCTION * objective.grad_max), value


# Rows of the whitener's covariance estimate at most (strided, so every part of the file is seen).
WHITEN_ROWS = 16_384
# Its ridge, relative to the mean eigenvalue (1 for standardised features): directions of (near) collinear
# features are stretched at most 1 / sqrt(1e-3) = 32x.
WHITEN_RIDGE = 1e-3


def _whitener(blocks: Blocks, n: int, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """P = (S + r I)^(-1/2), S the standardised features' covariance: the solver's preconditioner.

    Why: L-BFGS's iterations grow with the conditioning of the problem, and the standardised features of a real
    backbone are strongly correlated (a few directions carry most of the variance), which standardisation, a
    diagonal scaling, leaves in place. Solving for u with W = u P changes nothing in the objective or its minimum,
    only the path to it: in u the features look white. P costs one D x D product on at most WHITEN_ROWS rows and an
    eigendecomposition; each evaluation then adds two K x D x D products, ~D / (2 N) of its own cost.
    """
    stride = max(1, n // WHITEN_ROWS)
    d = len(mean)
    gram, rows = np.zeros((d, d)), 0
    for start, block in blocks():
        z = (block[(-start) % stride::stride].astype(np.float64) - mean) / scale
        gram += z.T @ z
        rows += len(z)
    eigenvalues, vectors = np.linalg.eigh(gram / max(rows, 1))
    eigenvalues = np.maximum(eigenvalues, 0.0)
    ridge = WHITEN_RIDGE * max(float(eigenvalues.mean()), 1e-12)
    return (vectors / np.sqrt(eigenvalues + ridge)) @ vectors.T


SUBSAMPLE_EVERY = 8  # the first C's warm start: every 8th row ...
SUBSAMPLE_MIN_ROWS = 16_384  # ... when that gives at least this many rows (at 90,000 rows its copy, 0.05 GiB, would
# lift heads@logreg's peak memory from 1.48x to 1.59x the features it reads, for ~3 s of a 78 s sweep: measured)


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
# A cold start is unaffected: from zero the gradient is orders of magnitude above tol, so min(tol, 0.3 g0) = tol.
# 0.3, not 0.1: measured at N = 100,000, K = 100 (bench/results/heads_cpu.md), the val accuracy at C = 0.1 / 1 is
# 0.5899 / 0.5414 with 0.3 and 0.5905 / 0.5423 with 0.1 (the C = 0.01 model they start from: 0.6646; scikit-learn's
# cold fits: 0.587 / 0.539), at 50 + 102 instead of 72 + 163 passes over the data.
WARM_START_REDUCTION = 0.3


class _Converged(Exception):
    """Raised by the L-BFGS closure at a point that meets the stopping gradient (the parameters hold that point)."""


def _lbfgs(objective: _Objective, w: torch.Tensor, b: torch.Tensor, c_reg: float, tol: float,
           max_iter: int, start_value: float | None = None) -> tuple[int, int]:
    """Minimises the objective at `c_reg` from the current (w, b), in place; returns (iterations, evaluations).

    Stops at the first evaluated point where the largest component of the gradient in (W, b) is at most `tol`
    (scikit-learn's lbfgs criterion, whatever the preconditioner; warm starts pass the tighter :func:`_warm_stop`):
    torch's LBFGS would test the gradient in u instead, so its own test is off and the closure ends the solve. When
    that point is below what float32 sums resolve, L-BFGS's own stalls end the solve (loss or step change under
    1e-12). `start_value`: f at the current (w, b), already evaluated (its gradient in w.grad, b.grad and
    `objective.grad_max`): the first call of the closure returns it instead of another pass over the data.
    """
    evaluations = 0 if start_value is None else 1
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=0.0,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        nonlocal evaluations, start_value
        if start_value is not None:  # (w, b) unchanged since that evaluation
            value, start_value = start_value, None
        else:
            evaluations += 1
            value = objective(w, b, c_reg)
        if objective.grad_max <= tol:
            raise _Converged  # inside the line search the parameters are at the point just evaluated
        return torch.tensor(value, dtype=torch.float64)

    try:
        opt.step(closure)
    except _Converged:
        pass
    return int(opt.state[opt._params[0]].get("n_iter", 0)), evaluations
