"""Stage `evaluate`: metrics of the selected head and of the fine-tuned model on val (and test when there is one),
plots, and a report a person reads.

Writes `metrics/evaluate.json` (DVC metrics); for DVC plots, confusion-matrix rows (`actual,predicted` per image) of
each model on the test split when there is one, else on val, `plots/heads.csv` (val accuracy per head) and
`plots/misclassified.png` (a few misclassified val images); and `report/report.md` with its figures. The backbone
comparison is the compare stage's own (metrics/sweep.json, plots/sweep.png): this stage never waits for it. The
few-shot results are the `fewshot` stage's (metrics/fewshot.json): the report shows their table and figure.

    python -m pipeline.evaluate --out metrics/evaluate.json --plots plots --fewshot metrics/fewshot.json
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.core.evaluate.evaluation import evaluate
from pipeline.infra.artifacts import write_json
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.evaluate")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.evaluate", __doc__, params=False)
    parser.add_argument("--index", type=Path, default=Path("data/prepared"), help="prepare's output folder")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="extract's features file")
    parser.add_argument("--heads-dir", type=Path, default=Path("models/heads"), help="folder of fitted heads")
    parser.add_argument("--selected", type=Path, default=Path("models/selected.json"), help="select's choice")
    parser.add_argument("--finetuned", type=Path, default=Path("models/finetune"),
                        help="fine-tuned model folder; 'none' to score the head alone")
    parser.add_argument("--out", type=Path, default=Path("metrics/evaluate.json"), help="metrics JSON to write")
    parser.add_argument("--plots", type=Path, default=Path("plots"),
                        help="folder for the DVC plots (confusion CSVs, heads.csv, misclassified.png)")
    parser.add_argument("--report", type=Path, default=Path("report"),
                        help="folder for report.md and its figures (default: %(default)s)")
    parser.add_argument("--fewshot", type=Path, default=Path("metrics/fewshot.json"),
                        help="the fewshot stage's metrics, shown in the report; 'none' to leave them out "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    finetuned = None if str(args.finetuned) == "none" else args.finetuned
    fewshot = None if str(args.fewshot) == "none" else args.fewshot
    result = evaluate(args.index, args.features, args.heads_dir, args.selected, finetuned, args.plots, args.report,
                      fewshot)
    write_json(args.out, result)
    for model in ("best_head", "finetune"):
        if model in result:
            log.info("evaluate: %s %s", model, {s: round(m["accuracy"], 4) for s, m in result[model].items()
                                                 if isinstance(m, dict)})


if __name__ == "__main__":
    run_main(main, "evaluate")
