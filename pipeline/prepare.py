"""Stage `prepare`: builds the dataset index from an ImageFolder root.

The root holds one subfolder per class, or `train/`, `val/` (or `valid/`, or `validation/`; and optionally `test/`)
folders that each hold one subfolder per class; `data.val_fraction` and `data.test_fraction` apply only without
split folders. Without them the split is a deterministic stratified draw: each file's place is decided by a hash of
the seed and its relative path, so adding one image never reshuffles the others.

Every file under the root is decoded once, in full, with the same loader extraction uses, so a file that is in the
index can be read later. Files that cannot be used (corrupt, truncated, empty, not an image, over
`data.max_image_pixels`, hidden) are never dropped silently: they are listed in `skipped.csv` with the reason and
counted in the log; with `data.on_bad_file: error` any of them (hidden files aside) stops the stage instead.

Outputs (in `--out`): `index.csv` (id, path, class, label, split, sha256 of the file's bytes, sorted by split then
path), `classes.json` (class list, source, counts, warnings, the train images' sizes for `backbone.image_size: auto`),
`skipped.csv` (path, reason) and `duplicates.csv` (files with byte-identical twins, so leakage between splits can be
checked).

    python -m pipeline.prepare --params params.yaml --out data/prepared
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.data.scan import log_summary, scan, write_index
from pipeline.infra.config import DataConfig, load_section
from pipeline.infra.runner import run_main, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.prepare", __doc__, ("data",))
    parser.add_argument("--out", type=Path, default=Path("data/prepared"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    cfg: DataConfig = load_section("data", args.params)
    cache = None if cfg.scan_cache is None else (
        args.out.parent / "scan_cache.json" if cfg.scan_cache == "auto" else Path(cfg.scan_cache))
    result = scan(Path(cfg.source), cfg, cache)
    write_index(args.out, cfg.source, result, cfg.max_image_pixels, cfg.max_aspect_ratio)
    log_summary(result, args.out)


if __name__ == "__main__":
    run_main(main, "prepare")
