"""Stage `extract`: runs the frozen backbone once over every indexed image and caches pooled features in HDF5.

The file is written batch by batch into preallocated datasets (never accumulated in memory), appears atomically,
and carries attributes that fingerprint what produced it. Reruns on the same machine give a byte-identical file:
no timestamps, fixed row order and dtypes. Batch size, workers and device change speed only, never the bytes.

    python -m pipeline.extract --params params.yaml --index data/prepared --out data/features.h5
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.errors import run_main
from pipeline.artifacts import atomic_path, sha256_file
from pipeline.backbone import build_backbone, pool_avg_max
from pipeline.config import BackboneConfig, ExtractConfig, load_section, to_dict
from pipeline.data import ImageDataset, eval_transform
from pipeline.prepare import read_index
from pipeline.runtime import progress_disabled, resolve_device, set_deterministic, setup_logging

log = logging.getLogger("pipeline.extract")

CHUNK_ROWS = 256


def library_versions() -> dict[str, str]:
    import PIL
    import timm
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def _create_datasets(f: h5py.File, rows: list[dict], channels: int, dtype: str) -> dict[str, tuple[int, int]]:
    """Preallocates every split's datasets; returns each split's [start, stop) range in index order."""
    ranges: dict[str, tuple[int, int]] = {}
    for i, row in enumerate(rows):
        start, _ = ranges.get(row["split"], (i, i))
        ranges[row["split"]] = (start, i + 1)
    for split, (start, stop) in ranges.items():
        n = stop - start
        g = f.create_group(split)
        chunks = (min(n, CHUNK_ROWS), channels)  # full-width chunks: one row read never touches two chunks
        g.create_dataset("avg", shape=(n, channels), dtype=dtype, chunks=chunks)
        g.create_dataset("max", shape=(n, channels), dtype=dtype, chunks=chunks)
        g.create_dataset("labels", data=np.array([int(r["label"]) for r in rows[start:stop]], dtype=np.int64))
        g.create_dataset("ids", data=np.array([int(r["id"]) for r in rows[start:stop]], dtype=np.int64))
    return ranges


def extract_features(index_dir: Path, out: Path, backbone: BackboneConfig, cfg: ExtractConfig) -> dict:
    """Writes the features file for every row of the index; returns a summary (rows, seconds, rate, device)."""
    rows, meta = read_index(index_dir)
    root = Path(meta["source"])
    if not rows:
        raise SystemExit(f"extract: the index in {index_dir} is empty; nothing to extract")
    for i, row in enumerate(rows):
        if int(row["id"]) != i:
            raise SystemExit(f"extract: {index_dir}/index.csv is not in id order at row {i}; rerun prepare")
    set_deterministic()
    device = resolve_device(cfg.device)
    net, pre, weights_sha = build_backbone(backbone)
    net = net.to(device, memory_format=torch.channels_last).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    loader = DataLoader(ImageDataset(root, rows, eval_transform(pre)), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        ranges = _create_datasets(f, rows, net.num_features, cfg.dtype)
        attrs = {
            "backbone": backbone.name, "weights": backbone.weights, "weights_sha256": weights_sha,
            "preprocess": json.dumps(pre.to_dict(), sort_keys=True), "precision": cfg.precision,
            "dtype": cfg.dtype, "index_sha256": sha256_file(Path(index_dir) / "index.csv"),
            "classes": json.dumps(meta["classes"]), "num_features": net.num_features,
            "versions": json.dumps(library_versions(), sort_keys=True), "pooling_order": "avg,max",
        }
        for k, v in attrs.items():
            f.attrs[k] = v
        pos = 0
        with torch.inference_mode(), tqdm(total=len(rows), desc="extract", unit="img",
                                          disable=progress_disabled()) as bar:
            for images, _, ids in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with autocast:
                    fmap = net(images)
                avg, mx = (t.float().cpu().numpy() for t in pool_avg_max(fmap))
                _write_batch(f, ranges, pos, avg, mx)
                pos += len(ids)
                bar.update(len(ids))
    seconds = time.perf_counter() - t0
    return {"rows": len(rows), "seconds": seconds, "img_per_s": len(rows) / seconds, "device": str(device),
            "num_features": net.num_features, "preprocess": pre.to_dict(), "weights_sha256": weights_sha,
            "backbone_config": to_dict(backbone), "extract_config": to_dict(cfg)}


def _write_batch(f: h5py.File, ranges: dict[str, tuple[int, int]], pos: int, avg: np.ndarray,
                 mx: np.ndarray) -> None:
    """Writes rows [pos, pos + len(avg)) of the index to their splits (a batch may straddle two splits)."""
    end = pos + len(avg)
    for split, (start, stop) in ranges.items():
        lo, hi = max(pos, start), min(end, stop)
        if lo < hi:
            f[split]["avg"][lo - start:hi - start] = avg[lo - pos:hi - pos]
            f[split]["max"][lo - start:hi - start] = mx[lo - pos:hi - pos]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.extract", description=__doc__.split("\n\n")[0],
        epilog="Params: backbone.name, backbone.weights, backbone.image_size, extract.precision, extract.dtype "
               "(change the output); extract.batch_size, extract.workers, extract.device (speed only).")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
    parser.add_argument("--index", type=Path, default=Path("data/prepared"),
                        help="folder with index.csv and classes.json from prepare (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("data/features.h5"),
                        help="features file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    setup_logging()
    backbone = load_section("backbone", args.params)
    cfg = load_section("extract", args.params)
    summary = extract_features(args.index, args.out, backbone, cfg)
    log.info("extract: %d images in %.1f s (%.1f img/s) on %s, %s %s -> %s", summary["rows"], summary["seconds"],
             summary["img_per_s"], summary["device"], backbone.name, cfg.precision, args.out)


if __name__ == "__main__":
    run_main(main, "extract")
