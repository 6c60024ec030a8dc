"""`python -m pipeline.summary`: the headline numbers of the last run, in one short table.

Reads only what the stages wrote (metrics/heads/<head>.json, metrics/evaluate.json, metrics/sweep.json,
models/selected.json): each head's val scores, the fine-tuned network's val and test scores, the selected head, and
the backbone comparison when the sweep ran. Everything else is in `dvc metrics show` (every number, per-class lists
included) and report/report.md.

    python -m pipeline.summary                 # aligned text
    python -m pipeline.summary --markdown      # the table README quotes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.core.evaluate.summary import markdown, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"),
                        help="the stages' metrics folder (default: %(default)s)")
    parser.add_argument("--selected", type=Path, default=Path("models/selected.json"),
                        help="select's choice (default: %(default)s)")
    parser.add_argument("--markdown", action="store_true", help="a markdown table instead of aligned text")
    args = parser.parse_args(argv)
    sys.stdout.write((markdown if args.markdown else text)(args.metrics_dir, args.selected))


if __name__ == "__main__":
    main()  # no run log and no torch: it only reads JSON, and should answer at once
