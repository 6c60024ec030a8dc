"""The extraction input path: image files to normalised, channels_last batches on the extraction device.

Two routes, chosen by `extract.decode` (it changes the pixels, so it is an output-changing param):

- `pil` (default): `load_rgb` + PIL resize and centre crop in the DataLoader workers, exactly the pixels of
  :func:`pipeline.core.data.images.eval_transform`. Any format PIL reads.
- the JPEG route (`jpeg`, `torchcodec`, `torchvision`): JPEGs are decoded by a JPEG decoder (libjpeg-turbo in the
  workers on CPU, nvJPEG on the GPU in batched calls) and resized on the device; other formats, and JPEGs the header
  check sends away (CMYK, over the image limits), take the `pil` path, and so does any single image the decoder
  refuses. On a GPU the workers only read bytes, so the CPU is no longer the bottleneck. `jpeg` decodes with
  TorchCodec where it works, else with torchvision's `decode_jpeg` (any torch >= 2.4); `torchcodec` and `torchvision`
  force one (pipeline/core/features/jpeg_decoders.py). Before, `torchvision` was a deprecated alias of
  `torchcodec`; on a CPU the two decoders give the same bytes, so features cached under that name keep their values.

TorchCodec always applies a JPEG's EXIF orientation itself (there is no switch; its CPU decoder reads the first APP1
segment, its CUDA decoder the first Exif one; torchvision's does not by default). The workers therefore remove the
APP1 segments before the bytes reach the decoder (:func:`strip_app1`) and the orientation that PIL reads, the one the
`pil` path applies, is applied by hand: one parser decides, the same on CPU and GPU, whichever decoder.

Either way the workers hand over uint8 pixels (or compressed bytes), never float tensors: a quarter of the bytes
through shared memory and over PCIe. Conversion to float and normalisation happen on the device with the same
operations, in the same order, as `ToTensor` + `Normalize`, so the `pil` path is bit-for-bit the tutorial transform.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F2

from pipeline.core.data.images import ImageLimits, aspect_problem, geometry, load_rgb
from pipeline.core.data.preprocess import Preprocess
from pipeline.core.features.jpeg_decoders import JPEG_DECODERS, JPEG_ROUTES

log = logging.getLogger(__name__)

Decode = Literal["pil", "jpeg", "torchcodec", "torchvision"]

# oneDNN picks another GEMM blocking for the 1x1 convolutions when a forward call has very few rows (below 16 on
# one thread, below 8 on two: measured for Lite0 on this machine), which changes the last bits of the features.
# Padding every forward call to at least this many rows keeps the bytes independent of batch size and thread count.
MIN_FORWARD_ROWS = 16
# nvjpeg decodes a list in one call; the list is capped so that a batch of multi-megapixel photos does not hold
# every full-size decoded image on the GPU at once (64 x 12 MP x 3 bytes = 2.3 GB at most).
DECODE_GROUP = 64

_JPEG_MAGIC = b"\xff\xd8\xff"
_APP1, _SOS = 0xE1, 0xDA
_EXIF_ORIENTATION = 0x0112
_PIXELS, _JPEG = 0, 1


@dataclass
class Batch:
    """One DataLoader batch: decoded pixels for some rows, compressed JPEG bytes (to decode on the GPU) for others.

    `pixels[i]` is row `pixel_pos[i]` of the batch; JPEG `j` is `jpeg_bytes[jpeg_offsets[j]:jpeg_offsets[j+1]]`,
    row `jpeg_pos[j]`. JPEG bytes are packed into one tensor because every tensor crossing the worker boundary
    costs a shared-memory segment and a file descriptor; hundreds per batch would cap the rate.
    """

    ids: torch.Tensor  # int64 (B,), global row ids
    pixels: torch.Tensor  # uint8 (P, 3, S, S)
    pixel_pos: torch.Tensor  # int64 (P,)
    jpeg_bytes: torch.Tensor  # uint8 (total bytes,)
    jpeg_offsets: torch.Tensor  # int64 (J + 1,)
    jpeg_pos: torch.Tensor  # int64 (J,)
    jpeg_orientation: torch.Tensor  # int64 (J,), EXIF orientation 1-8
    jpeg_paths: list[str]  # for the PIL fallback when the device decoder refuses a file

    def __len__(self) -> int:
        return len(self.ids)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pin thread: page-locked pixels make the host-to-device copy asynchronous."""
        if self.pixels.numel():
            self.pixels = self.pixels.pin_memory()
        return self


