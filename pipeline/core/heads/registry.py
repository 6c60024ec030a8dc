"""The heads the pipeline can fit, each described once: its config, its input pooling, how to fit it and how to
rebuild its module from a saved spec. Adding a head means adding one entry here (and its params section)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch.nn as nn

from pipeline.core.heads.knn import KnnHead, fit_knn
from pipeline.core.heads.logreg import fit_logreg, resolve_solver
from pipeline.core.heads.mlp import MlpHead, fit_mlp
from pipeline.core.heads.spec import HeadSpec
from pipeline.core.models.feature_sets import auto_pooling

FitFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any, int], "tuple[nn.Module, dict]"]


@dataclass(frozen=True)
class HeadType:
    """One kind of head.

    Attributes:
        pooling: the cached pooling the head reads, from its config and the features' layout (`auto` resolved).
        fit: fits on (x_train, y_train, x_val, y_val, config, num_classes); returns the module and fit details.
        build: an untrained module of the architecture a saved spec describes (to load weights into).
        architecture: spec entries beyond in/out sizes that `build` needs, from the config.
        streams: whether `fit` can read (config, train rows, features) inputs block by block from the file
            (StreamedInputs) instead of an array in memory.
    """

    pooling: Callable[[Any, str], str]
    fit: FitFn
    build: Callable[[HeadSpec], nn.Module]
    architecture: Callable[[Any], dict]
    streams: Callable[[Any, int, int], bool]


def _pooling(head: str, cfg: Any, layout: str) -> str:
    return auto_pooling(head, layout) if cfg.pooling == "auto" else cfg.pooling


HEADS: dict[str, HeadType] = {
    # the scaler is folded into one Linear layer (pipeline/core/heads/logreg.py)
    "logreg": HeadType(pooling=lambda cfg, layout: _pooling("logreg", cfg, layout), fit=fit_logreg,
                       build=lambda spec: nn.Linear(spec.in_features, spec.num_classes),
                       architecture=lambda cfg: {},
                       streams=lambda cfg, n, d: resolve_solver(cfg, n, d) == "torch"),
    # auto: concat pooling [avg, max] on feature maps: max pooling is what a deeper head adds over the linear probe
    "mlp": HeadType(pooling=lambda cfg, layout: _pooling("mlp", cfg, layout), fit=fit_mlp,
                    build=lambda spec: MlpHead(spec.in_features, spec.num_classes, spec.architecture["hidden"],
                                               spec.architecture["dropout"]),
                    architecture=lambda cfg: {"hidden": list(cfg.hidden), "dropout": cfg.dropout},
                    streams=lambda cfg, n, d: True),
    # no weights to learn: the normalised train rows are the module's buffers; k is what the fit chose on val
    "knn": HeadType(pooling=lambda cfg, layout: _pooling("knn", cfg, layout), fit=fit_knn,
                    build=lambda spec: KnnHead(spec.in_features, spec.num_classes, spec.fit["train_rows"],
                                               spec.fit["k"], spec.config["T"]),
                    architecture=lambda cfg: {},
                    streams=lambda cfg, n, d: False),  # every train row is compared with every query: in memory
}


def head_type(name: str) -> HeadType:
    if name not in HEADS:
        raise ValueError(f"unknown head type '{name}'; known: {', '.join(HEADS)}")
    return HEADS[name]
