"""Stage `compare`: one table of backbones, the main pipeline's first, then each of `sweep.backbones`.

The main backbone's row comes from its heads' metrics (`metrics/heads/<head>.json`): comparing never extracts it
again. The sweep is opt-in (`sweep.backbones: []` by default): each backbone listed there is extracted once by its
own `sweep_extract@<backbone>` stage (through the feature store, so a backbone extracted before is reused) and every
head is fitted on its cache (`sweep_heads`, metrics in `metrics/heads/sweep/<backbone>/`); DVC reruns only the
backbones whose inputs changed. This stage writes `metrics/sweep.json` (val accuracy with its 95 % interval and loss
per head, crop size, feature width), `plots/sweep.csv` (for `dvc plots`) and `plots/sweep.png`. Extraction speed, which differs on every
run, stays out of those tracked files: the table with a speed column, read from the extraction stages' run logs,
goes to `runs/sweep.md` (untracked). Cost: every listed backbone extracts every image once (images x backbones).

    dvc repro compare                       # the main backbone's row (and the sweep's, when it lists any)
    dvc exp run -S 'sweep.backbones=[tf_efficientnet_lite1,tf_efficientnet_lite2]'   # two more, offline
    python -m pipeline.compare --heads-dir metrics/heads --out metrics/sweep.json --plots plots
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.evaluate.comparison import best, collect, plot_sweep, speeds, sweep_table, write_plot_rows
from pipeline.infra import runlog
from pipeline.infra.artifacts import write_json
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.compare")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.compare", __doc__, ("sweep",))
    parser.add_argument("--heads-dir", type=Path, default=Path("metrics/heads"),
                        help="the heads' metrics folder: the main backbone's <head>.json and the sweep's "
                             "sweep/<backbone>/<head>.json (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("metrics/sweep.json"), help="comparison metrics to write")
    parser.add_argument("--plots", type=Path, default=Path("plots"),
                        help="folder for sweep.csv (DVC plots) and sweep.png (default: %(default)s)")
    args = parser.parse_args(argv)
    cfg = load_section("sweep", args.params)
    results = collect(args.heads_dir, cfg.backbones)
    write_json(args.out, results)
    write_plot_rows(args.plots / "sweep.csv", results)
    plot_sweep(args.plots / "sweep.png", results)
    speed = speeds(results)
    table = runlog.run_dir() / "sweep.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(sweep_table(results, speed)) + "\n")
    for backbone, r in results.items():
        rate = f", {speed[backbone]['img_per_s']:.1f} img/s" if backbone in speed else ""
        log.info("compare: %s: val accuracy %s%s", backbone, {h: round(a, 4) for h, a in r["val_accuracy"].items()},
                 rate)
    name, head, acc = best(results)
    log.info("compare: best %s with %s (val accuracy %.4f); table with speeds: %s", name, head, acc, table)


if __name__ == "__main__":
    run_main(main, "compare")
