"""Image loading and transforms shared by extraction, fine-tuning, evaluation and prediction.

One definition of preprocessing, driven by the backbone's :class:`~pipeline.backbone.Preprocess`, so the features
cached at extraction and the images seen by the fine-tuned network are computed the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms as T

from pipeline.backbone import Preprocess

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def load_rgb(path: Path | str) -> Image.Image:
    """Opens an image as RGB: first frame of animations, EXIF orientation applied, transparency on white."""
    with Image.open(path) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        if im.mode == "I;16" or im.mode == "I":
            im = im.point(lambda v: v / 256).convert("L")
        return im.convert("RGB")


def eval_transform(pre: Preprocess) -> Callable[[Image.Image], torch.Tensor]:
    """Resize shorter side, centre crop, normalise: the weights' own eval preprocessing."""
    return T.Compose([
        T.Resize(pre.resize, interpolation=_INTERPOLATION[pre.interpolation]),
        T.CenterCrop(pre.size),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


def train_transform(pre: Preprocess, crop_scale: float, hflip: bool) -> Callable[[Image.Image], torch.Tensor]:
    """Light augmentation for transfer: random resized crop (scale >= crop_scale) and an optional flip."""
    steps = [T.RandomResizedCrop(pre.size, scale=(crop_scale, 1.0), interpolation=_INTERPOLATION[pre.interpolation])]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


class ImageDataset(Dataset):
    """(image tensor, label, row id) for a list of index rows, read relative to `root`.

    With `seed`, each sample's random augmentation is seeded from (seed, epoch, row id), so the images a model
    trains on do not depend on how many DataLoader workers there are or which worker loads which sample.
    """

    def __init__(self, root: Path | str, rows: Sequence[dict], transform: Callable[[Image.Image], torch.Tensor],
                 seed: int | None = None):
        self.root = Path(root)
        self.rows = list(rows)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (workers are re-created per epoch and copy the new value)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        row = self.rows[i]
        image = load_rgb(self.root / row["path"])
        if self.seed is None:
            return self.transform(image), int(row["label"]), int(row["id"])
        # fork_rng: with 0 workers this runs in the training process, whose RNG (dropout) must stay untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(row["id"]))
            return self.transform(image), int(row["label"]), int(row["id"])
