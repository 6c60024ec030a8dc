"""Image loading and transforms shared by extraction, fine-tuning, evaluation and prediction.

One definition of preprocessing, driven by :class:`~pipeline.core.data.preprocess.Preprocess` (resolved from the
backbone), so the features cached at extraction and the images seen by the fine-tuned network are computed the same
way.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline.core.data.index import ImageLimits
from pipeline.core.data.preprocess import Preprocess
from pipeline.infra.config import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_IMAGE_PIXELS
from pipeline.infra.errors import PipelineError

if TYPE_CHECKING:
    from torchvision.transforms import InterpolationMode

log = logging.getLogger(__name__)


def _transforms():
    """torchvision.transforms, imported when a transform is built: importing torchvision takes ~1.6 s here, which
    what only reads an index (pipeline/core/data/index.py, the heads' stale-features check) should not pay."""
    from torchvision import transforms

    return transforms


def _interpolation(name: str) -> InterpolationMode:
    modes = _transforms().InterpolationMode
    return {"bilinear": modes.BILINEAR, "bicubic": modes.BICUBIC, "nearest": modes.NEAREST}[name]


class BadImageError(PipelineError, OSError):
    """An image file that cannot be used: undecodable, truncated, or over `data.max_image_pixels`.

    `reason` is the short text that prepare writes to skipped.csv; the message also names the file.
    """

    def __init__(self, source: str, reason: str | None = None):
        # One-argument form: DataLoader re-raises a worker's exception as `type(exc)(message)`; without it the
        # error would arrive as a bare RuntimeError instead of a PipelineError.
        super().__init__(source if reason is None else f"{source}: {reason}")
        self.source = source if reason is not None else ""
        self.reason = reason if reason is not None else source


def aspect_problem(width: int, height: int, limit: float) -> str | None:
    """Why an image of this size is refused for its aspect ratio, or None when it is within `limit`."""
    ratio = max(width, height) / max(min(width, height), 1)
    if ratio <= limit:
        return None
    return (f"extreme aspect ratio: {width}x{height} is {ratio:,.0f}:1, over data.max_aspect_ratio = {limit:g} (the "
            "resize would scale the short side up to a huge image); raise data.max_aspect_ratio to accept it")


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grey images as 8-bit: keeps the top 8 bits of the 16-bit range.

    Pillow's own conversion clips values above 255 (a 16-bit photo would come out nearly all white).
    """
    arr = np.asarray(im).astype(np.int64)
    return Image.fromarray((np.clip(arr, 0, 65535) >> 8).astype(np.uint8), mode="L")


def _exif_upright(im: Image.Image, name: str) -> Image.Image:
    """Applies the EXIF orientation tag, so rotated camera photos come out the way they are viewed."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # a corrupt EXIF block must not cost the image; the pixels are still fine
        log.warning("%s: EXIF orientation ignored (%s: %s)", name, type(exc).__name__, exc)
        return im


def load_rgb(source: Path | str | BinaryIO, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             max_aspect: float = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """Opens an image as 8-bit RGB, fully decoded, whatever the file's mode.

    First frame of animations (GIF), EXIF orientation applied, transparency (RGBA, LA, palette with a transparent
    colour) composited on white, 16-bit grey scaled to 8 bits, CMYK/grey/palette converted. Images of more than
    `max_pixels` pixels, or with a long side / short side over `max_aspect` (defaults: the params' defaults; stages
    pass their :class:`ImageLimits`), are refused from their header, before any pixel is decoded.

    Raises:
        BadImageError: the file is not an image PIL can decode (truncated, corrupt, empty, another format) or is
            over the limit; its `reason` says which.
    """
    name = str(source) if isinstance(source, (str, Path)) else str(getattr(source, "name", "<stream>"))
    limit, aspect_limit = int(max_pixels), float(max_aspect)
    if isinstance(source, (str, Path)) and Path(source).is_file() and Path(source).stat().st_size == 0:
        raise BadImageError(name, "empty file (0 bytes)")  # PIL would say "not in any image format"
    # PIL's own guard (warning above MAX_IMAGE_PIXELS, error above twice that) would fire before ours with a message
    # that does not name the param; keep it in step and let the explicit check below decide.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                _check_header(im, name, limit, aspect_limit)
                im.seek(0)
                im.load()  # decode every pixel here, so a truncated or corrupt file fails as such, not as EXIF
                return _to_rgb(_exif_upright(im, name))
    except BadImageError:
        raise
    except Image.DecompressionBombError:
        raise BadImageError(name, f"image too large: over twice data.max_image_pixels = {limit:,} pixels (a "
                                  "decompression-bomb guard); raise data.max_image_pixels to accept it") from None
    except UnidentifiedImageError:
        raise BadImageError(name, "unreadable image: not in any image format PIL can read") from None
    except Exception as exc:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, EOFError...)
        raise BadImageError(name, f"unreadable image: {type(exc).__name__}: {exc}") from None


def _check_header(im: Image.Image, name: str, max_pixels: int, max_aspect: float) -> None:
    """Refuses an image from its header alone (size, aspect ratio), before any pixel is decoded."""
    width, height = im.size
    if width * height > max_pixels:
        raise BadImageError(name, _too_large(width, height, max_pixels))
    if (problem := aspect_problem(width, height, max_aspect)) is not None:
        raise BadImageError(name, problem)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded image: transparency composited on white, 16-bit grey scaled, other modes converted."""
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":
        im = _to_8bit_gray(im)
    return im.convert("RGB")


def _too_large(width: int, height: int, limit: int) -> str:
    return (f"image too large: {width}x{height} = {width * height:,} pixels is over data.max_image_pixels = "
            f"{limit:,} (a decompression-bomb guard); raise data.max_image_pixels to accept it")


def geometry(pre: Preprocess) -> list[Callable]:
    """Resize and crop to `pre.size`, as the weights' `crop_mode` says (timm's eval transforms):

    - `center`: shorter side to `pre.resize`, centre crop (most weights);
    - `squash`: both sides to `pre.resize` (aspect not kept), centre crop;
    - `border`: longer side to `pre.resize`, centre crop padded with the mean colour (the whole image is kept).
    """
    T = _transforms()
    interpolation = _interpolation(pre.interpolation)
    if pre.crop_mode == "squash":
        return [T.Resize((pre.resize, pre.resize), interpolation=interpolation), T.CenterCrop(pre.size)]
    if pre.crop_mode == "border":
        fill = tuple(round(255 * m) for m in pre.mean)
        return [_ResizeLonger(pre.resize, interpolation), _CenterCropOrPad(pre.size, fill)]
    return [T.Resize(pre.resize, interpolation=interpolation), T.CenterCrop(pre.size)]


class _ResizeLonger:
    """Resizes a PIL image so its longer side is `size`, keeping the aspect ratio."""

    def __init__(self, size: int, interpolation: InterpolationMode):
        self.size, self.interpolation = size, interpolation
        self._functional = _transforms().functional  # once here, not per image

    def __call__(self, im: Image.Image) -> Image.Image:
        scale = self.size / max(im.size)
        target = [max(1, round(im.size[1] * scale)), max(1, round(im.size[0] * scale))]  # (h, w)
        return self._functional.resize(im, target, interpolation=self.interpolation)


class _CenterCropOrPad:
    """Centre crop to `size`, padding a smaller image evenly with `fill` (timm's CenterCropOrPad)."""

    def __init__(self, size: int, fill: tuple[int, int, int]):
        self.size, self.fill = size, fill
        self._functional = _transforms().functional  # once here, not per image

    def __call__(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        if w < self.size or h < self.size:
            left, top = max(0, (self.size - w) // 2), max(0, (self.size - h) // 2)
            right, bottom = max(0, self.size - w - left), max(0, self.size - h - top)
            im = self._functional.pad(im, [left, top, right, bottom], fill=self.fill)
        return self._functional.center_crop(im, [self.size, self.size])


def eval_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """Resize and crop (:func:`geometry`), normalise: the weights' own eval preprocessing."""
    T = _transforms()
    return T.Compose([*geometry(pre), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def train_transform(pre: Preprocess, augment: str, crop_scale: float,
                    hflip: bool) -> Callable[[Image.Image], torch.Tensor]:
    """Augmentation for fine-tuning from a head fitted on eval-view features, and an optional flip.

    `shift` (the default): the eval view (resize, then a crop of `pre.size`) at a random position instead of the
    centre: same zoom and framing as the cached features, so the warm-started network starts where the head was fit.
    Measured on the digits: the head keeps 97.3 % train accuracy on such crops, against 76.5 % (loss 1.12 instead
    of 0.11) under `resized_crop`, whose first epochs then rewrite the body and drop val accuracy below the head's.
    `resized_crop`: RandomResizedCrop keeping at least `crop_scale` of the image (zoom and aspect change): stronger,
    for data sets large enough to learn from it.
    """
    T = _transforms()
    return T.Compose([*train_geometry(pre, augment, crop_scale, hflip), T.ToTensor(), T.Normalize(pre.mean, pre.std)])


def train_geometry(pre: Preprocess, augment: str, crop_scale: float, hflip: bool) -> list:
    """The PIL steps of :func:`train_transform` (PIL image in, PIL image of `pre.size` out, random from torch's
    RNG): what the cached augmented views (`extract.views`) apply before the extraction's own normalisation."""
    T = _transforms()
    if augment == "shift":  # the eval geometry, with the crop at a random position
        steps = geometry(pre)
        steps[-1] = T.RandomCrop(pre.size, pad_if_needed=True, fill=tuple(round(255 * m) for m in pre.mean))
    else:
        interpolation = _interpolation(pre.interpolation)
        steps = [T.RandomResizedCrop(pre.size, scale=(crop_scale, 1.0), interpolation=interpolation)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    return steps


class ImageDataset(Dataset):
    """(image tensor, label, row id) for a list of index rows, read relative to `root`.

    With `seed`, each sample's random augmentation is seeded from (seed, epoch, row id), so the images a model
    trains on do not depend on how many DataLoader workers there are or which worker loads which sample.
    """

    def __init__(self, root: Path | str, rows: Sequence[dict], transform: Callable[[Image.Image], torch.Tensor],
                 seed: int | None = None, limits: ImageLimits = ImageLimits()):
        self.root = Path(root)
        self.rows = list(rows)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.limits = limits

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (workers are re-created per epoch and copy the new value)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        row = self.rows[i]
        image = load_rgb(self.root / row["path"], self.limits.max_pixels, self.limits.max_aspect)
        if self.seed is None:
            return self.transform(image), int(row["label"]), int(row["id"])
        # fork_rng: with 0 workers this runs in the training process, whose RNG (dropout) must stay untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(row["id"]))
            return self.transform(image), int(row["label"]), int(row["id"])
