"""The stale-features check: is a features file what extraction with the current params (and index) would write?

Apart from the cache's I/O (pipeline/core/features/cache.py) because it needs the params' meaning: the backbone's
preprocessing (pipeline/core/models/preprocessing.py) and the index's image sizes (pipeline/core/data/index.py),
never the backbone's weights or the images themselves. Stages that only read the cache (heads, search, finetune's
parity check) call :func:`verify_features` before any work.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from pipeline.core.features.cache import RERUN, StaleFeaturesError, canonical_json, read_attrs
from pipeline.core.models.feature_sets import FEATURE_SETS

log = logging.getLogger(__name__)


# What each checked attribute follows in params.yaml, for messages that say what to look at.
_SOURCE_OF = {"backbone": "backbone.name", "weights": "backbone.weights",
              "preprocess": "backbone.name / backbone.image_size (auto: the train images' sizes)",
              "precision": "extract.precision", "dtype": "extract.dtype", "decode": "extract.decode",
              "index_sha256": "the dataset index (index.csv)",
              "feature_sets": "the pipeline's cache layout (this file predates the cached pre_logits)"}


def expected_fingerprint(backbone, extract, index_dir: Path | str | None = None,
                         data_cfg: dict | None = None) -> dict[str, Any]:
    """The fingerprint attributes that extraction with these params would write (weights hash aside).

    Cheap: no weights are loaded (the preprocessing is resolved from the architecture's config). The index hash is
    included only when `index_dir` holds an index.csv. `backbone.image_size` must be resolved (not `auto`): see
    :func:`resolve_for_check`. `data_cfg`: the architecture's data config when known (:func:`recorded_data_cfg`).
    """
    from pipeline.core.models.preprocessing import resolve_preprocess
    from pipeline.infra.artifacts import sha256_file

    expected: dict[str, Any] = {"backbone": backbone.name, "weights": backbone.weights,
                                "precision": extract.precision, "dtype": extract.dtype,
                                "feature_sets": ",".join(FEATURE_SETS)}
    if getattr(extract, "decode", None) is not None:  # decode path: PIL or a JPEG decoder, not bitwise the same
        expected["decode"] = extract.decode
    expected["preprocess"] = resolve_preprocess(backbone, data_cfg).to_dict()
    if index_dir is not None and (Path(index_dir) / "index.csv").is_file():
        expected["index_sha256"] = sha256_file(Path(index_dir) / "index.csv")
    return expected


def check_fingerprint(path: Path | str, attrs: dict, expected: dict) -> None:
    """Raises StaleFeaturesError naming the first attribute whose recorded value differs from `expected`."""
    for key, want in expected.items():
        have = attrs.get(key)
        if canonical_json(have) != canonical_json(want):
            detail = ""
            if isinstance(have, dict) and isinstance(want, dict):
                diff = sorted(k for k in set(have) | set(want)
                              if canonical_json(have.get(k)) != canonical_json(want.get(k)))
                detail = " (" + ", ".join(f"{k}: {have.get(k)!r} vs {want.get(k)!r}" for k in diff) + ")"
            raise StaleFeaturesError(
                f"{path} is stale: its attribute '{key}' is {have!r}, but {_SOURCE_OF.get(key, key)} now gives "
                f"{want!r}{detail}. The features were extracted with other settings; {RERUN}")


def recorded_data_cfg(attrs: dict, name: str) -> dict | None:
    """The architecture data config extraction recorded (`data_cfg`), when it is what timm or torchvision would
    give backbone `name` here: the same name and the same timm and torchvision versions. None otherwise, and for
    `hf-hub:` / `local-dir:` names, whose config is read from files that can change under the same name.

    Why: rebuilding it imports timm and torchvision (~2 s), which a heads or select stage would pay only for this check.
    """
    from importlib import metadata

    data_cfg, versions = attrs.get("data_cfg"), attrs.get("versions")  # as read_attrs decodes them
    if attrs.get("backbone") != name or ":" in name or not isinstance(data_cfg, dict) or not isinstance(versions, dict):
        return None
    try:
        for library in ("timm", "torchvision"):
            if str(versions.get(library, "")).split("+")[0] != metadata.version(library).split("+")[0]:
                return None
    except metadata.PackageNotFoundError:
        return None
    return data_cfg


def resolve_for_check(backbone, index_dir: Path | str | None, attrs: dict) -> tuple[Any, str]:
    """`backbone` with `image_size` resolved as extraction resolved it, and why, for checking a features file.

    With the index's image sizes (classes.json), `auto` is resolved exactly as extraction does. Without them (a heads
    run given no index) the images are unknown: the features' own size is accepted when it is one `auto` can give
    (the weights' own, or a multiple of 32 from 96 below it), and the rest of the preprocessing (resize, mean, std,
    interpolation) is still compared; any other size is compared with the weights' own, and so reported stale.
    """
    from pipeline.core.data.index import read_image_sizes
    from pipeline.core.models.preprocessing import auto_sizes, native_size, resolve_image_size

    sizes = read_image_sizes(index_dir) if index_dir is not None else None
    data_cfg = recorded_data_cfg(attrs, backbone.name)
    if backbone.image_size != "auto" or sizes is not None:
        return resolve_image_size(backbone, sizes, data_cfg)
    native = native_size(backbone.name, data_cfg)
    pre = attrs.get("preprocess")
    recorded = pre.get("size") if isinstance(pre, dict) else None
    if recorded in auto_sizes(native):
        return (dataclasses.replace(backbone, image_size=recorded),
                f"backbone.image_size: auto, no index to read the train images' sizes from; the features' "
                f"{recorded} px is a size auto gives for these weights")
    return (dataclasses.replace(backbone, image_size=native),
            "backbone.image_size: auto, no index to read the train images' sizes from; compared with the weights' own")


def verify_features(path: Path | str, backbone, extract, index_dir: Path | str | None = None) -> dict:
    """Checks the features file against the current params (and index); returns its attributes.

    `backbone` and `extract` are the params' BackboneConfig and ExtractConfig; `backbone.image_size: auto` is
    resolved from the index's image sizes (:func:`resolve_for_check`), and the size used is logged.
    """
    attrs = read_attrs(path)
    resolved, why = resolve_for_check(backbone, index_dir, attrs)
    if backbone.image_size != resolved.image_size:  # a rule (auto, null) was resolved: say to what
        log.info("stale-features check: image size %d px (%s)", resolved.image_size, why)
    check_fingerprint(path, attrs, expected_fingerprint(resolved, extract, index_dir,
                                                        recorded_data_cfg(attrs, backbone.name)))
    return attrs
