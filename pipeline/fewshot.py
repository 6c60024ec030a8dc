"""Stage `fewshot`: few-shot episodes on the feature cache, accuracy against train images per class.

For each k of `fewshot.shots` (1, 2, 4, 8, 16), `fewshot.episodes` draws of k train images per class (seeded, nested
across k; each episode's seed is recorded), three probes fitted on each draw (logistic regression with a fixed C,
DINOv2's weighted kNN, the nearest class mean, all on the same pooled features) and scored on the whole of val and
test. Writes `metrics/fewshot.json` (mean accuracy and 95 % t-interval over episodes per k, probe and split, the
per-episode accuracies, the protocol), `plots/fewshot.csv` (for `dvc plots`) and `plots/fewshot.png`; the evaluate
stage's report shows the table and the figure. Never reads an image: ~20 s on the default data (2 cores).

    dvc repro fewshot
    python -m pipeline.fewshot --features data/features.h5 --out metrics/fewshot.json --plots plots
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.evaluate.fewshot_report import plot_fewshot, write_plot_rows
from pipeline.core.features.staleness import verify_features
from pipeline.core.heads.fewshot import run_fewshot
from pipeline.infra import runlog
from pipeline.infra.artifacts import write_json
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.fewshot")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.fewshot", __doc__, ("fewshot",))
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="features file from extract")
    parser.add_argument("--index", type=Path, default=Path("data/prepared"),
                        help="prepare's output folder; when it exists, the features must come from its index.csv "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("metrics/fewshot.json"), help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, default=Path("plots"),
                        help="folder for fewshot.csv (DVC plots) and fewshot.png (default: %(default)s)")
    args = parser.parse_args(argv)
    cfg = load_section("fewshot", args.params)
    # Refuse stale features (another backbone, preprocessing, precision, dtype or index) before any episode.
    verify_features(args.features, load_section("backbone", args.params), load_section("extract", args.params),
                    args.index if (args.index / "index.csv").is_file() else None)
    runlog.note(device="cpu", precision="fp32")
    result = run_fewshot(args.features, cfg)
    write_json(args.out, result)
    write_plot_rows(args.plots / "fewshot.csv", result)
    plot_fewshot(args.plots / "fewshot.png", result)
    log.info("fewshot: wrote %s, %s and %s", args.out, args.plots / "fewshot.csv", args.plots / "fewshot.png")


if __name__ == "__main__":
    run_main(main, "fewshot")
