"""The HDF5 feature cache: layout, fingerprint attributes, and reading it back.

Layout (one group per split present in the index)::

    /<split>/avg     (N, C)  global average pooling of the backbone's last feature map
    /<split>/max     (N, C)  global max pooling of the same map
    /<split>/labels  (N,)    int64 class index into the `classes` attribute
    /<split>/ids     (N,)    int64 row id in data/prepared/index.csv

Concat pooling is `cat(avg, max)` (timm's `catavgmax` order, not fastai's max-first); the MLP head and the
fine-tuned network use the same order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

POOLINGS = ("avg", "catavgmax")


@dataclass
class SplitFeatures:
    avg: np.ndarray
    max: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def inputs(self, pooling: str) -> np.ndarray:
        """Head inputs for a pooling: `avg` (C) or `catavgmax` = [avg, max] (2C), as float32."""
        if pooling == "avg":
            return self.avg.astype(np.float32)
        if pooling == "catavgmax":
            return np.concatenate([self.avg, self.max], axis=1).astype(np.float32)
        raise ValueError(f"unknown pooling '{pooling}'; choose one of {POOLINGS}")


def read_attrs(path: Path | str) -> dict:
    """The fingerprint attributes of a features file, JSON strings decoded."""
    with h5py.File(path, "r") as f:
        return {k: _decode(v) for k, v in f.attrs.items()}


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_split(path: Path | str, split: str) -> SplitFeatures | None:
    """Loads one split into memory, or None when the file has no such split."""
    with h5py.File(path, "r") as f:
        if split not in f:
            return None
        g = f[split]
        return SplitFeatures(avg=g["avg"][...], max=g["max"][...], labels=g["labels"][...], ids=g["ids"][...])


def splits_in(path: Path | str) -> list[str]:
    with h5py.File(path, "r") as f:
        return [s for s in ("train", "val", "test") if s in f]
