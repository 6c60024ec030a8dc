"""Typed parameters: one frozen dataclass per `params.yaml` section.

Every stage reads its own section(s) through :func:`load_section`, which rejects unknown keys, wrong types and
out-of-range values before any work starts, naming the offending key (``heads.mlp.hiden``) and what is allowed.
Every float must be finite (NaN and inf slip through range checks and end as silent garbage or a traceback), and
sizes have upper bounds (the ``MAX_*`` constants below: e.g. 65,536 hidden units or batch rows, 100,000 epochs).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from pipeline.infra.errors import PipelineError

PARAMS_FILE = Path("params.yaml")

# PIL's own hard limit (twice its warning threshold Image.MAX_IMAGE_PIXELS): about 13,400 x 13,400 pixels, ~537 MB
# decoded as RGB. Far above any photo a classifier needs, far below what exhausts a worker's memory.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Long side / short side above which an image is refused from its header. The resize scales the short side up to
# the crop's resize size, so a 1 x 100,000 PNG of 475 bytes would become a 109 x 10.9 M image (6 GB at 96 px).
# Phone panoramas reach about 10:1; nothing a classifier is trained on is near 20:1.
DEFAULT_MAX_ASPECT_RATIO = 20.0
MAX_ASPECT_RATIO_LIMIT = 10_000.0


# Upper bounds on sizes: far above anything useful on one machine, low enough that a typo (an extra zero or three)
# is refused before it becomes an allocation traceback or a run that never ends.
MAX_HIDDEN = 65_536          # units in one MLP layer: 65536 x 2560 inputs is already 670 M weights
MAX_BATCH_SIZE = 65_536      # images or feature rows per step
MAX_EPOCHS = 100_000
MAX_ITER = 10_000_000        # LogisticRegression solver iterations
MAX_REFINE = 20              # logreg C refinement steps: 20 halvings of a decade reach C to 1e-6 of its log
MAX_NEIGHBOURS = 10_000      # kNN's k: DINOv2 goes to 200; each query keeps k similarities per step
MAX_WORKERS = 256            # DataLoader processes
MAX_CHECKPOINT_ROWS = 10_000_000
MAX_MEMORY_GB = 1_000_000.0  # in_memory_gb, store_max_gb: a terabyte-scale machine is far below; a typo (1e9) is refused
MAX_SEED = 2**32 - 1         # numpy's seed range
MAX_VIEWS = 1_000            # cached augmented views per train image (DINOv2's linear eval sees ~10-100 per image)
MAX_IMAGE_PIXELS_LIMIT = 2**31 - 1  # PIL's own hard ceiling for one image (int32 pixel count)


def _speed(default: Any) -> Any:
    """A field that changes only how fast a stage runs, never its output: dvc.yaml does not list it."""
    return dataclasses.field(default=default, metadata={"speed_only": True})


def _views_key(default: Any) -> Any:
    """A field that changes only the augmented views file (dvc.yaml's `extract_views`), not the plain features."""
    return dataclasses.field(default=default, metadata={"output": "views"})


class ConfigError(PipelineError, ValueError):
    """A params.yaml value that cannot be used; the message names the key and what to write instead."""


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        raise ConfigError(f"{key} = {value!r} is out of range; allowed: {'(' if low_open else '['}{lo}, {hi}"
                          f"{')' if high_open else ']'}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from, how they are split when the folder has no train/val/test subfolders, and what
    happens to files that cannot be used.

    `max_image_pixels` (width x height) is the decompression-bomb guard: larger images are skipped by prepare (and
    refused when loaded later). `max_aspect_ratio` (long side / short side, at most 10,000) bounds what the resize
    makes of an image: checked from the header like the pixel limit, before any pixel is decoded.
    `follow_links`: which symlinked folders and files prepare follows: `inside` (only those leading to something under
    `source`, which DVC sees), `all`, or `none`; the others are listed in skipped.csv. /, /proc, /sys, /dev and /run are never
    scanned, and `source` may not be one of them. `on_bad_file`: `skip` lists unusable files in skipped.csv and goes on; `error` makes
    prepare fail when there is any (hidden files such as .DS_Store are listed in skipped.csv but never an error).
    `scan_cache` (speed only): a file whose size, mtime, ctime and inode are unchanged since the last prepare is not
    read again (pipeline/core/data/scan_cache.py); `auto` is `scan_cache.json` beside the index folder, null turns it off.
    """

    source: str = "data/digits"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    on_bad_file: Literal["skip", "error"] = "skip"
    follow_links: Literal["inside", "all", "none"] = "inside"
    scan_cache: str | None = _speed("auto")

    def validate(self, prefix: str) -> None:
        if not self.source.strip():
            raise ConfigError(f"{prefix}.source is empty; give the path of an ImageFolder root")
        _check_range(f"{prefix}.max_image_pixels", self.max_image_pixels, 1, MAX_IMAGE_PIXELS_LIMIT)
        _check_range(f"{prefix}.seed", self.seed, 0, MAX_SEED)
        _check_range(f"{prefix}.max_aspect_ratio", self.max_aspect_ratio, 1.0, MAX_ASPECT_RATIO_LIMIT)
        _check_range(f"{prefix}.val_fraction", self.val_fraction, 0.0, 1.0, low_open=True)
        _check_range(f"{prefix}.test_fraction", self.test_fraction, 0.0, 1.0)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(f"{prefix}.val_fraction + {prefix}.test_fraction must be < 1 "
                              f"(got {self.val_fraction} + {self.test_fraction}); train needs images too")


IMAGE_SIZE_RANGE = (16, 4096)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The frozen pretrained network and its preprocessing.

    `weights` is `bundled` (offline ImageNet EfficientNet-Lite0), `hub` (timm/torchvision download) or a file path.
    `image_size` is the crop size: `auto` (the weights' own, smaller only for images much smaller than it; see
    pipeline/core/models/backbone.py, `auto_image_size`), null (the weights' own) or a number of pixels. The resize keeps
    the weights' crop fraction. `auto` is resolved from the train images' sizes that prepare records.
    """

    name: str = "tf_efficientnet_lite0"
    weights: str = "bundled"
    image_size: Union[int, Literal["auto"], None] = dataclasses.field(
        default="auto", metadata={"allowed": f"an integer in [{IMAGE_SIZE_RANGE[0]}, {IMAGE_SIZE_RANGE[1]}] "
                                             "(pixels), null (the weights' own size) or auto"})

    def validate(self, prefix: str) -> None:
        if isinstance(self.image_size, int):
            _check_range(f"{prefix}.image_size", self.image_size, *IMAGE_SIZE_RANGE)


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    """How extraction runs. Only `precision`, `dtype` and `decode` change the output; the rest is speed.

    `decode`: `pil` (PIL decode and resize in the DataLoader workers, any format) or the JPEG route (JPEGs decoded
    by nvJPEG on a GPU, libjpeg-turbo on a CPU, resized on the device; other formats and refused files through PIL):
    `jpeg` decodes with TorchCodec where it works, else with `torchvision.io.decode_jpeg` (any torch >= 2.4), and
    records which; `torchcodec` and `torchvision` force that decoder (`torchvision` was an alias of `torchcodec`).
    `checkpoint_rows`: rows per resume checkpoint; a killed run loses at most this many rows per process.
    `store`: folder of the feature store (pipeline/core/features/store.py): rows already extracted with the same
    settings are reused by content hash, so a grown image folder sends only its new images through the backbone;
    `auto` is `feature_store/` beside the index folder (data/feature_store), shared by the main extraction and
    the sweep's; null turns it off. Outside DVC's outputs.
    `store_max_gb`: the store's size cap; after each extraction the least recently used settings (whole backbone /
    dtype / preprocessing folders) are removed until it fits (pipeline/core/features/store_space.py; null: no cap).
    `python -m pipeline.store` lists and removes settings.

    `views`: K seeded augmented views of every train image, extracted into a file of their own (dvc.yaml's
    `extract_views` stage, data/views.h5) through the same checkpoints and store, for heads that train on them
    (`heads.*.views`; val and test keep the plain view). The augmentation is the fine-tune's own
    (:func:`pipeline.core.data.images.train_transform`): `views_augment`, `views_hflip`, `views_crop_scale` as
    `finetune.augment` / `hflip` / `crop_scale`; `views_seed` seeds every view from (seed, view, image content).
    The plain features file never depends on these keys.
    """

    precision: Literal["fp32", "bf16"] = "fp32"
    dtype: Literal["float32", "float16"] = "float32"
    decode: Literal["pil", "jpeg", "torchcodec", "torchvision"] = "pil"
    batch_size: int = _speed(64)
    workers: int = _speed(2)
    checkpoint_rows: int = _speed(1024)
    device: str = _speed("auto")
    store: str | None = _speed("auto")
    store_max_gb: float | None = _speed(20.0)
    views: int = _views_key(0)
    views_seed: int = _views_key(0)
    views_augment: Literal["shift", "resized_crop"] = _views_key("shift")
    views_hflip: bool = _views_key(False)
    views_crop_scale: float = _views_key(0.7)

    def validate(self, prefix: str) -> None:
        _check_range(f"{prefix}.views", self.views, 0, MAX_VIEWS)
        _check_range(f"{prefix}.views_seed", self.views_seed, 0, MAX_SEED)
        _check_range(f"{prefix}.views_crop_scale", self.views_crop_scale, 0.0, 1.0, low_open=True)
        if self.store_max_gb is not None:
            _check_range(f"{prefix}.store_max_gb", self.store_max_gb, 0.0, MAX_MEMORY_GB, low_open=True)
        _check_range(f"{prefix}.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_range(f"{prefix}.workers", self.workers, 0, MAX_WORKERS)
        _check_range(f"{prefix}.checkpoint_rows", self.checkpoint_rows, 1, MAX_CHECKPOINT_ROWS)


_CLASS_WEIGHT = dataclasses.field(default=None, metadata={"allowed": "null (every image counts once) or balanced"})


@dataclasses.dataclass(frozen=True)
class LogregConfig:
    """Standardised features + L2 multinomial logistic regression; C is picked on val from the list.

    `pooling: auto` = `avg` for feature-map backbones (CNNs, Swin), `pre_logits` for token backbones (ViT, DINOv2,
    CLIP, SigLIP, EVA); see pipeline/core/features/cache.py:auto_pooling.

    `solver`: `sklearn` (StandardScaler + LogisticRegression, the reference), `torch` (the same objective by
    L-BFGS in float32, warm-started along C, GPU when present, streamed from HDF5 when the features exceed
    `in_memory_gb`), or `auto` (scikit-learn for small data, torch above ~20 M feature values). `tol`: both solvers
    stop when the largest gradient component is below it. `class_weight: balanced` weighs each class by
    n / (K n_k). `device` and `in_memory_gb` are speed only (results agree within the solver's tolerance).

    The linear-probe protocol of the papers, both off by default: `refine` > 0 refines the C grid around the best C
    (CLIP's protocol: each step fits the log-midpoints between the best C and its neighbours among the Cs tried,
    at most 2 new fits, instead of a second full sweep); `refit: true` then refits at the chosen C on train + val
    (torchgeo-bench and most linear-probe papers). After a refit the saved model has seen val: the val metrics
    reported stay those of the train-only fit that chose C (pipeline/core/heads/logreg.py).
    """

    C: list[float] = dataclasses.field(default_factory=lambda: [0.01, 0.1, 1.0])
    max_iter: int = 2000
    pooling: Literal["auto", "avg", "catavgmax", "pre_logits"] = "auto"
    solver: Literal["auto", "sklearn", "torch"] = "auto"
    tol: float = 1e-4
    class_weight: Optional[Literal["balanced"]] = _CLASS_WEIGHT
    device: str = _speed("auto")
    in_memory_gb: float = _speed(4.0)
    refine: int = 0
    refit: bool = False
    views: int = 0

    def validate(self, prefix: str) -> None:
        _check_range(f"{prefix}.views", self.views, 0, MAX_VIEWS)
        _check_range(f"{prefix}.refine", self.refine, 0, MAX_REFINE)
        if not self.C:
            raise ConfigError(f"{prefix}.C must list at least one value")
        for c in self.C:
            _check_range(f"{prefix}.C", c, 0.0, low_open=True)
        _check_range(f"{prefix}.max_iter", self.max_iter, 1, MAX_ITER)
        _check_range(f"{prefix}.tol", self.tol, 0.0, 1.0, low_open=True)
        _check_range(f"{prefix}.in_memory_gb", self.in_memory_gb, 0.0, MAX_MEMORY_GB)


@dataclasses.dataclass(frozen=True)
class MlpConfig:
    """Torch head of BN-Dropout-Linear-ReLU blocks, early-stopped on val; `pooling: auto` = concat [avg, max] for
    feature-map backbones (CNNs, Swin), `pre_logits` for token backbones (ViT, DINOv2, CLIP, SigLIP, EVA).

    `class_weight: balanced` weighs the loss by n / (K n_k) per class. `device` (auto: the GPU when present) and
    `in_memory_gb` (above it, mini-batches are read from the HDF5 file in shuffled blocks) are speed only.
    """

    hidden: list[int] = dataclasses.field(default_factory=lambda: [512])
    pooling: Literal["auto", "avg", "catavgmax", "pre_logits"] = "auto"
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    epochs: int = 100
    patience: int = 10
    seed: int = 0
    class_weight: Optional[Literal["balanced"]] = _CLASS_WEIGHT
    device: str = _speed("auto")
    in_memory_gb: float = _speed(4.0)
    views: int = 0

    def validate(self, prefix: str) -> None:
        _check_range(f"{prefix}.views", self.views, 0, MAX_VIEWS)
        _check_range(f"{prefix}.in_memory_gb", self.in_memory_gb, 0.0, MAX_MEMORY_GB)
        for h in self.hidden:
            _check_range(f"{prefix}.hidden", h, 1, MAX_HIDDEN)
        _check_range(f"{prefix}.dropout", self.dropout, 0.0, 1.0)
        if self.dropout >= 1.0:
            raise ConfigError(f"{prefix}.dropout must be < 1 (got {self.dropout})")
        _check_range(f"{prefix}.lr", self.lr, 0.0, low_open=True)
        _check_range(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _check_range(f"{prefix}.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_range(f"{prefix}.epochs", self.epochs, 1, MAX_EPOCHS)
        _check_range(f"{prefix}.patience", self.patience, 1, MAX_EPOCHS)
        _check_range(f"{prefix}.seed", self.seed, 0, MAX_SEED)


@dataclasses.dataclass(frozen=True)
class KnnConfig:
    """k-nearest-neighbour vote on L2-normalised features (DINOv2's kNN evaluation; pipeline/core/heads/knn.py).

    Each of the k most cosine-similar train rows votes for its class with weight exp(sim / T). `k` lists one or
    more values (DINOv2 reports 10, 20, 100, 200): with several, the best on val accuracy is kept (ties: the smaller
    k). `T` is the temperature (0.07 in DINOv2; a very large T gives every neighbour the same vote). `pooling: auto`
    as logreg's (avg for feature maps, pre_logits for token backbones). `device` is speed only.
    """

    k: list[int] = dataclasses.field(default_factory=lambda: [20])
    T: float = 0.07
    pooling: Literal["auto", "avg", "catavgmax", "pre_logits"] = "auto"
    device: str = _speed("auto")
    views: int = 0

    def validate(self, prefix: str) -> None:
        _check_range(f"{prefix}.views", self.views, 0, MAX_VIEWS)
        if not self.k:
            raise ConfigError(f"{prefix}.k must list at least one value")
        for k in self.k:
            _check_range(f"{prefix}.k", k, 1, MAX_NEIGHBOURS)
        _check_range(f"{prefix}.T", self.T, 0.0, low_open=True)


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    logreg: LogregConfig = dataclasses.field(default_factory=LogregConfig)
    mlp: MlpConfig = dataclasses.field(default_factory=MlpConfig)
    knn: KnnConfig = dataclasses.field(default_factory=KnnConfig)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Whole-network fine-tuning warm-started from the selected head (LP-FT); see pipeline/core/finetune/optim.py for `bn`.

    Learning rates: head `lr`, body `body_lr_ratio` x `lr`, and with `layer_decay` < 1 each body layer below the top
    a further factor `layer_decay` lower. `freeze_epochs`: a first phase training only the head (and BatchNorm under
    `bn: train`). `patience`: stop after this many epochs without a better val result (0: never).
    `warm_start: false` starts from a randomly initialised head instead (for comparisons; no parity check).
    `ema_decay` > 0: validate and save an exponential moving average of the weights; `swa_start` > 0: the uniform
    average of the weights from this fraction of the steps on (pipeline/core/finetune/averaging.py); not both.
    `select`: which epoch's weights are kept: best val `accuracy` (ties: lower loss), lowest val `loss`, or the
    `last` epoch's (unless the warm start scores better on val): no pick among noisy val scores.
    """

    epochs: int = 8
    lr: float = 1e-3
    body_lr_ratio: float = 0.1
    layer_decay: float = 1.0
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "onecycle"] = "cosine"
    warmup_epochs: float = 0.5
    freeze_epochs: int = 0
    patience: int = 0
    batch_size: int = 32
    bn: Literal["frozen", "eval", "train"] = "eval"
    augment: Literal["shift", "resized_crop"] = "shift"
    hflip: bool = False
    crop_scale: float = 0.7
    clip_grad_norm: float = 1.0
    ema_decay: float = 0.0
    swa_start: float = 0.5
    select: Literal["accuracy", "loss", "last"] = "last"
    precision: Literal["fp32", "bf16"] = "fp32"
    sync_bn: bool = False
    warm_start: bool = True
    workers: int = _speed(2)
    seed: int = 0
    parity_atol: float = 1e-3
    parity_max_flips: float = 0.01
    device: str = _speed("auto")

    def validate(self, prefix: str) -> None:
        _check_range(f"{prefix}.epochs", self.epochs, 0, MAX_EPOCHS)
        _check_range(f"{prefix}.lr", self.lr, 0.0, low_open=True)
        _check_range(f"{prefix}.body_lr_ratio", self.body_lr_ratio, 0.0)
        _check_range(f"{prefix}.layer_decay", self.layer_decay, 0.0, 1.0, low_open=True)
        _check_range(f"{prefix}.freeze_epochs", self.freeze_epochs, 0, MAX_EPOCHS)
        _check_range(f"{prefix}.patience", self.patience, 0, MAX_EPOCHS)
        _check_range(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _check_range(f"{prefix}.warmup_epochs", self.warmup_epochs, 0.0, MAX_EPOCHS)
        _check_range(f"{prefix}.batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_range(f"{prefix}.crop_scale", self.crop_scale, 0.0, 1.0, low_open=True)
        _check_range(f"{prefix}.clip_grad_norm", self.clip_grad_norm, 0.0)
        _check_range(f"{prefix}.ema_decay", self.ema_decay, 0.0, 0.9999)
        _check_range(f"{prefix}.swa_start", self.swa_start, 0.0, 1.0, high_open=True)
        if self.ema_decay > 0 and self.swa_start > 0:
            raise ConfigError(f"{prefix}.ema_decay ({self.ema_decay:g}) and {prefix}.swa_start ({self.swa_start:g}) "
                              "are two ways of averaging the weights: set one of them to 0")
        if self.select == "last" and self.patience:
            raise ConfigError(f"{prefix}.patience ({self.patience}) stops at the best val epoch, which "
                              f"{prefix}.select: last does not keep: set patience to 0 or select to accuracy or loss")
        _check_range(f"{prefix}.workers", self.workers, 0, MAX_WORKERS)
        _check_range(f"{prefix}.seed", self.seed, 0, MAX_SEED)
        _check_range(f"{prefix}.parity_atol", self.parity_atol, 0.0, low_open=True)
        _check_range(f"{prefix}.parity_max_flips", self.parity_max_flips, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The backbone sweep (opt-in): extract and every head for each backbone listed (a DVC `matrix`), then one
    comparison with the main backbone, whose row comes from the main pipeline (no second extraction).

    `backbones`: timm or torchvision names other than `backbone.name` (no `hf-hub:` or `local-dir:`: they become
    folder names); empty (the default): only the main backbone is compared, and nothing more is extracted.
    `weights`: for every one of them (`bundled` covers the three EfficientNet-Lite; changing it reruns them all).
    The other params (image size, extract, heads) are the pipeline's own.
    """

    backbones: list[str] = dataclasses.field(default_factory=list)
    weights: str = "bundled"

    def validate(self, prefix: str) -> None:
        if len(set(self.backbones)) != len(self.backbones):
            raise ConfigError(f"{prefix}.backbones lists a backbone twice")
        for name in self.backbones:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise ConfigError(f"{prefix}.backbones: '{name}' is not a plain model name (letters, digits, _ . -): "
                                  "each one names its folders under data/sweep/")


MAX_SHOTS = 10_000       # few-shot: train images per class in one episode
MAX_EPISODES = 10_000    # few-shot: episodes per number of shots (each fits three probes)


@dataclasses.dataclass(frozen=True)
class FewshotConfig:
    """Few-shot episodes on the feature cache (pipeline/core/heads/fewshot.py): for each k of `shots`, `episodes`
    draws of k train images per class, three probes fitted on each draw and scored on the whole of val and test.

    `seed` seeds the draws (each episode's own seed is derived from it and recorded in metrics/fewshot.json).
    `pooling`: the cached features every probe reads (`auto`: logreg's choice, avg for feature maps and pre_logits
    for token backbones). Probes: logistic regression on standardised features with one fixed `C` (no C search: a
    k-shot protocol has no val set of its own to pick it on; `max_iter` bounds its solver), DINOv2's weighted kNN
    with `knn_k` neighbours (at most the episode's k x classes rows) and temperature `knn_T`, and the nearest class
    mean (cosine, no settings). A k above the smallest class's train count is skipped, with a log line.
    """

    shots: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8, 16])
    episodes: int = 10
    seed: int = 0
    pooling: Literal["auto", "avg", "catavgmax", "pre_logits"] = "auto"
    C: float = 1.0
    max_iter: int = 1000
    knn_k: int = 20
    knn_T: float = 0.07

    def validate(self, prefix: str) -> None:
        if not self.shots:
            raise ConfigError(f"{prefix}.shots must list at least one value")
        if len(set(self.shots)) != len(self.shots):
            raise ConfigError(f"{prefix}.shots lists a value twice: {self.shots}")
        for k in self.shots:
            _check_range(f"{prefix}.shots", k, 1, MAX_SHOTS)
        # the 95 % interval is a t-interval over episodes: it needs at least two
        _check_range(f"{prefix}.episodes", self.episodes, 2, MAX_EPISODES)
        _check_range(f"{prefix}.seed", self.seed, 0, MAX_SEED)
        _check_range(f"{prefix}.C", self.C, 0.0, low_open=True)
        _check_range(f"{prefix}.max_iter", self.max_iter, 1, MAX_ITER)
        _check_range(f"{prefix}.knn_k", self.knn_k, 1, MAX_NEIGHBOURS)
        _check_range(f"{prefix}.knn_T", self.knn_T, 0.0, low_open=True)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "extract": ExtractConfig,
    "heads": HeadsConfig,
    "finetune": FinetuneConfig,
    "sweep": SweepConfig,
    "fewshot": FewshotConfig,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, allowed: str | None = None) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted where floats are expected.

    A union takes the first alternative that accepts the value; when none does, the message lists `allowed` (the
    field's own wording, from its metadata) or else the alternatives' type names.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and allowed is None:
            return _coerce(key, value, inner[0])
        for alternative in inner:
            try:
                return _coerce(key, value, alternative)
            except ConfigError:
                continue
        if allowed is None:
            names = [", ".join(map(repr, typing.get_args(a))) if typing.get_origin(a) is Literal else _type_name(a)
                     for a in args]
            allowed = " or ".join(names)
        raise ConfigError(f"{key} = {value!r} is not allowed; allowed: {allowed}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_type_name(args[0])}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float:
        return _coerce_float(key, value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: `1e-3`, `5E-4`, `1.5e2` are numbers, as DVC (YAML 1.2) reads
    params.yaml and as DVC writes a `-S` value back (Python's repr: `1e-05`). PyYAML's YAML 1.1 wants a decimal point
    and a signed exponent and reads the rest as strings, so the stages and `dvc params diff` would disagree."""


ParamsLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: PyYAML's own loaders are unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))

# A number in quotes: a string to every YAML reader, though a person meant the number.
_NUMBER_LIKE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce_float(key: str, value: Any) -> float:
    """A finite float from an int or float; NaN, inf and quoted numbers are refused with what to write.

    NaN and inf pass every ``<``/``>`` range check (NaN compares false to everything), so they are refused here, once
    for every float key.
    """
    if isinstance(value, str) and _NUMBER_LIKE.match(value.strip()):
        raise ConfigError(f"{key} = {value!r} is a string (in quotes); write the number without quotes: "
                          f"{value.strip()}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r} is not a finite number; write a finite value (NaN and inf are not allowed)")
    return float(value)


def build(cls: type, raw: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from the mapping `raw`, validating every key under the dotted name `prefix`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}.{key}' in params.yaml{hint}; allowed keys: {', '.join(names)}")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key], fields[key].metadata.get("allowed"))
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def read_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """Reads params.yaml and checks that every top-level section is known."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the repository root or pass --params")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=ParamsLoader) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path} is not valid YAML{at}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections")
    for key in raw:
        if key not in SECTIONS:
            close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown section '{key}' in {path}{hint}; allowed: {', '.join(SECTIONS)}")
    return raw


def load_section(name: str, path: Path | str = PARAMS_FILE) -> Any:
    """Returns the typed config of one params.yaml section, defaults filled in.

    Every section of the file is validated, not just `name`: a typo in `finetune` stops `prepare` at once, instead
    of surfacing hours later when the stage that reads it finally runs.
    """
    raw = read_params(path)
    built = {section: build(cls, raw.get(section), section) for section, cls in SECTIONS.items()}
    return built[name]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config, for JSON records."""
    return dataclasses.asdict(cfg)


def output_keys(section: str, output: str = "main") -> list[str]:
    """Dotted keys of a section (or subsection such as ``heads.mlp``) that change a stage's output.

    Speed-only keys are left out: these are exactly the keys a stage lists under `params` in dvc.yaml. `output`:
    `main` (the section's own stage), or `views`: the `extract.views*` keys, which change only the views file.
    """
    marks = {key: mark for key, mark in _output_marks(section)}
    return [key for key, _, speed in _fields(section) if not speed and marks.get(key, "main") == output]


def _output_marks(section: str) -> list[tuple[str, str]]:
    """(dotted key, the output it changes) for the top-level fields of a section marked with one."""
    cls = SECTIONS[section.split(".")[0]]
    for name in section.split(".")[1:]:
        cls = typing.get_type_hints(cls)[name]
    return [(f"{section}.{f.name}", f.metadata["output"]) for f in dataclasses.fields(cls) if "output" in f.metadata]


def _fields(section: str) -> list[tuple[str, Any, bool]]:
    """(dotted key, default, speed-only) for every leaf field of a section, in declaration order."""
    head, *rest = section.split(".")
    cls = SECTIONS[head]
    for name in rest:
        cls = typing.get_type_hints(cls)[name]
    out: list[tuple[str, Any, bool]] = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _fields(f"{section}.{f.name}")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out.append((f"{section}.{f.name}", default, bool(f.metadata.get("speed_only"))))
    return out


def defaults() -> dict[str, Any]:
    """The whole params file as the code's defaults: params.yaml must equal this (tests check every key)."""
    return {name: to_dict(cls()) for name, cls in SECTIONS.items()}


def params_help(sections: tuple[str, ...]) -> str:
    """The `--help` epilog listing a stage's params with their defaults; speed-only keys are marked."""
    lines = ["Params (params.yaml; defaults in parentheses; * = speed only, never changes the output):"]
    for section in sections:
        for key, default, speed in _fields(section):
            lines.append(f"  {key}{' *' if speed else ''} ({yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()})")
    return "\n".join(lines)
