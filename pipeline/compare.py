"""Stage `compare`: the backbone sweep's comparison, one table for every backbone of `sweep.backbones`.

The sweep (dvc.yaml: `sweep_extract` and `sweep_heads`, DVC `matrix` stages) extracts each backbone once and fits
both heads on its cache; DVC reruns only the backbones and heads whose inputs changed. This stage gathers their
metrics into `metrics/sweep.json` (val accuracy and loss per head, features per image, image size) and
`plots/sweep.csv` (for `dvc plots`); the evaluate stage puts the table and a figure in the report. Extraction speed,
which differs on every run, stays out of those tracked files: this stage writes the table with a speed column, read
from the sweep stages' run logs, to `runs/sweep.md` (untracked).

    dvc repro compare                       # the whole sweep, reusing every unchanged backbone
    dvc exp run -S 'sweep.backbones=[tf_efficientnet_lite0,resnet50]' -S sweep.weights=hub
    python -m pipeline.compare --sweep-dir metrics/sweep --out metrics/sweep.json --plots plots
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.comparison import best, collect, speeds, sweep_table, write_plot_rows
from pipeline.infra import runlog
from pipeline.infra.artifacts import write_json
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.compare")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.compare", __doc__, ("sweep",))
    parser.add_argument("--sweep-dir", type=Path, default=Path("metrics/sweep"),
                        help="folder of the sweep's per-backbone metrics (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("metrics/sweep.json"), help="comparison metrics to write")
    parser.add_argument("--plots", type=Path, default=Path("plots"), help="folder for sweep.csv (DVC plots)")
    args = parser.parse_args(argv)
    cfg = load_section("sweep", args.params)
    results = collect(args.sweep_dir, cfg.backbones)
    write_json(args.out, results)
    write_plot_rows(args.plots / "sweep.csv", results)
    speed = speeds(cfg.backbones)
    table = runlog.run_dir() / "sweep.md"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text("\n".join(sweep_table(results, speed)) + "\n")
    name, head, acc = best(results)
    for backbone, r in results.items():
        rate = f", {speed[backbone]['img_per_s']:.1f} img/s" if backbone in speed else ""
        log.info("compare: %s: val accuracy %s%s", backbone, {h: round(a, 4) for h, a in r["val_accuracy"].items()},
                 rate)
    log.info("compare: best %s with %s (val accuracy %.4f); table with speeds: %s", name, head, acc, table)


if __name__ == "__main__":
    run_main(main, "compare")
