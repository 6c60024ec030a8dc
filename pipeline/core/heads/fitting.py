"""Fitting a head on the cached features, and a fitted head on disk.

A head is stored as a torch module: `head.safetensors` (weights) + `head.json` (what to build, which pooling, which
features it was fitted on), so later stages load every head the same way, without pickle.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from pipeline.core.features.cache import (
    SplitFeatures,
    StaleFeaturesError,
    StreamedInputs,
    canonical_json,
    input_blocks,
    read_attrs,
    read_inputs,
    read_labels,
    split_shape,
)
from pipeline.core.heads.metrics import concat_scores, row_scores, summarize
from pipeline.core.heads.registry import head_type
from pipeline.core.heads.spec import SELECTION_MODULE, HeadSpec
from pipeline.core.heads.views import load_train_views
from pipeline.infra.artifacts import atomic_path, read_json, write_json
from pipeline.infra.config import to_dict
from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)

FINGERPRINT_KEYS = ("backbone", "weights", "weights_sha256", "preprocess", "precision", "dtype", "decode",
                    "index_sha256")


class HeadFileError(PipelineError, ValueError):
    """A saved head that is missing or cannot be read back (safetensors only: no pickle is ever loaded)."""


BINDING_KEY = "classes_binding"  # head.json: SHA-256 of the class list + the features fingerprint it was fitted on


def class_binding(classes: list[str], features: dict) -> str:
    """SHA-256 tying a head's class list (order included) to the features fingerprint it was fitted on.

    Why: classes are positional (output i is classes[i]); an edited or reordered list in head.json or model.json
    would make predict relabel every image with no error. Not a signature against a forger, a check against edits.
    """
    payload = canonical_json({"classes": list(classes), "features": features})
    return hashlib.sha256(payload.encode()).hexdigest()


def check_class_binding(spec: dict, where: Path | str, classes: list[str] | None = None) -> None:
    """Raises HeadFileError when `spec`'s classes (or `classes`, a copy stored beside it) differ from those fitted.

    Args:
        spec: a head spec (head.json, or model.json's `head`).
        where: the file, for the message.
        classes: another copy of the class list that must agree (model.json's top-level `classes`).
    """
    rerun = "the class list was edited after fitting; restore the file or rerun `dvc repro`"
    if not isinstance(spec.get("classes"), list) or spec.get(BINDING_KEY) != class_binding(spec["classes"],
                                                                                           spec.get("features")):
        raise HeadFileError(f"'{where}': its classes {spec.get('classes')!r} or its features fingerprint do not "
                            f"match the checksum recorded when the head was fitted ({BINDING_KEY}); {rerun}")
    if classes is not None and list(classes) != spec["classes"]:
        raise HeadFileError(f"'{where}': classes {list(classes)!r} differ from the head's {spec['classes']!r}; {rerun}")


def build_head(spec: HeadSpec) -> nn.Module:
    """An untrained head module of the architecture `spec` describes."""
    return head_type(spec.head).build(spec)


def save_head(out: Path, module: nn.Module, spec: HeadSpec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # .cpu(): a kNN head stays on the device it was fitted on (its train metrics are a big product there)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(out / "head.safetensors", sum(t.nbytes for t in state.values())) as tmp:
        save_file(state, str(tmp))
    write_json(out / "head.json", spec.to_dict())


def load_head(head_dir: Path | str) -> tuple[nn.Module, HeadSpec]:
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
        raw = read_json(head_dir / "head.json")
        spec = HeadSpec.from_dict(raw)
        module = build_head(spec)
        state = load_file(str(head_dir / "head.safetensors"))
        module.load_state_dict(state)
    except Exception as exc:  # safetensors, JSON and load_state_dict each raise their own types for a bad file
        raise HeadFileError(f"'{head_dir}' does not hold a head the heads stage wrote ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); {rerun}") from None
    # Classes are positional: an edited list would relabel every prediction without an error.
    check_class_binding(raw, head_dir / "head.json")
    return module.eval(), spec


def check_head_features(head_dir: Path | str, spec: HeadSpec, attrs: dict, features: Path | str) -> None:
    """Raises StaleFeaturesError when the head was fitted on other features than the file `features` holds."""
    if canonical_json(spec.classes) != canonical_json(attrs.get("classes")):
        raise StaleFeaturesError(
            f"head '{head_dir}' lists classes {spec.classes!r}, but {features} (from classes.json) has "
            f"{attrs.get('classes')!r}; run `dvc repro` to refit the head on the current features")
    for key in FINGERPRINT_KEYS:
        fitted_on, now = spec.features.get(key), attrs.get(key)
        if canonical_json(fitted_on) != canonical_json(now):
            raise StaleFeaturesError(
                f"head '{head_dir}' was fitted on features with '{key}' = {fitted_on!r}, but {features} has "
                f"{now!r}; the head is stale: run `dvc repro` to refit it on the current features")


def module_device(module: nn.Module) -> torch.device:
    """The device of a head's parameters, or of its buffers for a head without parameters (kNN)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


# Rows per forward pass when scoring: logits stay 4096 x K, and head_logits (in memory) and the streamed metrics cut
# a split at the same rows, so both give the same bytes.
SCORE_ROWS = 4096


@torch.no_grad()
def head_logits(module: nn.Module, spec: HeadSpec, feats: SplitFeatures) -> np.ndarray:
    """The head's logits for cached features, on whichever device the head is, :data:`SCORE_ROWS` rows at a time."""
    device = module_device(module)
    module.eval()
    x = feats.inputs(spec.pooling)
    return np.concatenate([module(torch.from_numpy(x[s:s + SCORE_ROWS]).to(device)).cpu().numpy()
                           for s in range(0, len(x), SCORE_ROWS)]) if len(x) else np.zeros((0, spec.num_classes),
                                                                                             np.float32)


@torch.no_grad()
def stream_metrics(module: nn.Module, x: np.ndarray | StreamedInputs, labels: np.ndarray, num_classes: int) -> dict:
    """Split metrics of a head over inputs in memory or on disk, one block of logits at a time."""
    device = module_device(module)
    module.eval()
    rows = [row_scores(module(torch.from_numpy(block).to(device)), torch.from_numpy(labels[s:s + len(block)]))
            for s, block in input_blocks(x, SCORE_ROWS)]
    return summarize(labels, concat_scores(rows), num_classes)


def _load_inputs(features: Path, split: str, pooling: str, in_memory: bool) -> np.ndarray | StreamedInputs:
    shape = split_shape(features, split, pooling)
    return read_inputs(features, split, pooling) if in_memory else StreamedInputs(features, split, pooling, shape)


def _features_summary(spec: HeadSpec) -> dict:
    """Backbone, weights, crop size, pooling and width of the features a head was fitted on."""
    features = spec.features
    return {"backbone": features["backbone"], "weights": features["weights"],
            "image_size": (features.get("preprocess") or {}).get("size"), "pooling": spec.pooling,
            "in_features": spec.in_features}


def _train_views(name: str, cfg, views: Path | None, attrs: dict, pooling: str, in_memory: bool):
    """The augmented train views head `name` asks for (`cfg.views`), or None for none."""
    count, key = getattr(cfg, "views", 0), f"heads.{name}.views"
    if not count:
        return None
    if views is None:  # the sweep's backbones have no views file: the plain view, said once
        log.warning("%s: %d, but no views file was given (--views): fitting on the plain view only", key, count)
        return None
    if not in_memory:
        raise PipelineError(f"{key}: {count} needs the train features in memory, and they are above "
                            f"heads.{name}.in_memory_gb: raise it, or set {key}: 0")
    return load_train_views(views, attrs, pooling, count, key)


def fit_head(name: str, features: Path, cfg, views: Path | None = None) -> tuple[nn.Module, HeadSpec, dict]:
    """Fits head `name` with its config; returns the module, its spec and its metrics.

    Only the pooling the head needs is read. Features up to `cfg.in_memory_gb` are read into one float32 array
    (no other copy); larger ones stay in the file and are streamed block by block, when the head can stream.
    With `cfg.views` > 0 the head also trains on that many augmented views of each train image from the views file
    `views` (pipeline/core/heads/views.py), held in memory; its train metrics stay those of the plain train rows.
    """
    attrs = read_attrs(features)
    kind = head_type(name)
    pooling = kind.pooling(cfg, attrs.get("feature_layout", "NCHW"))
    shapes = {s: split_shape(features, s, pooling) for s in ("train", "val", "test")}
    if shapes["train"] is None or shapes["val"] is None:
        raise PipelineError(f"{features} needs train and val splits; it has {[s for s, v in shapes.items() if v]}")
    classes = attrs["classes"]
    n, d = shapes["train"]
    # a head that cannot stream (kNN) has no in_memory_gb: it is asked first
    in_memory = not kind.streams(cfg, n, d) or n * d * 4 <= cfg.in_memory_gb * 2**30
    x_train, x_val = (_load_inputs(features, s, pooling, in_memory) for s in ("train", "val"))
    y_train, y_val = read_labels(features, "train"), read_labels(features, "val")
    train_views = _train_views(name, cfg, views, attrs, pooling, in_memory)
    x_fit, y_fit = x_train, y_train
    if train_views is not None:
        x_fit = np.concatenate([x_train, train_views.inputs])
        y_fit = np.concatenate([y_train, train_views.labels])
    log.info("heads@%s: fitting on %d train and %d val rows of %d features (%s pooling, %s)", name, len(y_fit),
             len(y_val), d, pooling, "in memory" if in_memory else f"streamed from {features}")
    t0 = time.perf_counter()
    module, info = kind.fit(x_fit, y_fit, x_val, y_val, cfg, len(classes))
    if train_views is not None:
        info["views"] = train_views.record
    # The model the train and val scores are of: the one selected on val, which is the saved one unless it was
    # refitted on train + val (its val scores would then be in-sample; see pipeline/core/heads/logreg.py).
    selected = info.pop(SELECTION_MODULE, module)
    fitted_on = {k: attrs.get(k) for k in FINGERPRINT_KEYS}
    spec = HeadSpec(head=name, pooling=pooling, in_features=int(d), num_classes=len(classes), classes=classes,
                    config=to_dict(cfg), fit=info, features=fitted_on,
                    classes_binding=class_binding(classes, fitted_on), architecture=kind.architecture(cfg))
    # What the head was fitted on travels with its scores, so a comparison of backbones (pipeline.compare) reads
    # one file per head and never the features themselves.
    metrics = {"features": _features_summary(spec),
               "train": stream_metrics(selected, x_train, y_train, len(classes)),
               "val": stream_metrics(selected, x_val, y_val, len(classes))}
    if train_views is not None:
        metrics["views"] = train_views.record
    if selected is not module:
        # What the saved model was fitted on, and its own val scores, named as in-sample: the fine-tune's warm start
        # reproduces these (its epoch 0), not the selection's.
        in_sample = stream_metrics(module, x_val, y_val, len(classes))
        metrics["refit"] = {**info["refit"], "val_in_sample": {k: in_sample[k] for k in ("accuracy", "loss")},
                            "note": "train and val are the train-only fit's at the chosen C (what selected it); "
                                    "the saved model is refitted on train + val and has seen val"}
    log.info("heads@%s: val accuracy %.4f (loss %.4f), train accuracy %.4f, %.1f s", name,
             metrics["val"]["accuracy"], metrics["val"]["loss"], metrics["train"]["accuracy"],
             time.perf_counter() - t0)
    return module, spec, metrics