def resize_crop(pre: Preprocess) -> T.Compose:
    """The PIL half of `eval_transform` (resize and crop as the weights' crop_mode says), ending in uint8 pixels."""
    return T.Compose(geometry(pre))


def pil_pixels(path: Path | str, pre: Preprocess, limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """uint8 (3, S, S) pixels of one image through the PIL path (`limits`: see `load_rgb`)."""
    return TF.pil_to_tensor(resize_crop(pre)(load_rgb(path, limits.max_pixels, limits.max_aspect)))


def jpeg_orientation(data: bytes, max_pixels: int | None = None, max_aspect: float | None = None) -> int | None:
    """EXIF orientation (1-8), as PIL reads it, of a JPEG that decode_jpeg can turn into RGB, or None for anything else.

    Only the header is parsed (PIL opens lazily). CMYK/YCCK JPEGs, other formats and images over `max_pixels` or
    `max_aspect` return None: they take the PIL path, which handles (or refuses) them exactly as `load_rgb` does.
    """
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            if max_pixels is not None and im.size[0] * im.size[1] > max_pixels:
                return None
            if max_aspect is not None and aspect_problem(*im.size, max_aspect) is not None:
                return None
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a header PIL cannot parse: let the PIL path report or handle it
        return None
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def strip_app1(data: bytes | bytearray) -> bytearray | None:
    """The JPEG with its APP1 segments (EXIF, XMP) removed, so that TorchCodec applies no orientation of its own.

    Only the marker segments before the first scan are walked and copied; the compressed data after it is kept as
    is, so the decoded pixels are unchanged. None when the header is not a plain marker sequence: such a file takes
    the PIL path rather than risk a second turn.
    """
    n, pos = len(data), 2
    out = bytearray(data[:2])
    while True:
        if pos >= n or data[pos] != 0xFF:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        if marker == _SOS:
            out += data[pos - 1:]
            return out
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field
            out += data[pos - 1:pos + 1]
            pos += 1
            continue
        if marker in (0x00, 0xD8, 0xD9) or pos + 2 >= n:
            return None
        end = pos + 1 + ((data[pos + 1] << 8) | data[pos + 2])  # the length counts its own two bytes
        if end <= pos + 2 or end > n:
            return None
        if marker != _APP1:
            out += data[pos - 1:end]
        pos = end


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Turns (..., C, H, W) images upright the way `PIL.ImageOps.exif_transpose` does (EXIF orientation 1-8)."""
    h, w = image.ndim - 2, image.ndim - 1
    if orientation == 2:
        return image.flip(w)
    if orientation == 3:
        return image.flip(h, w)
    if orientation == 4:
        return image.flip(h)
    if orientation == 5:
        return image.transpose(h, w)
    if orientation == 6:
        return torch.rot90(image, k=-1, dims=(h, w))
    if orientation == 7:
        return image.transpose(h, w).flip(h, w)
    if orientation == 8:
        return torch.rot90(image, k=1, dims=(h, w))
    return image


def _tensor_resize_crop(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Resize and centre crop of uint8 (..., 3, H, W) tensors on their own device (antialiased); crop_mode `center`
    or `squash` (`border` weights are refused at the start of a JPEG-route extraction)."""
    size = [pre.resize, pre.resize] if pre.crop_mode == "squash" else [pre.resize]
    images = F2.resize(images, size, interpolation=T.InterpolationMode(pre.interpolation), antialias=True)
    return F2.center_crop(images, [pre.size, pre.size])


def decode_jpegs(raw: Sequence[torch.Tensor], orientation: Sequence[int], paths: Sequence[str], pre: Preprocess,
                 device: torch.device, decoder: str) -> list[torch.Tensor]:
    """Decodes JPEG bytes on `device` (nvjpeg on CUDA) into uint8 (3, S, S) pixels, upright, resized and cropped.

    `decoder`: a name of JPEG_DECODERS (`torchcodec`, `torchvision`), as :func:`choose_jpeg_decoder` chose it.

    `raw` must come without APP1 segments (:func:`strip_app1`), `orientation` is the EXIF orientation PIL read from
    the file (:func:`jpeg_orientation`), applied here. Images of the same size and orientation (most of a camera's
    photos, all of a resized data set) are resized in one call: per-image calls would cost more in Python and kernel
    launches than the GPU spends resizing. A list the decoder refuses is retried image by image; an image it refuses
    alone goes through PIL, with a warning naming it, so one odd file never stops an extraction.
    """
    out: list[torch.Tensor | None] = [None] * len(raw)
    decode = JPEG_DECODERS[decoder]
    for g in range(0, len(raw), DECODE_GROUP):
        group = list(raw[g:g + DECODE_GROUP])
        try:
            images = decode(group, device)
        except (RuntimeError, ValueError):  # what both decoders raise for a file they cannot decode
            images = [_decode_one(decode, r, p, device) for r, p in zip(group, paths[g:g + DECODE_GROUP])]
        buckets: dict[tuple[int, int, int], list[int]] = {}
        for k, image in enumerate(images):
            if image is None:
                out[g + k] = pil_pixels(paths[g + k], pre).to(device)
            else:
                buckets.setdefault((int(orientation[g + k]), *image.shape[-2:]), []).append(k)
        for (turn, _, _), members in buckets.items():
            stacked = images[members[0]][None] if len(members) == 1 else torch.stack([images[k] for k in members])
            for k, pixels in zip(members, _tensor_resize_crop(apply_orientation(stacked, turn), pre)):
                out[g + k] = pixels
    return out  # type: ignore[return-value]  # every slot is filled above


def _decode_one(decode, raw: torch.Tensor, path: str, device: torch.device) -> torch.Tensor | None:
    try:
        return decode(raw, device)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("the JPEG decoder on %s refused %s (%s); decoding it with PIL instead", device, path, first)
        return None


class ExtractDataset(Dataset):
    """Rows of the index as uint8 pixels, or as JPEG bytes left for the device to decode (`defer_jpeg`).

    Paths and ids live in numpy arrays rather than a list of dicts: forked workers then share them without
    touching Python reference counts, so worker memory does not grow with the number of rows.

    With `augment` (cached augmented views, pipeline/core/features/views.py), row `i` is the image under
    `augment(image, view_seeds[i])` instead of the eval geometry, always through PIL (the augmentation is PIL's).
    """

    def __init__(self, root: Path | str, paths: Sequence[str], ids: Sequence[int], pre: Preprocess,
                 decode: Decode = "pil", defer_jpeg: bool = False, limits: ImageLimits = ImageLimits(),
                 jpeg_decoder: str | None = None,
                 augment: Callable[[Image.Image, int], torch.Tensor] | None = None,
                 view_seeds: Sequence[int] | None = None):
        if (augment is None) != (view_seeds is None) or augment is not None and decode != "pil":
            raise ValueError("augmented views need both augment= and view_seeds=, and decode 'pil'")
        self.augment = augment
        self.view_seeds = None if view_seeds is None else np.asarray(view_seeds, dtype=np.int64)
        self.root = Path(root)
        self.paths = np.array(list(paths), dtype=np.str_)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.pre = pre
        self.decode = decode
        self.jpeg_route = decode in JPEG_ROUTES
        # `jpeg` leaves the choice to the caller (:func:`choose_jpeg_decoder`, once per extraction); the others name it
        self.jpeg_decoder = jpeg_decoder or (decode if decode in JPEG_DECODERS else None)
        if self.jpeg_route and self.jpeg_decoder is None:
            raise ValueError("extract.decode: jpeg: pass the decoder choose_jpeg_decoder chose (jpeg_decoder=...)")
        if self.jpeg_route and pre.crop_mode == "border":
            raise ValueError(f"extract.decode: {decode} resizes on the device with crop_mode center or squash only; "
                             "these weights use crop_mode 'border': set extract.decode: pil")
        self.defer_jpeg = defer_jpeg
        self.limits = limits

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, int, torch.Tensor, int, str]:
        """(row id, kind, tensor, orientation, path): kind _PIXELS with (3, S, S) uint8, or _JPEG with bytes."""
        path = str(self.root / str(self.paths[i]))
        row_id = int(self.ids[i])
        if self.augment is not None:
            image = load_rgb(path, self.limits.max_pixels, self.limits.max_aspect)
            return row_id, _PIXELS, self.augment(image, int(self.view_seeds[i])), 1, path
        if self.jpeg_route:
            data = Path(path).read_bytes()
            orientation = jpeg_orientation(data, self.limits.max_pixels, self.limits.max_aspect)
            stripped = strip_app1(data) if orientation is not None else None
            if stripped is not None:
                raw = torch.frombuffer(stripped, dtype=torch.uint8)
                if self.defer_jpeg:
                    return row_id, _JPEG, raw, orientation, path
                pixels = decode_jpegs([raw], [orientation], [path], self.pre, torch.device("cpu"),
                                      self.jpeg_decoder)[0]
                return row_id, _PIXELS, pixels, 1, path
        return row_id, _PIXELS, pil_pixels(path, self.pre, self.limits), 1, path


