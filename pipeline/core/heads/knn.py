"""k-nearest-neighbour head: DINOv2's weighted kNN vote on L2-normalised features, k chosen on val.

The k train rows most cosine-similar to a query (features L2-normalised, similarity = dot product) each vote for
their class with weight exp(sim / T); the class probabilities are the votes normalised to sum to 1, i.e. a softmax
of sim / T over the k neighbours (computed as a softmax, so a small T cannot overflow). This is the evaluation of
DINOv2 (`dinov2/eval/knn.py`: k in 10, 20, 100, 200, T = 0.07). `heads.knn.k` may list several k: the neighbours are
found once for the largest, and the k with the best val accuracy is kept (ties: the smaller k; the loss is no
tie-breaker here, since a kNN's cross-entropy is dominated by the floor of the classes that got no vote).

Memory stays bounded at any size: queries are taken :data:`QUERY_ROWS` at a time, and for each block of queries the
train rows :data:`TRAIN_ROWS` at a time, keeping a running top-k, so a step holds QUERY_ROWS x (k + TRAIN_ROWS)
similarities (128 MB at the defaults), never queries x train. The top-k is exact and its ties are broken by the
lower train row (:func:`_merge`), so the neighbours do not depend on the block sizes; BLAS may round a dot product
differently for other block shapes (the last bit), so bytes are the same only where the similarities are.

The head is a torch module like the others (:class:`KnnHead`): its "weights" are the L2-normalised train features
and their labels, stored as buffers in head.safetensors (N x D float32: 5.5 MB for the digits, ~3.9 GB for ImageNet
at 768 features), so evaluate and predict load it like any head and it needs no features file. Its output is
log(vote + :data:`PROB_FLOOR`): a softmax of it is the normalised vote (within the floor), the argmax is the vote's,
and the cross-entropy of a row whose class got no vote is finite (about -log(1e-6) = 13.8) instead of infinite.
It has no trainable weights, so the fine-tune cannot warm-start from it (pipeline/core/heads/selection.py).
Train metrics of a kNN count each train row as its own nearest neighbour (as scikit-learn's `score` on the train
set does): they are optimistic by construction.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.heads.metrics import row_scores
from pipeline.infra.config import KnnConfig
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import resolve_device

log = logging.getLogger(__name__)

QUERY_ROWS = 1024    # queries per block
TRAIN_ROWS = 32768   # train rows per block: 1024 x 32768 float32 similarities = 128 MB
PROB_FLOOR = 1e-6    # added to every class's normalised vote before the log (see the module doc)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in float32 (an all-zero row stays zero: torch's eps guard)."""
    return F.normalize(x.float(), dim=1)


