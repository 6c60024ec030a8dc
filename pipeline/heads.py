"""Stage `heads@<name>`: fits one cheap head on the cached features only (never images, never the backbone).

Heads: `logreg` (StandardScaler + LogisticRegression on avg pooling by default) and `mlp` (BN-Dropout-Linear-ReLU
on concat pooling [avg, max]). Each is stored as a torch module: `head.safetensors` (weights) + `head.json` (what to
build, which pooling, which features it was fitted on), so later stages load every head the same way, without pickle.

    python -m pipeline.heads logreg --features data/features.h5 --out models/heads/logreg \\
        --metrics metrics/heads/logreg.json
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline import runlog
from pipeline.errors import PipelineError, run_main
from pipeline.artifacts import atomic_path, read_json, write_json
from pipeline.config import load_section, to_dict
from pipeline.features import (SplitFeatures, StaleFeaturesError, canonical_json, read_attrs, read_split,
                               verify_features)
from pipeline.logreg import fit_logreg
from pipeline.mlp import MlpHead, fit_mlp
from pipeline.runtime import setup_logging

log = logging.getLogger("pipeline.heads")

HEADS = ("logreg", "mlp")
FINGERPRINT_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "precision", "dtype", "decode",
                    "index_sha256")


def build_head(spec: dict) -> nn.Module:
    """An untrained head module of the architecture `spec` describes."""
    if spec["head"] == "logreg":
        return nn.Linear(spec["in_features"], spec["num_classes"])
    if spec["head"] == "mlp":
        return MlpHead(spec["in_features"], spec["num_classes"], spec["hidden"], spec["dropout"])
    raise ValueError(f"unknown head type '{spec['head']}'")


def save_head(out: Path, module: nn.Module, spec: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(out / "head.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(out / "head.json", spec)


class HeadFileError(PipelineError, ValueError):
    """A saved head that is missing or cannot be read back (safetensors only: no pickle is ever loaded)."""


def load_head(head_dir: Path | str) -> tuple[nn.Module, dict]:
    """Loads a saved head (eval mode) and its spec.

    Raises:
        HeadFileError: head.json or head.safetensors is missing, or is not what the heads stage writes (a pickle or
            any other file put in its place is refused, never unpickled).
    """
    head_dir = Path(head_dir)
    rerun = f"rerun `dvc repro` (or `python -m pipeline.heads {head_dir.name}`)"
    if not (head_dir / "head.json").is_file() or not (head_dir / "head.safetensors").is_file():
        raise HeadFileError(f"no fitted head in '{head_dir}' (head.json + head.safetensors); {rerun}")
    try:
        spec = read_json(head_dir / "head.json")
        module = build_head(spec)
        state = load_file(str(head_dir / "head.safetensors"))
        module.load_state_dict(state)
    except Exception as exc:  # safetensors, JSON and load_state_dict each raise their own types for a bad file
        raise HeadFileError(f"'{head_dir}' does not hold a head the heads stage wrote ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); {rerun}") from None
    return module.eval(), spec


def check_head_features(head_dir: Path | str, spec: dict, attrs: dict, features: Path | str) -> None:
    """Raises StaleFeaturesError when the head was fitted on other features than the file `features` holds."""
    for key in FINGERPRINT_KEYS:
        fitted_on, now = spec.get("features", {}).get(key), attrs.get(key)
        if canonical_json(fitted_on) != canonical_json(now):
            raise StaleFeaturesError(
                f"head '{head_dir}' was fitted on features with '{key}' = {fitted_on!r}, but {features} has "
                f"{now!r}; the head is stale: run `dvc repro` to refit it on the current features")


@torch.no_grad()
def head_logits(module: nn.Module, spec: dict, feats: SplitFeatures) -> np.ndarray:
    return module.eval()(torch.from_numpy(feats.inputs(spec["pooling"]))).numpy()


def split_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    t_logits, t_labels = torch.from_numpy(logits).float(), torch.from_numpy(labels).long()
    return {"accuracy": float((t_logits.argmax(1) == t_labels).float().mean()),
            "loss": float(F.cross_entropy(t_logits, t_labels))}


def fit_head(name: str, features: Path, cfg) -> tuple[nn.Module, dict, dict]:
    """Fits head `name` with its config; returns the module, its spec and its metrics."""
    attrs = read_attrs(features)
    train, val = read_split(features, "train"), read_split(features, "val")
    if train is None or val is None:
        raise PipelineError(f"{features} needs train and val splits; it has "
                            f"{[s for s in ('train', 'val', 'test') if read_split(features, s) is not None]}")
    classes = attrs["classes"]
    pooling = cfg.pooling if name == "logreg" else "catavgmax"
    x_train, x_val = train.inputs(pooling), val.inputs(pooling)
    log.info("heads@%s: fitting on %d train and %d val rows of %d features (%s pooling)", name, len(x_train),
             len(x_val), x_train.shape[1], pooling)
    t0 = time.perf_counter()
    if name == "logreg":
        module, info = fit_logreg(x_train, train.labels, x_val, val.labels, cfg, len(classes))
    else:
        module, info = fit_mlp(x_train, train.labels, x_val, val.labels, cfg, len(classes))
    spec = {"head": name, "pooling": pooling, "in_features": int(x_train.shape[1]), "num_classes": len(classes),
            "classes": classes, "config": to_dict(cfg), "fit": info,
            "features": {k: attrs.get(k) for k in FINGERPRINT_KEYS}}
    if name == "mlp":
        spec.update(hidden=list(cfg.hidden), dropout=cfg.dropout)
    metrics = {"train": split_metrics(head_logits(module, spec, train), train.labels),
               "val": split_metrics(head_logits(module, spec, val), val.labels)}
    log.info("heads@%s: val accuracy %.4f (loss %.4f), train accuracy %.4f, %.1f s", name,
             metrics["val"]["accuracy"], metrics["val"]["loss"], metrics["train"]["accuracy"],
             time.perf_counter() - t0)
    return module, spec, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.heads", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Params: heads.logreg.{C,max_iter,pooling}; heads.mlp.{hidden,dropout,lr,weight_decay,batch_size,"
               "epochs,patience,seed}.")
    parser.add_argument("head", choices=HEADS, help="which head to fit")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="features file from extract")
    parser.add_argument("--out", type=Path, help="head folder (default: models/heads/<head>)")
    parser.add_argument("--metrics", type=Path, help="metrics JSON (default: metrics/heads/<head>.json)")
    parser.add_argument("--index", type=Path, default=Path("data/prepared"),
                        help="prepare's output folder; when it exists, the features must come from its index.csv "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = getattr(load_section("heads", args.params), args.head)
    # Refuse stale features (another backbone, preprocessing, precision, dtype or index) before fitting anything.
    verify_features(args.features, load_section("backbone", args.params), load_section("extract", args.params),
                    args.index if (args.index / "index.csv").is_file() else None)
    runlog.note(head=args.head, device="cpu", precision="fp32")  # heads always fit on the CPU in fp32
    module, spec, metrics = fit_head(args.head, args.features, cfg)
    save_head(args.out or Path("models/heads") / args.head, module, spec)
    write_json(args.metrics or Path("metrics/heads") / f"{args.head}.json", metrics)


if __name__ == "__main__":
    run_main(main, "heads")
