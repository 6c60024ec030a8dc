"""Eval-time preprocessing as data: the crop size, resize, normalisation and crop mode a backbone's weights expect.

A leaf of the data layer: image transforms (pipeline/core/data/images.py) apply it, backbones
(pipeline/core/models/preprocessing.py) resolve it, the features file and head.json record it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocess:
    """Eval-time preprocessing: resize to `resize` and crop `size` as `crop_mode` says, normalise."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # 'bilinear' | 'bicubic' | 'nearest'
    crop_mode: str = "center"  # timm's: center | squash | border (pipeline/core/data/images.py:geometry)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | str) -> "Preprocess":
        """Inverse of :meth:`to_dict`, also from its JSON string (as stored in HDF5 attributes and head.json)."""
        d = json.loads(d) if isinstance(d, str) else d
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})
