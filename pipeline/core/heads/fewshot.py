"""Few-shot episodes on the feature cache: how accuracy grows with the number of train images per class.

Protocol (`fewshot` section of params.yaml). For each k of `shots`, `episodes` episodes; an episode draws k train
rows of every class (from the train split only: val and test are never sampled, they are scored in full), fits three
probes on those k x C rows and scores each on the whole of val and test:

- `logreg`: logistic regression on standardised features with one fixed C, fitted by the logreg head's own public
  function (:func:`pipeline.core.heads.logreg.fit_logreg`, scikit-learn solver, a single C, so no search on val);
  why fixed: an episode has no val set of its own to choose C on, and choosing it on the full val split would leak
  hundreds of labels into a "k-shot" result. C = 1 (scikit-learn's default) is what most few-shot linear-probe
  protocols use.
- `knn`: DINOv2's weighted kNN vote (:class:`pipeline.core.heads.knn.KnnHead`: cosine, each neighbour votes
  exp(sim / T)) with min(`knn_k`, k x C) neighbours: at 1 shot x 10 classes the 20 configured become 10.
- `ncm`: nearest class mean, the classic few-shot baseline (SimpleShot, Wang et al. 2019): each class's mean of its
  L2-normalised support rows, normalised again; a query goes to the class whose mean is most cosine-similar.

Every probe reads the same pooled features (`pooling`, `auto` = the logreg head's choice: avg on feature maps,
pre_logits on token backbones), so the three lines of the figure differ only by the probe.

Draws. Episode e has its own seed, the e-th word of numpy's `SeedSequence(seed).generate_state(episodes)`, recorded
in the output. It draws one random order of each class's train rows (`default_rng(episode seed).permutation`, class
by class in class order), and the k-shot support is the first k of every order. The draws are therefore *nested*:
episode e's 2-shot support holds its 1-shot support, and so on up the shots. Why: each episode is one growing
support set, so the accuracy-vs-shots curve compares the same images plus more, not a fresh draw at every k (which
would add the draw's noise to every difference between two k). The same seed gives the same rows; another seed,
other rows.

A k above the smallest class's train count is skipped, with a warning and an entry under `skipped` (which class, how
many images): a result with fewer than k images for some class would not be a k-shot result.

Interval. Per (k, probe, split): the mean accuracy over episodes and a 95 % t-interval over episodes,
mean +- t(0.975, n - 1) s / sqrt(n), s the sample standard deviation (ddof 1), clipped to [0, 1]. It is the spread due
to *which* images were drawn, val and test held fixed; the sampling error of the fixed val and test sets (a Wilson
interval per accuracy, pipeline/core/heads/intervals.py) is not in it. Why a t-interval, not a bootstrap: closed
form, no second seed to record, and with 10 episodes a percentile bootstrap is too narrow (it uses the normal
quantile in effect, 1.96 instead of t(0.975, 9) = 2.26).

Determinism: everything runs with one torch and one BLAS thread (:func:`pipeline.infra.runtime.single_threaded`):
the fits are small (at most 16 x C rows), so a second thread saves nothing, and one fixed count gives the same bytes
on every rerun. Cost on the default data (10 classes, 1280 avg features): 50 logreg fits of at most 160 rows and
2 x 150 scorings of 359 rows; ~20 s on the 2-core machine, four fifths of it in scikit-learn's L-BFGS.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.features.cache import read_attrs, read_inputs, read_labels, split_shape
from pipeline.core.heads.knn import KnnHead, normalise
from pipeline.core.heads.logreg import fit_logreg
from pipeline.core.models.feature_sets import auto_pooling
from pipeline.infra.config import FewshotConfig, LogregConfig
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import progress_disabled, single_threaded

log = logging.getLogger(__name__)

PROBES = ("logreg", "knn", "ncm")
EVAL_SPLITS = ("val", "test")
DECIMALS = 6  # accuracies and bounds are stored rounded (1e-6 is far below one image of any split)
INTERVAL = ("95 % t-interval over episodes: mean +- t(0.975, n-1) s / sqrt(n), s with ddof 1, clipped to [0, 1]; "
            "the spread over draws, val and test held fixed (pipeline/core/heads/fewshot.py)")
DRAWS = ("nested: each episode orders every class's train rows at random (numpy default_rng(episode seed)), "
         "and k-shot takes the first k of each order, so a larger k holds the smaller k's rows")


def episode_seeds(seed: int, episodes: int) -> list[int]:
    """The seed of each episode: the first `episodes` words of `SeedSequence(seed)` (32-bit, well mixed, so two
    episodes of one run, or episodes of two nearby seeds, do not share draws)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(episodes)]


