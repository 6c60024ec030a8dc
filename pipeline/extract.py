"""Stage `extract`: runs the frozen backbone once over every indexed image and caches pooled features in HDF5.

Each image gets three feature sets (`avg`, `max`, `pre_logits`) from one forward pass, so a head's pooling can be
chosen later without the backbone. Rows already in the feature store (`extract.store`) are copied, not recomputed;
a killed run resumes from its last finished checkpoint (`<out>.partial/`); under torchrun each rank extracts a share
and rank 0 writes the one file. How it runs: pipeline/core/features/extraction.py; measurements: docs/extraction.md.

The file depends only on the index, the backbone and `extract.precision` / `dtype` / `decode`: batch size, workers,
thread count, checkpoint size, number of processes and interruptions leave its bytes unchanged (same machine, no
timestamps, fixed row order and attribute order).

    python -m pipeline.extract --params params.yaml --index data/prepared --out data/features.h5
    torchrun --nproc_per_node=4 -m pipeline.extract --index data/prepared --out data/features.h5
    # the backbone sweep (dvc.yaml `sweep_extract`): another backbone than params.yaml's
    python -m pipeline.extract --backbone tf_efficientnet_lite1 --out data/sweep/tf_efficientnet_lite1/features.h5
    # augmented train views for the heads (dvc.yaml `extract_views`): extract.views seeded views of each train image
    python -m pipeline.extract --views --out data/views.h5
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline.core.features.extraction import extract_features
from pipeline.core.features.views import write_no_views
from pipeline.infra import runlog
from pipeline.infra.artifacts import write_json
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser
from pipeline.infra.runtime import dist_info

log = logging.getLogger("pipeline.extract")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.extract", __doc__, ("backbone", "extract"),
                          epilog="Several GPUs: torchrun --nproc_per_node=N -m pipeline.extract ...")
    parser.add_argument("--index", type=Path, default=Path("data/prepared"),
                        help="folder with index.csv and classes.json from prepare (default: %(default)s)")
    parser.add_argument("--out", type=Path,
                        help="features file to write; checkpoints go to OUT.partial/ (default: data/features.h5, "
                             "with --views data/views.h5)")
    parser.add_argument("--backbone", help="backbone.name for this run instead of params.yaml's (the sweep)")
    parser.add_argument("--weights", help="backbone.weights for this run instead of params.yaml's (the sweep)")
    parser.add_argument("--store", help="extract.store for this run ('none': off, so every row is timed)")
    parser.add_argument("--views", action="store_true",
                        help="write the augmented views file instead: extract.views seeded views of every train image "
                             "(the fine-tune's augmentation: extract.views_augment, views_hflip, views_crop_scale)")
    parser.add_argument("--summary", type=Path,
                        help="write the feature sizes to this JSON file (the speed goes to the run log, runs/)")
    args = parser.parse_args(argv)
    backbone = load_section("backbone", args.params)
    backbone = dataclasses.replace(backbone, name=args.backbone or backbone.name,
                                   weights=args.weights or backbone.weights)
    cfg = load_section("extract", args.params)
    if args.store is not None:
        cfg = dataclasses.replace(cfg, store=None if args.store.lower() in ("none", "null") else args.store)
    args.out = args.out or Path("data/views.h5" if args.views else "data/features.h5")
    if args.views and cfg.views == 0:
        if dist_info().is_main:
            write_no_views(args.out)
        return
    summary = extract_features(args.index, args.out, backbone, cfg, views=args.views)
    if args.summary is not None and summary["rank"] == 0:
        write_json(args.summary, {
            "backbone": backbone.name, "image_size": summary["backbone_config"]["image_size"],
            "features_per_image": summary["widths"], "images": summary["rows"]})
    runlog.note(images=summary["rows"], images_extracted=summary["rows_extracted"],
                images_resumed=summary["rows_resumed"],
                images_reused=summary["rows_reused"], img_per_s=round(summary["img_per_s"], 2),
                device=summary["device"], world_size=summary["world_size"], precision=cfg.precision,
                **{k: _rounded(summary[k]) for k in TIME_SPLIT})
    log.info("extract: %d images in %.1f s (%.1f img/s per process, %d resumed) on %s x %d, %s %s -> %s; %s",
             summary["rows_extracted"], summary["seconds"], summary["img_per_s"], summary["rows_resumed"],
             summary["device"], summary["world_size"], backbone.name, cfg.precision, args.out, time_split(summary))


# The summary's time split (issue 27): where a run's fixed cost goes, noted in the run record (runs/extract.json).
TIME_SPLIT = ("wall_s", "first_batch_s", "steady_img_per_s", "after_last_batch_s")


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def time_split(summary: dict) -> str:
    """The summary's time split in words, e.g. "12.3 s in all: 5.1 s to the first batch, then 120.4 img/s, 0.8 s
    after the last batch" (a run with nothing through the backbone has no batch parts)."""
    if summary["first_batch_s"] is None:
        return f"{summary['wall_s']:.1f} s in all, no batch run"
    steady = ("one batch only" if summary["steady_img_per_s"] is None
              else f"then {summary['steady_img_per_s']:.1f} img/s over {summary['steady_rows']} rows")
    return (f"{summary['wall_s']:.1f} s in all: {summary['first_batch_s']:.1f} s to the first batch, {steady}, "
            f"{summary['after_last_batch_s']:.1f} s after the last batch")


if __name__ == "__main__":
    run_main(main, "extract")
