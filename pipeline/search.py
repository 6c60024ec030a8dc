"""Search one head's params on the cached features: a grid, random draws or Optuna's TPE; one table, the best params.

Each point is params.yaml's `heads.<head>` section with the `--grid` keys replaced, fitted exactly as the
`heads@<head>` stage fits it (pipeline/core/heads/search.py); only data/features.h5 is read, so a point costs one head fit
(seconds on the default data). `--grid` takes lists (`hidden=[256,512,1024]`) and, for the random and TPE samplers,
ranges (`dropout=(0.0,0.6)`, `lr=log(1e-4,1e-2)`; pipeline/infra/space.py). Not a DVC stage: it writes
`<out>/table.csv` (one row per point, numbered from 1: the params, val accuracy and loss, balanced accuracy, train
accuracy) and `<out>/search.json` (the rows, the best point and the `dvc exp run -S ...` line that runs the pipeline
with it); the same command gives the same bytes. `<out>/trials.jsonl` is the study: run an interrupted search again
and it resumes at the first unfinished trial (a larger --trials extends a finished one). Values are YAML as typed on
a command line: 3e-4 is a number.

    python -m pipeline.search mlp --grid 'dropout=[0.2,0.35,0.5]' --grid 'hidden=[256,512,1024]'
    python -m pipeline.search mlp --grid 'lr=log(1e-4,1e-2)' --grid 'dropout=(0.0,0.6)' --sampler tpe --trials 30
    python -m pipeline.search mlp --grid 'lr=[3e-4,1e-3,3e-3]' --grid 'weight_decay=[0,0.01,0.1]' --random 5
    python -m pipeline.search logreg --grid 'C=[0.003,0.01,0.03,0.1]' --grid 'pooling=[avg,catavgmax]'
    python -m pipeline.search logreg --grid 'views=[0,1,2,4]'          # cached augmented views (extract.views: 4)
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline.core.features.staleness import verify_features
from pipeline.core.heads.search import (
    check_paths,
    open_study,
    resolve_sampler,
    run_search,
    set_command,
    write_results,
)
from pipeline.infra.config import HeadsConfig, load_section
from pipeline.infra.runner import run_main, stage_parser
from pipeline.infra.space import check_space, parse_space
from pipeline.infra.study import SAMPLERS, budget

log = logging.getLogger("pipeline.search")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    heads = [f.name for f in dataclasses.fields(HeadsConfig)]
    parser = stage_parser("python -m pipeline.search", __doc__, tuple(f"heads.{h}" for h in heads))
    parser.add_argument("head", choices=heads, help="which head's params to search")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=VALUES",
                        help="a key of heads.<head> and its values: a YAML list ('dropout=[0.2,0.5]'), a range "
                             "'dropout=(0.0,0.6)' or a log range 'lr=log(1e-4,1e-2)' (repeatable; at least one)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="grid: every point of the lists (default); random: --trials points drawn at random; "
                             "tpe: Optuna's TPE, each trial proposed from the ones before")
    parser.add_argument("--trials", type=int, metavar="N", help="the budget: points to fit (default: the whole grid)")
    parser.add_argument("--random", type=int, metavar="N", help="short for --sampler random --trials N")
    parser.add_argument("--seed", type=int, help="seed of the random and TPE samplers' draws (default: 0)")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"),
                        help="features file from extract (default: %(default)s)")
    parser.add_argument("--views", type=Path, default=Path("data/views.h5"),
                        help="augmented views file, read only by points with views > 0 (default: %(default)s)")
    parser.add_argument("--index", type=Path,
                        help="prepare's output folder: the features must come from its index.csv (default: "
                             "data/prepared, when it exists)")
    parser.add_argument("--out", type=Path, help="where to write table.csv, search.json and the study's "
                                                 "trials.jsonl (default: search/<head>)")
    args = parser.parse_args(argv)
    base = getattr(load_section("heads", args.params), args.head)
    sampler, trials, seed = resolve_sampler(args.sampler, args.trials, args.random, args.seed)
    space = parse_space(args.grid, base, f"heads.{args.head}")
    total = budget(space, sampler, trials)
    check_space(base, space, f"heads.{args.head}")  # every value valid before the features are even opened
    out = args.out or Path("search") / args.head
    index = check_paths(args.features, args.index, out)
    # Refuse stale features before fitting anything, as the heads stage does.
    verify_features(args.features, load_section("backbone", args.params), load_section("extract", args.params), index)
    log.info("search: %s, %d trial(s) of heads.%s over %s", sampler, total, args.head, ", ".join(space))
    views = args.views if args.views.is_file() else None
    study = open_study(out, args.head, base, args.features, space, sampler, seed, views)
    rows, best = run_search(args.head, args.features, base, study, total, views)
    write_results(out, args.head, base, study, rows, best)
    params = {k: best[k] for k in space}
    log.info("search: best point %d of %d, %s: val accuracy %.4f, loss %.4f; table in %s; to run the pipeline "
             "with it: %s", best["point"], len(rows), params, best["val_accuracy"], best["val_loss"],
             out / "table.csv", set_command(args.head, params))


if __name__ == "__main__":
    run_main(main, "search")
