"""Predict classes of image files with the fine-tuned model or the selected head.

Preprocessing, classes and weights come from the saved artefacts (`models/finetune/model.json`, or the head's
`head.json` and the features fingerprint it records), never from guesses or from the current params.yaml. Files are
read in batches on the GPU when there is one; a file that cannot be read gets a row with its error instead of
stopping the run, and files in a folder that are hidden or have no image extension are counted and named in the log.
Every flag is checked before any work, with one line naming it.

    python -m pipeline.predict photos/ extra.jpg                    # fine-tuned model, CSV to predictions.csv
    python -m pipeline.predict --model head --top-k 2 photos/        # the selected head on the frozen backbone
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

from pipeline.core.evaluate.prediction import (
    check_options,
    collect_files,
    describe_files,
    load_model,
    predict,
    write_rows,
)
from pipeline.infra.errors import PipelineError
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.predict")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(
        "python -m pipeline.predict", __doc__, params=False,
        epilog="Inputs: models/finetune (model.safetensors + model.json) or models/selected.json + models/heads/<head>."
               " Output: a CSV (path, predicted, probability, top_k, error) and the same rows on stdout."
               " Reads no params.yaml: everything comes from the saved models.")
    # str, not Path: Path("https://x") drops a slash, and the URL check must see what was typed
    parser.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", choices=("finetune", "head"), default="finetune",
                        help="the fine-tuned network, or the selected head on the frozen backbone (default: %(default)s)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"),
                        help="where dvc repro put the models (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3,
                        help="classes listed per image, 1 or more (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers for decoding; 0 decodes in this process (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    args = parser.parse_args(argv)
    check_options(args.top_k, args.batch_size, args.workers, args.device, args.out)
    files, skipped = collect_files(args.paths)
    if skipped:  # left out of a folder by name: said here, since they get no row in the CSV
        log.info("predict: %d file(s) in the folders skipped (hidden, or not an image extension): %s", len(skipped),
                 describe_files(skipped))
    net, pre, classes, what = load_model(args.model, args.models_dir)
    if args.top_k > len(classes):
        log.info("predict: --top-k %d is more than the model's %d classes: listing all %d", args.top_k,
                 len(classes), len(classes))
    log.info("predict: %d files with the %s, %d px", len(files), what, pre.size)
    rows = predict(net, pre, classes, files, args.top_k, args.batch_size, args.workers, args.device)
    write_rows(args.out, rows)
    bad = [r for r in rows if r["error"]]
    out = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
    out.writeheader()
    out.writerows(rows)
    log.info("predict: %d predicted, %d unreadable (see the error column), %d skipped in the folders, written to %s",
             len(rows) - len(bad), len(bad), len(skipped), args.out)
    if len(bad) == len(rows):  # nothing was predicted: a script checking the exit code must see that
        raise PipelineError(f"none of the {len(rows)} files could be read (first: {bad[0]['path']}: "
                            f"{bad[0]['error']}); see the error column in {args.out}")


if __name__ == "__main__":
    run_main(main, "predict")