def collate(items: list[tuple[int, int, torch.Tensor, int, str]]) -> Batch:
    """Packs dataset items into one :class:`Batch` (a few tensors, whatever the batch size)."""
    pix = [(pos, t) for pos, (_, kind, t, _, _) in enumerate(items) if kind == _PIXELS]
    jpg = [(pos, t, o, p) for pos, (_, kind, t, o, p) in enumerate(items) if kind == _JPEG]
    sizes = [len(t) for _, t, _, _ in jpg]
    return Batch(
        ids=torch.tensor([it[0] for it in items], dtype=torch.int64),
        pixels=torch.stack([t for _, t in pix]) if pix else torch.empty(0, dtype=torch.uint8),
        pixel_pos=torch.tensor([pos for pos, _ in pix], dtype=torch.int64),
        jpeg_bytes=torch.cat([t for _, t, _, _ in jpg]) if jpg else torch.empty(0, dtype=torch.uint8),
        jpeg_offsets=torch.tensor(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]), dtype=torch.int64),
        jpeg_pos=torch.tensor([pos for pos, _, _, _ in jpg], dtype=torch.int64),
        jpeg_orientation=torch.tensor([o for _, _, o, _ in jpg], dtype=torch.int64),
        jpeg_paths=[p for _, _, _, p in jpg],
    )


