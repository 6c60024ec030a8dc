"""What the feature store holds, and removing settings from it (not a DVC stage).

The store (`extract.store`, default `data/feature_store/`) keeps every row ever extracted, one folder per
extraction settings (backbone, weights, preprocessing, precision, dtype, decoder, library versions, device type).
After each extraction it is cut down to `extract.store_max_gb` by removing the least recently used settings; this
command shows where the disk goes and removes settings by hand. Removing is always safe: rows that are needed again
are recomputed, and the features files do not change.

    python -m pipeline.store                       # one line per settings: key, settings, rows, size, last used
    python -m pipeline.store --remove 1f3a9c0d2b4e5f60 7a8b9c0d1e2f3a4b
    python -m pipeline.store --remove-all-but 1     # keep only the most recently used settings
    python -m pipeline.store --store /big/disk/feature_store
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.features.store_space import list_store, remove_settings, store_root
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.store")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.store", __doc__, ("extract",))
    parser.add_argument("--store", type=Path,
                        help="the store's folder (default: extract.store of --params; auto = data/feature_store)")
    parser.add_argument("--remove", nargs="+", metavar="KEY", default=[], help="remove these settings (their keys)")
    parser.add_argument("--remove-all-but", type=int, metavar="N",
                        help="remove all but the N most recently used settings")
    args = parser.parse_args(argv)
    root = args.store or store_root(load_section("extract", args.params).store, Path("data/prepared"))
    if args.remove or args.remove_all_but is not None:
        remove_settings(root, args.remove, args.remove_all_but)
    for line in list_store(root):
        log.info("%s", line)


if __name__ == "__main__":
    run_main(main, "store")
