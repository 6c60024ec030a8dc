"""Tune the fine-tune through DVC experiments: a sampler proposes `finetune.*` params, each trial is a queued experiment.

Each trial is an ordinary `dvc exp run --queue -n <name>-NNN finetune -S finetune.<key>=<value>` experiment, run by
`dvc queue start -j <jobs>` (prepare, extract and the heads are reused from the cache; the fine-tune runs, and
evaluate, which only reports, once for the trial taken: `dvc exp apply <name>-NNN && dvc repro`); its val accuracy and loss (metrics/finetune.json) go back to the sampler before the next batch is proposed, until
the budget. `--grid` takes lists and ranges as `pipeline.search` does (`lr=log(1e-4,1e-2)`, `body_lr_ratio=(0.05,0.5)`,
`bn=[eval,train]`). Every trial stays in `dvc exp show` (inspect, `dvc exp apply <name>-NNN`, `dvc exp push`); the
table of trials and the best one go to `<out>/<name>/table.csv` and `tune.json`, the study to `trials.jsonl` there:
run the command again and it resumes (trials already queued or finished are read back, not run twice). Run it at the
repository root, on a commit (the experiments are based on HEAD plus the workspace's changes).

    python -m pipeline.tune --grid 'lr=log(1e-4,1e-2)' --grid 'body_lr_ratio=(0.05,0.5)' --sampler tpe --trials 12
    python -m pipeline.tune --grid 'lr=log(3e-4,3e-3)' --grid 'bn=[eval,train]' --sampler tpe --trials 16 --jobs 2
    dvc exp show --only-changed                      # every trial, with its params and metrics
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.finetune.tuning import check_name, open_study, run_tuning
from pipeline.core.heads.search import resolve_sampler
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser
from pipeline.infra.space import check_space, parse_space
from pipeline.infra.study import SAMPLERS, budget, write_trials

log = logging.getLogger("pipeline.tune")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.tune", __doc__, ("finetune",))
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=VALUES",
                        help="a key of finetune and its values: a YAML list ('bn=[eval,train]'), a range "
                             "'body_lr_ratio=(0.05,0.5)' or a log range 'lr=log(1e-4,1e-2)' (repeatable; at least one)")
    parser.add_argument("--sampler", choices=SAMPLERS, help="grid (default), random, or tpe (Optuna's TPE)")
    parser.add_argument("--trials", type=int, metavar="N", help="the budget: experiments to run (default: the grid)")
    parser.add_argument("--seed", type=int, help="seed of the random and TPE samplers' draws (default: 0)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="experiments run at once (`dvc queue start -j N`; default: %(default)s)")
    parser.add_argument("--name", default="tune", help="the tuning's name: experiments are <name>-001, <name>-002 ... "
                                                       "(default: %(default)s)")
    parser.add_argument("--target", default="finetune",
                        help="the stage each experiment runs up to (default: %(default)s; evaluate only reports, run "
                             "it for the trial taken; '' for the whole pipeline)")
    parser.add_argument("--out", type=Path, default=Path("search/finetune"),
                        help="where <name>/table.csv, tune.json and trials.jsonl go (default: %(default)s)")
    args = parser.parse_args(argv)
    base = load_section("finetune", args.params)
    sampler, trials, seed = resolve_sampler(args.sampler, args.trials, None, args.seed)
    space = parse_space(args.grid, base, "finetune")
    total = budget(space, sampler, trials)
    check_space(base, space, "finetune")
    name = check_name(args.name)
    if not 1 <= args.jobs <= 64:
        parser.error(f"--jobs {args.jobs}: give 1 to 64 experiments at once")
    study = open_study(args.out, name, "finetune", base, space, sampler, seed, Path.cwd())
    log.info("tune: %s, %d trial(s) of finetune over %s as DVC experiments %s-NNN, %d at a time", sampler, total,
             ", ".join(space), name, args.jobs)
    rows, best = run_tuning(Path.cwd(), "finetune", study, total, args.jobs, name, args.target)
    write_trials(args.out / name, "tune.json", rows, {"sampler": sampler, "seed": seed, "best": best})
    log.info("tune: best trial %s (%s): val accuracy %.4f, loss %.4f; table in %s; to take it: dvc exp apply %s",
             best["trial"], best["experiment"], best["val_accuracy"], best["val_loss"], args.out / name / "table.csv",
             best["experiment"])


if __name__ == "__main__":
    run_main(main, "tune")