def make_loader(dataset: ExtractDataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    """In-order batches (row order is the output order), pinned when they go to a GPU."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", persistent_workers=False)


class DeviceInput:
    """Turns a :class:`Batch` into the network's input on `device`: (B, 3, S, S) float, normalised, channels_last."""

    def __init__(self, pre: Preprocess, device: torch.device, jpeg_decoder: str | None = None):
        self.pre = pre
        self.device = device
        self.jpeg_decoder = jpeg_decoder  # decodes the JPEG bytes of deferred batches (the GPU's path)
        # Same dtype and (1, 3, 1, 1) broadcasting as torchvision's Normalize: identical bits on the CPU.
        self.mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def pixels(self, batch: Batch) -> torch.Tensor:
        """uint8 (B, 3, S, S) on the device, in batch order."""
        pixels = batch.pixels.to(self.device, non_blocking=True)
        if not len(batch.jpeg_pos):
            return pixels  # the collate kept batch order: nothing to scatter
        if self.jpeg_decoder is None:
            raise ValueError("a batch with JPEG bytes (defer_jpeg) needs DeviceInput(..., jpeg_decoder=...)")
        offsets = batch.jpeg_offsets.tolist()
        raw = [batch.jpeg_bytes[offsets[j]:offsets[j + 1]] for j in range(len(batch.jpeg_pos))]
        decoded = torch.stack(decode_jpegs(raw, batch.jpeg_orientation.tolist(), batch.jpeg_paths, self.pre,
                                           self.device, self.jpeg_decoder))
        if not len(batch.pixel_pos):
            return decoded
        out = torch.empty((len(batch), 3, self.pre.size, self.pre.size), dtype=torch.uint8, device=self.device)
        out[batch.jpeg_pos.to(self.device)] = decoded
        out[batch.pixel_pos.to(self.device)] = pixels
        return out

    def __call__(self, batch: Batch) -> torch.Tensor:
        x = self.pixels(batch).contiguous(memory_format=torch.channels_last)
        # ToTensor's `float().div(255)` then Normalize's `sub_(mean).div_(std)`: the same ops in the same order.
        return x.float().div_(255).sub_(self.mean).div_(self.std)


def pad_rows(x: torch.Tensor, rows: int = MIN_FORWARD_ROWS) -> torch.Tensor:
    """Repeats the last row until `x` has at least `rows` rows (see MIN_FORWARD_ROWS); the extra rows are dropped."""
    if len(x) >= rows:
        return x
    pad = x[-1:].expand(rows - len(x), *x.shape[1:])
    return torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
