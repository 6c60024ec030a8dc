"""Predicting classes of image files with the fine-tuned model or the selected head on the frozen backbone.

Preprocessing, classes and weights come from the saved artefacts, never from the current params.yaml. A file that
cannot be read gets a row with its error instead of stopping the run.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.core.data.images import eval_transform, load_rgb
from pipeline.core.data.preprocess import Preprocess
from pipeline.core.data.scan import IMAGE_EXTENSIONS
from pipeline.core.finetune.network import TransferNet, load_finetuned
from pipeline.core.heads.fitting import load_head
from pipeline.core.models.backbone import build_backbone
from pipeline.infra.artifacts import read_json, write_csv
from pipeline.infra.config import MAX_BATCH_SIZE, MAX_WORKERS, BackboneConfig
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import progress_disabled, resolve_device

log = logging.getLogger(__name__)


# scheme:// as typed (http, https, s3, gs, ftp, file...); also the one-slash form Path() makes of it
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


# What --device accepts: the forms --help lists (torch.device alone would take "meta" or "xla" and fail later)
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Names of skipped files in one log line: enough to recognise what was left out, short enough for a folder of many
SHOWN_SKIPPED = 10


def check_options(top_k: int, batch_size: int, workers: int, device: str, out: Path) -> None:
    """Refuses a flag that cannot work, naming it and what to give instead, before any file or model is read.

    Each of these used to end in a traceback from inside torch (topk with k = 0, a DataLoader with batch_size 0 or
    -1 workers, torch.device("foo")), or, for --out, after every image had been predicted.

    Raises:
        PipelineError: a count out of range, an unknown or absent device, or an --out that cannot be a file.
    """
    if top_k < 1:
        raise PipelineError(f"--top-k {top_k}: give how many classes to list per image, 1 or more")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise PipelineError(f"--batch-size {batch_size}: give the number of images per batch, 1 to {MAX_BATCH_SIZE:,}")
    if not 0 <= workers <= MAX_WORKERS:
        raise PipelineError(f"--workers {workers}: give the number of decoding processes, 0 (decode in this process) "
                            f"to {MAX_WORKERS}")
    if not _DEVICE.match(device):
        raise PipelineError(f"--device '{device}': not a device; give auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PipelineError(f"--device {device}: no CUDA GPU is available here; give --device cpu (or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise PipelineError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                                f"cuda:{count - 1}; give one of them, or auto")
    if out.is_dir():
        raise PipelineError(f"--out {out} is a folder; give the CSV file to write, e.g. {out / 'predictions.csv'}")
    above = next((p for p in out.parents if p.exists()), None)  # the CSV's folder is created when missing
    if above is not None and not above.is_dir():
        raise PipelineError(f"--out {out}: '{above}' is a file, not a folder; give a CSV path in a folder")


def describe_files(files: list[Path], limit: int = SHOWN_SKIPPED) -> str:
    """The first `limit` paths, comma-separated, and how many more there are."""
    shown = ", ".join(str(f) for f in files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def collect_files(paths: Iterable[Path | str]) -> tuple[list[Path], list[Path]]:
    """Files named directly (whatever their extension), and image files under folders, in sorted order; also the
    files under those folders that were left out (hidden, or without an image extension), so they can be counted.

    Raises:
        PipelineError: a URL (not downloaded: predict reads local files only), a path that does not exist, or no
            image file at all.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    for given in paths:
        if _URL.match(str(given)):
            raise PipelineError(f"'{given}' is a URL; URLs are not supported: download the file and give its local "
                                "path")
        p = Path(given)
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file()):
                is_image = not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
                (files if is_image else skipped).append(f)
        elif p.exists():
            files.append(p)
        else:
            raise PipelineError(f"'{p}' does not exist; give image files or folders of images")
    if not files:
        left = f" ({len(skipped)} file(s) skipped: {describe_files(skipped)})" if skipped else ""
        raise PipelineError(f"no image files found in the given paths{left}; image files end in "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    return files, skipped


class _Files(Dataset):
    """(image tensor, position, error): a bad file yields a blank tensor and its error text, never an exception."""

    def __init__(self, files: list[Path], pre: Preprocess):
        self.files, self.pre, self.transform = files, pre, eval_transform(pre)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.transform(load_rgb(self.files[i])), i, ""
        except Exception as exc:  # any decoding failure is reported on this file's row
            return torch.zeros(3, self.pre.size, self.pre.size), i, f"{type(exc).__name__}: {exc}"


def load_model(kind: str, models_dir: Path) -> tuple[torch.nn.Module, Preprocess, list[str], str]:
    """The network to predict with, its preprocessing, its classes and a description of it."""
    if not models_dir.is_dir():
        state = "is not a folder" if models_dir.exists() else "does not exist"
        raise PipelineError(f"--models-dir {models_dir} {state}; run `dvc repro` first, or give the folder it wrote "
                            "the models to")
    if kind == "finetune":
        ckpt = models_dir / "finetune"
        if not (ckpt / "model.json").is_file():
            raise PipelineError(f"no fine-tuned model in {ckpt}; run `dvc repro` first, or use --model head")
        net, pre, meta = load_finetuned(ckpt)
        return net, pre, meta["classes"], f"fine-tuned model ({ckpt}, warm-started from {meta['warm_start']})"
    selected = models_dir / "selected.json"
    if not selected.is_file():
        raise PipelineError(f"{selected} not found; run `dvc repro select` first")
    name = read_json(selected)["head"]
    head, spec = load_head(models_dir / "heads" / name)
    feats = spec.features
    pre = Preprocess.from_dict(feats["preprocess"])
    backbone = BackboneConfig(name=feats["backbone"], weights=feats.get("weights", "bundled"), image_size=pre.size)
    body, built_pre, sha = build_backbone(backbone)
    if sha != feats["weights_sha256"]:
        raise PipelineError(f"the backbone weights ({backbone.weights}) are not those the head '{name}' was fitted "
                            f"on (sha256 {sha[:12]} vs {feats['weights_sha256'][:12]}); rerun `dvc repro`")
    return TransferNet(body, head, spec.pooling).eval(), pre, spec.classes, f"head '{name}' on {feats['backbone']}"


@torch.no_grad()
def predict(net: torch.nn.Module, pre: Preprocess, classes: list[str], files: list[Path], top_k: int = 3,
            batch_size: int = 32, workers: int = 0, device: str = "auto") -> list[dict]:
    """One row per file: path, predicted class and probability, the top-k classes, and an error text if unreadable."""
    dev = resolve_device(device)
    net = net.to(dev, memory_format=torch.channels_last).eval()
    k = min(top_k, len(classes))
    rows: list[dict] = [{} for _ in files]
    loader = DataLoader(_Files(files, pre), batch_size=batch_size, num_workers=workers)
    # every row is filled below; `rows` keeps the input order whatever the batch order
    for images, positions, errors in tqdm(loader, desc="predict", unit="batch", disable=progress_disabled()):
        probs = torch.softmax(net(images.to(dev).contiguous(memory_format=torch.channels_last)).float(), 1).cpu()
        top_p, top_i = probs.topk(k, dim=1)
        for p, i, pos, err in zip(top_p.tolist(), top_i.tolist(), positions.tolist(), errors):
            row = {"path": str(files[pos]), "predicted": "", "probability": "", "top_k": "", "error": err}
            if not err:
                row.update(predicted=classes[i[0]], probability=f"{p[0]:.4f}",
                           top_k=";".join(f"{classes[c]}:{q:.4f}" for c, q in zip(i, p)))
            rows[pos] = row
    return rows


FIELDS = ("path", "predicted", "probability", "top_k", "error")


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, FIELDS, ([r[k] for k in FIELDS] for r in rows))
