"""Stage `select`: picks the best head by val accuracy and records which and why.

Ties go to the lower val loss, then to the simpler head (the order of `--heads`). The selected head (`head`) may be
any head, kNN included; the fine-tune warm-starts from `warm_start_head`, the best head with weights (logreg or mlp),
since a kNN head has none. When the best head's val accuracy 95 % interval overlaps the runner-up's, the log and
selected.json (`tie_within_interval`) say it is a tie within the interval. `dvc repro select` runs everything up to
here and stops before fine-tuning.

    python -m pipeline.select --heads logreg mlp knn --out models/selected.json
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.heads.selection import select_head
from pipeline.infra.artifacts import read_json, write_json
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.select")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.select", __doc__, params=False)
    parser.add_argument("--heads", nargs="+", default=["logreg", "mlp", "knn"], help="heads to compare, simplest first")
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics/heads"), help="where heads wrote metrics")
    parser.add_argument("--out", type=Path, default=Path("models/selected.json"), help="choice file to write")
    args = parser.parse_args(argv)
    metrics = {h: read_json(args.metrics_dir / f"{h}.json") for h in args.heads}
    choice = select_head(metrics)
    write_json(args.out, choice)
    log.info("select: %s", choice["reason"])
    if choice["interval"]:
        log.info("select: %s", choice["interval"])
    log.info("select: the fine-tune warm-starts from %s", choice["warm_start_reason"])


if __name__ == "__main__":
    run_main(main, "select")
