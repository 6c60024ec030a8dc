"""Image decoding edge cases of `load_rgb`, each built from a real photo (hymenoptera, or a real digit scan when the
photos are absent): every mode ends as 8-bit RGB the way a viewer shows it, and every unusable file raises
BadImageError with a reason instead of crashing a worker half way through a data set."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA, write_digit_folder
from PIL import Image

from pipeline.core.data.images import (
    BadImageError,
    ImageDataset,
    eval_transform,
    load_rgb,
    train_transform,
)
from pipeline.core.data.index import image_limits
from pipeline.core.data.preprocess import Preprocess
from pipeline.infra.errors import PipelineError

PRE = Preprocess(size=32, resize=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Image.Image:
    """A real photo, 96 x 64 RGB (not square, so rotations show in the size)."""
    src = HYMENOPTERA / "train" / "ants" / "0013035.jpg"
    if src.is_file():
        with Image.open(src) as im:
            return im.convert("RGB").resize((96, 64), Image.BILINEAR)
    digits = write_digit_folder(tmp_path_factory.mktemp("photo"), classes=1, per_class=1)
    with Image.open(next((digits / "0").iterdir())) as im:  # a real scan, when the photos are not here
        return im.convert("RGB").resize((96, 64), Image.BILINEAR)


def _saved(im: Image.Image, path: Path, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def test_rgb_jpeg_and_grayscale(photo, tmp_path):
    jpg = _saved(photo, tmp_path / "a.jpg", quality=95)
    out = load_rgb(jpg)
    assert out.mode == "RGB" and out.size == (96, 64)
    gray = load_rgb(_saved(photo.convert("L"), tmp_path / "g.png"))
    a = _arr(gray)
    assert gray.mode == "RGB" and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert (a[..., 0] == _arr(photo.convert("L"))).all()


def test_gif_first_frame(photo, tmp_path):
    first, second = photo, Image.eval(photo, lambda v: 255 - v)
    gif = tmp_path / "anim.gif"
    first.save(gif, save_all=True, append_images=[second], duration=100, loop=0)
    with Image.open(gif) as im:
        assert im.n_frames == 2
        expected = _arr(im.convert("RGB"))  # frame 0, as the GIF stores it (palette-quantised)
    out = load_rgb(gif)
    assert out.mode == "RGB" and (_arr(out) == expected).all()
    assert np.abs(_arr(out) - _arr(first)).mean() < np.abs(_arr(out) - _arr(second)).mean()


def test_real_gif_in_hymenoptera(hymenoptera):
    out = load_rgb(hymenoptera / "train" / "ants" / "imageNotFound.gif")
    assert out.mode == "RGB" and out.size == (300, 300)


def test_palette_png_with_and_without_transparency(photo, tmp_path):
    pal = photo.convert("P", palette=Image.ADAPTIVE, colors=64)
    plain = load_rgb(_saved(pal, tmp_path / "p.png"))
    assert (_arr(plain) == _arr(pal.convert("RGB"))).all()
    idx = np.asarray(pal)
    transparent_index = int(idx[0, 0])
    out = load_rgb(_saved(pal, tmp_path / "pt.png", transparency=transparent_index))
    assert (_arr(out)[idx == transparent_index] == 255).all()  # transparent pixels come out white, not black
    opaque = idx != transparent_index
    assert (_arr(out)[opaque] == _arr(pal.convert("RGB"))[opaque]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(photo, tmp_path, mode):
    im = photo.convert(mode)
    alpha = Image.new("L", im.size, 255)
    alpha.paste(0, (0, 0, 48, 64))  # left half fully transparent
    im.putalpha(alpha)
    out = _arr(load_rgb(_saved(im, tmp_path / f"{mode}.png")))
    assert (out[:, :48] == 255).all()
    assert (out[:, 48:] == _arr(im.convert("RGB"))[:, 48:]).all()


def test_16bit_grayscale_png(photo, tmp_path):
    gray8 = np.asarray(photo.convert("L")).astype(np.uint16)
    path = _saved(Image.fromarray(gray8 * 257), tmp_path / "g16.png")  # full 16-bit range, same picture
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = _arr(load_rgb(path))
    assert (out[..., 0] == gray8).all()  # not clipped to white, as Pillow's own convert would do


def _png_rgb16(path: Path, rgb16: np.ndarray) -> Path:
    """A 48-bit RGB PNG written chunk by chunk (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_16bit_rgb_png(photo, tmp_path):
    rgb8 = np.asarray(photo).astype(np.uint16)
    out = load_rgb(_png_rgb16(tmp_path / "rgb16.png", rgb8 * 257))
    assert out.mode == "RGB" and (_arr(out) == rgb8).all()


def test_cmyk_jpeg(photo, tmp_path):
    path = _saved(photo.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == photo.size
    assert np.abs(_arr(out) - _arr(photo)).mean() < 12  # same picture, not inverted or garbled


@pytest.mark.parametrize("orientation,transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90),
                                                   (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(photo, tmp_path, orientation, transpose):
    exif = Image.Exif()
    exif[274] = orientation
    path = _saved(photo, tmp_path / f"o{orientation}.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        stored = im.convert("RGB")
    out = load_rgb(path)
    assert out.size == stored.transpose(transpose).size
    assert (_arr(out) == _arr(stored.transpose(transpose))).all()
    if orientation in (6, 8):
        assert out.size == (64, 96)


def test_tiny_images_are_upsampled_to_the_crop(tmp_path):
    digits = write_digit_folder(tmp_path / "d", classes=1, per_class=1)
    eight = next((digits / "0").iterdir())
    one = _saved(Image.new("L", (1, 1), 128), tmp_path / "one.png")
    for path in (eight, one):
        tensor = eval_transform(PRE)(load_rgb(path))
        assert tensor.shape == (3, 32, 32) and torch.isfinite(tensor).all()


def test_decompression_bomb_guard_names_the_param(photo, tmp_path):
    path = _saved(photo, tmp_path / "big.png")  # 96 x 64 = 6144 pixels
    assert load_rgb(path, max_pixels=6144).size == (96, 64)
    with pytest.raises(BadImageError, match=r"6,144 pixels is over data.max_image_pixels = 6,000"):
        load_rgb(path, max_pixels=6000)
    with pytest.raises(BadImageError, match="raise data.max_image_pixels"):  # PIL's own guard (> 2x) says the same
        load_rgb(path, max_pixels=100)
    # the limits recorded in classes.json travel with a dataset (to its workers), never as process-wide state
    limits = image_limits({"max_image_pixels": 5000})
    dataset = ImageDataset(tmp_path, [{"path": "big.png", "label": 0, "id": 0}], eval_transform(PRE), limits=limits)
    with pytest.raises(BadImageError, match="data.max_image_pixels = 5,000"):
        dataset[0]
    assert load_rgb(path).size == (96, 64)  # nothing else changed: the default limit still applies here
    assert ImageDataset(tmp_path, [{"path": "big.png", "label": 0, "id": 0}], eval_transform(PRE))[0][0].shape[0] == 3


def _bad_files(photo: Image.Image, folder: Path) -> dict[str, bytes]:
    jpg, png = io.BytesIO(), io.BytesIO()
    photo.save(jpg, "JPEG")
    photo.save(png, "PNG")
    jpg_b, png_b = jpg.getvalue(), png.getvalue()
    corrupt_png = bytearray(png_b)
    corrupt_png[png_b.index(b"IDAT") + 40] ^= 0xFF  # a flipped byte in the compressed pixels
    corrupt_jpg = bytearray(jpg_b)
    corrupt_jpg[2:40] = b"\xAA" * 38  # the header after the JPEG signature overwritten
    return {"truncated.jpg": jpg_b[: len(jpg_b) // 2], "truncated.png": png_b[: len(png_b) // 2],
            "corrupt.png": bytes(corrupt_png), "corrupt.jpg": bytes(corrupt_jpg), "empty.png": b"",
            "text.jpg": b"not an image at all, just text with an image extension\n"}


def test_unusable_files_raise_bad_image_error(photo, tmp_path):
    expected = {"truncated.jpg": "truncated", "truncated.png": "truncated", "corrupt.png": "broken data stream",
                "corrupt.jpg": "not in any image format", "empty.png": "empty file (0 bytes)",
                "text.jpg": "not in any image format"}
    for name, data in _bad_files(photo, tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(BadImageError) as info:
            load_rgb(path)
        assert expected[name] in info.value.reason.lower(), (name, info.value.reason)
        assert isinstance(info.value, PipelineError) and str(path) in str(info.value)


def test_dataset_reads_every_mode(photo, tmp_path):
    """One dataset over all the odd modes: every item is a normalised 3 x 32 x 32 tensor."""
    files = {"rgb.jpg": photo, "gray.png": photo.convert("L"), "cmyk.jpg": photo.convert("CMYK"),
             "pal.png": photo.convert("P"), "rgba.png": photo.convert("RGBA"), "la.png": photo.convert("LA"),
             "g16.png": Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)}
    rows = []
    for i, (name, im) in enumerate(files.items()):
        im.save(tmp_path / name)
        rows.append({"path": name, "label": 0, "id": i})
    dataset = ImageDataset(tmp_path, rows, eval_transform(PRE))
    for i in range(len(rows)):
        x, label, row_id = dataset[i]
        assert x.shape == (3, 32, 32) and row_id == i and x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6


def test_bad_file_in_a_dataloader_worker_is_still_a_pipeline_error(photo, tmp_path):
    """A file that broke after prepare vetted it: the worker's error reaches the stage as a PipelineError naming
    the file (one line from run_main), not as a bare RuntimeError."""
    photo.save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"")
    rows = [{"path": "ok.png", "label": 0, "id": 0}, {"path": "broken.jpg", "label": 0, "id": 1}]
    loader = torch.utils.data.DataLoader(ImageDataset(tmp_path, rows, eval_transform(PRE)), batch_size=2,
                                         num_workers=1)
    with pytest.raises(BadImageError, match="broken.jpg: empty file"):
        next(iter(loader))


def test_shift_augmentation_is_the_eval_view_moved(photo):
    """`finetune.augment: shift` crops the eval-resized image at a random place: same zoom and framing as the cached
    features (only the position moves); `resized_crop` changes the zoom, so it is not such a window."""
    from torchvision import transforms as T

    pre = Preprocess(size=32, resize=36, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    im = photo
    resized = T.Normalize(pre.mean, pre.std)(T.ToTensor()(T.Resize(pre.resize)(im)))
    windows = [resized[:, i:i + 32, j:j + 32]
               for i in range(resized.shape[1] - 31) for j in range(resized.shape[2] - 31)]
    torch.manual_seed(0)
    for _ in range(5):
        out = train_transform(pre, "shift", 0.7, False)(im)
        assert any(torch.equal(out, w) for w in windows)
    assert eval_transform(pre)(im).shape == out.shape
    torch.manual_seed(0)
    zoomed = train_transform(pre, "resized_crop", 0.5, False)(im)
    assert not any(torch.allclose(zoomed, w, atol=1e-3) for w in windows)