def _merge(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of `sims` (with their train indices), ordered by similarity, ties by lower index.

    Why not `topk` alone: which of several equal values topk returns is unspecified, so two block sizes could keep
    different neighbours of equal similarity (and different labels). Here the k-th largest value is found first
    (unique whatever the tie order), every candidate above it is kept, and the places left go to the candidates equal
    to it in column order. The caller lays candidates out so that column order is index order among equal values
    (the running top-k, itself ordered so, then the block in index order), which makes the result independent of
    the blocking.
    """
    kth = sims.topk(k, dim=1).values[:, -1:]
    above = sims > kth
    at = sims == kth
    take = above | (at & (at.cumsum(1) <= k - above.sum(1, keepdim=True)))
    # exactly k taken per row: everything else is pushed to -inf, so a second topk picks the taken ones
    keep = torch.where(take, sims, torch.tensor(float("-inf"), device=sims.device)).topk(k, dim=1).indices
    top_s, top_i = sims.gather(1, keep), idx.gather(1, keep)
    order = top_i.argsort(dim=1)  # by index, then (stable) by similarity descending: ties keep the lower index first
    top_s, top_i = top_s.gather(1, order), top_i.gather(1, order)
    order = top_s.argsort(dim=1, descending=True, stable=True)
    return top_s.gather(1, order), top_i.gather(1, order)


@torch.no_grad()
def nearest(queries: torch.Tensor, train: torch.Tensor, k: int, query_rows: int = QUERY_ROWS,
            train_rows: int = TRAIN_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of the k nearest train rows of each query, most similar first.

    Args:
        queries, train: L2-normalised rows (:func:`normalise`) on the same device.
        k: neighbours per query, at most len(train).
        query_rows, train_rows: block sizes (memory only: the neighbours are the same for any).
    """
    device = train.device
    sims_out, idx_out = [], []
    for qs in range(0, len(queries), query_rows):
        q = queries[qs:qs + query_rows]
        # k placeholders below any real similarity (which lies in [-1, 1]); gone once k train rows are seen
        best_s = torch.full((len(q), k), float("-inf"), device=device)
        best_i = torch.full((len(q), k), -1, dtype=torch.long, device=device)
        for ts in range(0, len(train), train_rows):
            block = q @ train[ts:ts + train_rows].T
            idx = torch.arange(ts, ts + block.shape[1], device=device).expand(len(q), -1)
            best_s, best_i = _merge(torch.cat([best_s, block], 1), torch.cat([best_i, idx], 1), k)
        sims_out.append(best_s)
        idx_out.append(best_i)
    if not sims_out:
        return torch.zeros((0, k), device=device), torch.zeros((0, k), dtype=torch.long, device=device)
    return torch.cat(sims_out), torch.cat(idx_out)


def vote(sims: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, num_classes: int) -> torch.Tensor:
    """Class probabilities: each of the first k neighbours votes for its class with weight exp(sim / T), normalised.

    Args:
        sims, labels: the neighbours' similarities and classes (queries x >= k), most similar first.
    """
    weights = torch.softmax(sims[:, :k] / temperature, dim=1)  # exp(s/T) / sum exp(s/T), overflow-free
    probs = torch.zeros((len(sims), num_classes), dtype=weights.dtype, device=sims.device)
    rows = torch.arange(len(sims), device=sims.device)
    # one neighbour at a time: within a step every row adds to one cell, so the sums are deterministic on a GPU
    # too (scatter_add_ would add a row's equal labels in an unspecified order there)
    for j in range(k):
        probs[rows, labels[:, j]] += weights[:, j]
    return probs


def vote_logits(sims: torch.Tensor, labels: torch.Tensor, k: int, temperature: float,
                num_classes: int) -> torch.Tensor:
    """log(normalised vote + :data:`PROB_FLOOR`): the head's output (see the module doc)."""
    return torch.log(vote(sims, labels, k, temperature, num_classes) + PROB_FLOOR)


class KnnHead(nn.Module):
    """The fitted kNN: normalised train features and labels as buffers, k and T as attributes.

    Its forward takes a batch of (unnormalised) pooled features and returns log-probabilities (module doc).
    """

    # evaluate moves it to the GPU when there is one: scoring a split is a (split x train) product, which the CPU
    # route of the small heads (pinned bytes) would make hours long at ImageNet's 1.28 M train rows
    score_on_accelerator = True

    def __init__(self, in_features: int, num_classes: int, train_rows: int, k: int, temperature: float,
                 train_features: torch.Tensor | None = None, train_labels: torch.Tensor | None = None):
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.query_rows, self.train_rows = QUERY_ROWS, TRAIN_ROWS
        # empty, not zeros: load_state_dict fills them, and 4 GB of zeros would be written for nothing
        self.register_buffer("train_features", train_features if train_features is not None
                             else torch.empty((train_rows, in_features)))
        self.register_buffer("train_labels", train_labels if train_labels is not None
                             else torch.empty(train_rows, dtype=torch.long))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = normalise(x.to(self.train_features.device))
        sims, idx = nearest(q, self.train_features, self.k, self.query_rows, self.train_rows)
        return vote_logits(sims, self.train_labels[idx], self.k, self.temperature, self.num_classes)


def fit_knn(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, cfg: KnnConfig,
            num_classes: int) -> tuple[KnnHead, dict]:
    """Fits the kNN (normalises and keeps the train rows) and picks k on val: best accuracy, ties to the smaller k.

    The val neighbours are found once, for the largest k; each smaller k reads the first k of them. A k above the
    number of train rows is that number (logged; `k` in the result is the one used).
    """
    n, d = x_train.shape
    if n == 0:
        raise PipelineError("heads@knn: the train split has no rows to vote")
    # a k above the train rows means every row votes: k = n (a small data set with DINOv2's [10, 20, 100, 200])
    ks = sorted({min(k, n) for k in cfg.k})
    if max(cfg.k) > n:
        log.warning("knn: heads.knn.k %s above the %d train rows: k = %d is used in their place",
                    [k for k in cfg.k if k > n], n, n)
    device = resolve_device(cfg.device)
    train = normalise(torch.from_numpy(np.asarray(x_train)).to(device))
    labels = torch.from_numpy(np.asarray(y_train)).long().to(device)
    sims, idx = nearest(normalise(torch.from_numpy(np.asarray(x_val)).to(device)), train, ks[-1])
    neighbour_labels = labels[idx]
    y = torch.from_numpy(np.asarray(y_val))
    results = []
    for k in ks:
        rows = row_scores(vote_logits(sims, neighbour_labels, k, cfg.T, num_classes).cpu(), y)
        acc, loss = float((rows["predicted"] == y_val).mean()), float(rows["loss"].astype(np.float64).mean())
        log.info("knn: k=%d T=%g val accuracy %.4f, log loss %.4f", k, cfg.T, acc, loss)
        results.append({"k": k, "val_accuracy": acc, "val_loss": loss})
    best = min(results, key=lambda r: (-r["val_accuracy"], r["k"]))
    module = KnnHead(d, num_classes, n, best["k"], cfg.T, train_features=train, train_labels=labels)
    return module.eval(), {"k": best["k"], "T": cfg.T, "train_rows": n, "search": results}