def class_orders(labels: np.ndarray, num_classes: int, seed: int) -> list[np.ndarray]:
    """One random order of each class's rows (indices into `labels`), drawn class by class with `seed`."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def support_rows(orders: Sequence[np.ndarray], k: int) -> np.ndarray:
    """The k-shot support of an episode: the first k rows of every class's order, sorted (so the fit sees the rows
    in file order, whatever the draw's order)."""
    return np.sort(np.concatenate([o[:k] for o in orders]))


def usable_shots(shots: Sequence[int], labels: np.ndarray, classes: Sequence[str]) -> tuple[list[int], dict]:
    """The shots every class has train images for (ascending), and {k: why} for the others (skipped)."""
    counts = np.bincount(labels, minlength=len(classes))
    smallest = int(counts.min())
    which = classes[int(counts.argmin())]
    kept = sorted(k for k in shots if k <= smallest)
    skipped = {str(k): f"class '{which}' has {smallest} train images, fewer than {k}" for k in sorted(shots)
               if k > smallest}
    for k, why in skipped.items():
        log.warning("fewshot: %s-shot skipped: %s", k, why)
    return kept, skipped


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float64 (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ncm_similarities(x_support: np.ndarray, y_support: np.ndarray, x_query: np.ndarray,
                     num_classes: int) -> np.ndarray:
    """Cosine similarity of each query with each class mean (queries x classes).

    The mean is taken over the class's L2-normalised support rows and normalised again, so every support image
    weighs the same whatever its feature norm (SimpleShot's "L2N" nearest class mean).
    """
    support = _unit(x_support)
    means = _unit(np.stack([support[y_support == c].mean(axis=0) for c in range(num_classes)]))
    return _unit(x_query) @ means.T


def logreg_probe(x: np.ndarray, y: np.ndarray, cfg: FewshotConfig, num_classes: int) -> torch.nn.Linear:
    """The logreg head's own fit with the one C (scikit-learn solver): the scaler folded into a Linear layer.

    fit_logreg scores its candidates on a val set; with one C there is nothing to choose, so it is given the support
    itself (a few rows, cheap) rather than the real val split, which an episode must not see.
    """
    lcfg = LogregConfig(C=[cfg.C], max_iter=cfg.max_iter, solver="sklearn", device="cpu")
    layer, _ = fit_logreg(x, y, x, y, lcfg, num_classes)
    return layer


def knn_probe(x: np.ndarray, y: np.ndarray, cfg: FewshotConfig, num_classes: int) -> KnnHead:
    """The kNN head on the support rows, with min(knn_k, rows) neighbours."""
    k = min(cfg.knn_k, len(x))
    return KnnHead(x.shape[1], num_classes, len(x), k, cfg.knn_T, train_features=normalise(torch.from_numpy(x)),
                   train_labels=torch.from_numpy(y).long()).eval()


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The logger `name` at WARNING for the block: fit_logreg's two INFO lines per fit would be 100 lines here."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


@torch.no_grad()
def episode_predictions(x: np.ndarray, y: np.ndarray, queries: dict[str, np.ndarray], cfg: FewshotConfig,
                        num_classes: int) -> dict[str, dict[str, np.ndarray]]:
    """{probe: {split: predicted class per query row}} of the three probes fitted on one support set (x, y)."""
    with _quiet("pipeline.core.heads.logreg"):
        layer = logreg_probe(x, y, cfg, num_classes)
    knn = knn_probe(x, y, cfg, num_classes)
    out: dict[str, dict[str, np.ndarray]] = {p: {} for p in PROBES}
    for split, q in queries.items():
        tq = torch.from_numpy(q)
        out["logreg"][split] = layer(tq).argmax(1).numpy()
        out["knn"][split] = knn(tq).argmax(1).numpy()
        out["ncm"][split] = ncm_similarities(x, y, q, num_classes).argmax(1)
    return out


def t_interval(values: Sequence[float], confidence: float = 0.95) -> list[float]:
    """Student-t interval of the mean of `values` (at least two), clipped to [0, 1] (they are accuracies)."""
    from scipy.stats import t  # only here: scipy.stats costs ~0.5 s to import

    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return [round(max(0.0, mean - half), DECIMALS), round(min(1.0, mean + half), DECIMALS)]


def summarise(accuracies: Sequence[float]) -> dict:
    """One (k, probe, split): `accuracy` (the mean over episodes), `accuracy_ci95` (its 95 % t-interval) and
    `per_episode.accuracy` (each episode's, in episode order). The names are the other metrics files' own, so
    `python -m pipeline.verify` judges them as proportions of the split's images (pipeline/core/evaluate/tolerance.py)."""
    # from the stored (rounded) values, so that the file's numbers recompute from the file itself
    stored = [round(a, DECIMALS) for a in accuracies]
    return {"accuracy": round(math.fsum(stored) / len(stored), DECIMALS), "accuracy_ci95": t_interval(stored),
            "per_episode": {"accuracy": stored}}


def _read(features: Path, pooling: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    present = [s for s in ("train", *EVAL_SPLITS) if split_shape(features, s, pooling) is not None]
    if "train" not in present or "val" not in present:
        raise PipelineError(f"{features} needs train and val splits for the few-shot episodes; it has {present}")
    return ({s: read_inputs(features, s, pooling) for s in present},
            {s: read_labels(features, s).astype(np.int64) for s in present})


def run_fewshot(features: Path | str, cfg: FewshotConfig) -> dict:
    """Every episode of every usable k; returns the metrics (protocol, skipped shots, results per k/probe/split)."""
    attrs = read_attrs(features)
    classes = list(attrs["classes"])
    pooling = auto_pooling("logreg", attrs.get("feature_layout", "NCHW")) if cfg.pooling == "auto" else cfg.pooling
    x, y = _read(Path(features), pooling)
    shots, skipped = usable_shots(cfg.shots, y["train"], classes)
    seeds = episode_seeds(cfg.seed, cfg.episodes)
    splits = [s for s in EVAL_SPLITS if s in x]
    queries = {s: x[s] for s in splits}
    log.info("fewshot: shots %s x %d episodes, probes %s on %s (%s pooling, %d features), scored on %s", shots,
             cfg.episodes, ", ".join(PROBES), features, pooling, x["train"].shape[1],
             ", ".join(f"{s} ({len(y[s])} rows)" for s in splits))
    acc = {k: {p: {s: [] for s in splits} for p in PROBES} for k in shots}
    with single_threaded():
        for seed in tqdm(seeds, desc="fewshot episodes", disable=progress_disabled()):
            orders = class_orders(y["train"], len(classes), seed)
            for k in shots:
                rows = support_rows(orders, k)
                predicted = episode_predictions(x["train"][rows], y["train"][rows], queries, cfg, len(classes))
                for probe, by_split in predicted.items():
                    for s, p in by_split.items():
                        acc[k][probe][s].append(float((p == y[s]).mean()))
    results = {str(k): {p: {s: summarise(v) for s, v in by_split.items()} for p, by_split in by_probe.items()}
               for k, by_probe in acc.items()}
    for k in shots:
        log.info("fewshot: %d-shot mean %s accuracy %s", k, splits[-1],
                 {p: results[str(k)][p][splits[-1]]["accuracy"] for p in PROBES})
    protocol = {
        "backbone": attrs.get("backbone"), "pooling": pooling, "in_features": int(x["train"].shape[1]),
        "classes": len(classes), "train_rows": len(y["train"]), "scored_rows": {s: len(y[s]) for s in splits},
        "shots": shots, "episodes": cfg.episodes, "seed": cfg.seed, "episode_seeds": seeds, "draws": DRAWS,
        "interval": INTERVAL,
        "probes": {"logreg": {"C": cfg.C, "max_iter": cfg.max_iter, "tol": LogregConfig().tol, "solver": "sklearn",
                              "features": "standardised on the episode's support rows"},
                   "knn": {"k": cfg.knn_k, "T": cfg.knn_T, "k_used": {str(k): min(cfg.knn_k, k * len(classes))
                                                                        for k in shots}},
                   "ncm": {"similarity": "cosine to the normalised mean of L2-normalised support rows"}},
    }
    return {"protocol": protocol, "skipped": skipped, "results": results}
