"""Compare this checkout's pipeline outputs with the committed ones, and say how far apart they are.

Run after `dvc repro`. For each artefact it prints one verdict:
- `same`: identical bytes (what every x86-64 CPU gives with portable numerics, the default: Intel and AMD alike);
- `within tolerance`: bytes differ where they cannot match (a GPU on either side, other package versions, numerics
  not pinned), and the numbers agree: accuracies and per-class precision/recall within a binomial bound counted in
  images (`--z`), losses within `--loss-rtol`, features within `allclose(--rtol, --atol)`;
- `different`: any other difference, with the headline numbers (accuracy and loss of each split) that moved.
What is compared: each stage's inputs in `dvc.lock` (command, params, hashes of code and source data: these never
depend on the machine, so any difference is `different`), the outputs' hashes against the committed `dvc.lock` (git
HEAD; bytes that differ are judged by the metrics and features), every metrics file declared in `dvc.yaml` against its
committed version, and the features file against `reference/features.json` + `reference/features.npz` (a fixed sample
of rows), which `--record` writes and you commit. CI runs it after a fresh `dvc repro` (`make check-repro`).
Before the verdicts it prints where each side's numbers came from (pipeline/infra/provenance.py): CPU model,
instruction sets in use, pinned numerics or not, threads, GPU, TF32 and precision, per stage, from this checkout's run
log (`runs/<DVC stage>.json`) and from the committed `reference/provenance.json` (written by `--record` with the rest).

    python -m pipeline.verify                       # verdicts; exit 1 if anything is `different`
    python -m pipeline.verify --strict              # exit 1 unless everything is `same`
    python -m pipeline.verify --record              # after a reference run: write reference/ (then commit it)
    python -m pipeline.verify --cache               # after `dvc repro`: exit 1 if DVC failed to cache an output
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.core.evaluate.tolerance import Tolerances
from pipeline.core.evaluate.verification import CLOSE, DIFFERENT, SAME, committed_provenance, record, verify
from pipeline.infra import provenance
from pipeline.infra.dvc_cache import cache_report
from pipeline.infra.runner import run_main, stage_parser

log = logging.getLogger("pipeline.verify")  # not __name__: run as __main__ under `python -m`


def main(argv: list[str] | None = None) -> None:
    head, rest = __doc__.split("\n\n", 1)
    parser = stage_parser("python -m pipeline.verify", head, params=False, epilog=rest)
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"))
    parser.add_argument("--reference", type=Path, default=Path("reference"), help="committed feature sample")
    parser.add_argument("--rtol", type=float, default=1e-3, help="features: allclose rtol (default: %(default)s)")
    parser.add_argument("--atol", type=float, default=1e-4, help="features: allclose atol (default: %(default)s)")
    parser.add_argument("--z", type=float, default=Tolerances.z,
                        help="proportions: allowed difference in images, in standard deviations of the difference "
                             "of two binomial counts (default: %(default)s)")
    parser.add_argument("--loss-rtol", type=float, default=Tolerances.loss_rtol,
                        help="losses: allowed relative difference (default: %(default)s)")
    parser.add_argument("--strict", action="store_true", help="fail unless every artefact is byte-identical")
    parser.add_argument("--record", action="store_true", help="write the reference feature sample and exit")
    parser.add_argument("--cache", action="store_true",
                        help="only check that every output in dvc.lock is stored in the DVC cache; exit 1 if not")
    args = parser.parse_args(argv)
    if args.cache:
        stored, lines = cache_report()
        print("\n".join(lines))
        sys.exit(0 if stored else 1)
    if args.record:
        record(args.features, args.reference)
        log.info("verify: wrote %s/features.json, features.npz and provenance.json; commit them", args.reference)
        return
    results, mode = verify(args.features, args.reference, args.rtol, args.atol,
                           Tolerances(z=args.z, loss_rtol=args.loss_rtol))
    for line in provenance.report_lines(committed_provenance(args.reference), provenance.current()):
        print(line)
    print(mode)
    width = max(len(r[0]) for r in results)
    for name, verdict, detail in results:
        print(f"{name:<{width}}  {verdict:<16}  {detail}")
    verdicts = {v for _, v, _ in results}
    overall = DIFFERENT if DIFFERENT in verdicts else CLOSE if CLOSE in verdicts else SAME
    print(f"verdict: {overall}")
    if overall == DIFFERENT or (args.strict and overall != SAME):
        sys.exit(1)


if __name__ == "__main__":
    run_main(main, "verify")
