"""Grid or random search over one head's params on the cached features: one table, and the best params.

Each point is params.yaml's `heads.<head>` section with the `--grid` keys replaced, fitted exactly as the
`heads@<head>` stage fits it (pipeline/core/heads/search.py); only data/features.h5 is read, so a point costs one head fit
(seconds on the default data). Not a DVC stage: it writes `<out>/table.csv` (one row per point: the params varied,
val accuracy and loss, balanced accuracy, train accuracy, seconds; points numbered from 1) and `<out>/search.json`
(the rows, the best point and the `dvc exp run -S ...` line that runs the pipeline with it), replacing an earlier
search's files there (a log line names them). Values are YAML as typed on a command line: 3e-4 is a number.

    python -m pipeline.search mlp --grid 'dropout=[0.2,0.35,0.5]' --grid 'hidden=[256,512,1024]'
    python -m pipeline.search mlp --grid 'lr=[3e-4,1e-3,3e-3]' --grid 'weight_decay=[0,0.01,0.1]' --random 5
    python -m pipeline.search logreg --grid 'C=[0.003,0.01,0.03,0.1]' --grid 'pooling=[avg,catavgmax]'
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline.core.features.staleness import verify_features
from pipeline.core.heads.search import (
    check_paths,
    dvc_note,
    grid_points,
    parse_grid,
    point_config,
    run_search,
    set_command,
    write_results,
)
from pipeline.infra.config import HeadsConfig, load_section
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.search")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    heads = [f.name for f in dataclasses.fields(HeadsConfig)]
    parser = stage_parser("python -m pipeline.search", __doc__, tuple(f"heads.{h}" for h in heads))
    parser.add_argument("head", choices=heads, help="which head's params to search")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=VALUES",
                        help="a key of heads.<head> and its values as YAML, e.g. 'dropout=[0.2,0.5]' or "
                             "'lr=[3e-4,1e-3]' (repeatable; at least one)")
    parser.add_argument("--random", type=int, metavar="N", help="fit N points drawn at random from the grid")
    parser.add_argument("--seed", type=int, help="seed of --random's draw (default: 0); only with --random")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"),
                        help="features file from extract (default: %(default)s)")
    parser.add_argument("--index", type=Path,
                        help="prepare's output folder: the features must come from its index.csv (default: "
                             "data/prepared, when it exists)")
    parser.add_argument("--out", type=Path, help="where to write table.csv and search.json (default: search/<head>)")
    args = parser.parse_args(argv)
    base = getattr(load_section("heads", args.params), args.head)
    grid = parse_grid(args.grid, base, f"heads.{args.head}")
    points = grid_points(grid, args.random, args.seed)
    for point in points:  # every point valid (`dropout=` is a null dropout) before the features are even opened
        point_config(base, point, f"heads.{args.head}")
    out = args.out or Path("search") / args.head
    index = check_paths(args.features, args.index, out)
    # Refuse stale features before fitting anything, as the heads stage does.
    verify_features(args.features, load_section("backbone", args.params), load_section("extract", args.params), index)
    log.info("search: %d point(s) of heads.%s over %s", len(points), args.head, ", ".join(grid))
    rows, best = run_search(args.head, args.features, base, points)
    write_results(out, args.head, base, grid, rows, best)
    params = {k: best[k] for k in grid}
    log.info("search: best point %d of %d, %s: val accuracy %.4f, loss %.4f; table in %s; to run the pipeline "
             "with it: %s", best["point"], len(rows), params, best["val_accuracy"], best["val_loss"],
             out / "table.csv", set_command(args.head, params))
    note = dvc_note(args.head, params)
    if note:
        log.warning("search: %s", note)


if __name__ == "__main__":
    run_main(main, "search")
