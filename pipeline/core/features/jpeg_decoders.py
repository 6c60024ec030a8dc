"""The two JPEG decoders of the `extract.decode` JPEG route, and the choice between them.

- `torchcodec`: `torchcodec.decoders.decode_jpeg` (libjpeg-turbo on a CPU, nvJPEG on CUDA, a list in one batched
  call). The maintained decoder: torchvision 0.29 deprecated its own image decoding in its favour. But TorchCodec
  ships wheels for recent torch releases only (none for the torch 2.11 of the H200 run, bench/results/gpu_h200.md),
  and a wheel built for another torch or CUDA imports yet fails on its first call.
- `torchvision`: `torchvision.io.decode_jpeg(list, device=...)` (libjpeg-turbo on a CPU, nvJPEG on CUDA, batched
  lists since torchvision 0.19, i.e. torch 2.4). Present wherever torchvision is. Its DeprecationWarning (0.29 on)
  is silenced around these calls only: using it is a decision, logged once, not an accident to warn about on every
  batch.

`extract.decode: jpeg` takes TorchCodec where it imports and decodes a probe JPEG on the extraction device, else
torchvision, and logs which (:func:`choose_jpeg_decoder`); `torchcodec` and `torchvision` force one and stop with a
clear error where it cannot decode. On a CPU both wrap libjpeg-turbo and give the same bytes (all hymenoptera JPEGs,
tests/features/test_extract.py); on CUDA both call nvJPEG, which is not checked here (no GPU: bench/gpu_check.sh
part C prints it). Since they may differ, the features file records the decoder that made the pixels
(pipeline/core/features/extraction.py), and with it the fingerprint of checkpoints and feature-store rows.
"""
from __future__ import annotations

import io
import logging
import warnings
from typing import Callable

import torch

from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)

# `extract.decode` values that take the JPEG route; `jpeg` chooses its decoder, the other two name it.
JPEG_ROUTES = ("jpeg", "torchcodec", "torchvision")
AUTO_ORDER = ("torchcodec", "torchvision")  # what `jpeg` tries, in order
# the text torchvision's deprecation warning starts with (torchvision/io/image.py, 0.29)
_TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


class JpegDecoderError(PipelineError, RuntimeError):
    """The JPEG decoder that `extract.decode` names cannot decode here; the message says what to set instead."""


def _torchcodec(raw: torch.Tensor | list[torch.Tensor], device: torch.device):
    # Imported here: only this decoder needs it, so the other routes work where TorchCodec is not installed.
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(raw, mode="RGB", device=device)


def _torchvision(raw: torch.Tensor | list[torch.Tensor], device: torch.device):
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # only this call's: the deprecation of a decoder chosen on purpose
        warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION, category=DeprecationWarning)
        # apply_exif_orientation stays False (its default): the route turns images by the tag PIL reads
        return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)


# name -> decoder: one tensor of JPEG bytes -> one uint8 (3, H, W) tensor on `device`, a list -> a list; raises
# (RuntimeError, ValueError) when it refuses a file. A dict, so that a test can swap one in.
JPEG_DECODERS: dict[str, Callable] = {"torchcodec": _torchcodec, "torchvision": _torchvision}


def decoder_version(name: str) -> str:
    """The version of the library behind decoder `name` (recorded in the features file)."""
    if name == "torchcodec":
        import torchcodec

        return torchcodec.__version__
    import torchvision

    return torchvision.__version__


def _probe_jpeg() -> torch.Tensor:
    """A small real JPEG (PIL-encoded, 16 x 8 px, 4:2:0), made in memory."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 90)).save(buf, "JPEG", quality=90)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def why_unusable(name: str, device: torch.device) -> str | None:
    """None when decoder `name` decodes a probe JPEG (one alone and a list of two) on `device`, else why not.

    Why a probe and not only the import: a TorchCodec wheel for another torch or CUDA imports, then fails when its
    native library loads; a CPU-only build fails on `device="cuda"` only.
    """
    probe = _probe_jpeg()
    try:
        one = JPEG_DECODERS[name](probe, device)
        two = JPEG_DECODERS[name]([probe, probe], device)
    except Exception as exc:  # noqa: BLE001  (ImportError, OSError from a native library, RuntimeError: all "no")
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    if tuple(one.shape) != (3, 8, 16) or len(two) != 2 or one.device.type != device.type:
        return f"the probe came back as {tuple(one.shape)} on {one.device}, not (3, 8, 16) on {device.type}"
    return None


def choose_jpeg_decoder(decode: str, device: torch.device) -> str:
    """The JPEG decoder the route uses for `extract.decode` on `device`; logs the choice in one line.

    `jpeg`: TorchCodec when it works here, else torchvision. `torchcodec` / `torchvision`: that one.

    Raises:
        JpegDecoderError: the decoder named (or, for `jpeg`, both) cannot decode on `device`.
    """
    if decode not in JPEG_ROUTES:
        raise ValueError(f"extract.decode {decode!r} does not take the JPEG route")
    candidates = AUTO_ORDER if decode == "jpeg" else (decode,)
    refused: dict[str, str] = {}
    for name in candidates:
        reason = why_unusable(name, device)
        if reason is None:
            passed = "; ".join(f"{n} not usable: {r}" for n, r in refused.items())
            log.info("extract: JPEG decoder %s %s on %s (extract.decode: %s%s)", name, decoder_version(name),
                     device, decode, f"; {passed}" if passed else "")
            return name
        refused[name] = reason
    detail = "; ".join(f"{n}: {r}" for n, r in refused.items())
    other = ("set extract.decode: pil (any format, decoded by PIL in the workers)" if decode == "jpeg" else
             "set extract.decode: jpeg (TorchCodec where it works, else torchvision) or pil")
    raise JpegDecoderError(f"extract.decode: {decode}: no JPEG decoder works on {device} ({detail}); {other}")
