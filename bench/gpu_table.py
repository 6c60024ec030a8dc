"""One table for a pipeline run on another machine (bench/gpu_check.sh): each stage's seconds and `pipeline.verify`'s
verdict against the committed results, with the extraction speeds of the same run.

Why one table: a lent GPU machine gives minutes, and the run's answer is three things read together: did every stage
run there (its run record in runs/<stage>.json, written by the stage itself under `dvc repro`), how far are its results
from the committed CPU ones (the verdicts of `pipeline.verify`, grouped by the stage that wrote each output, with the
stage's inputs), and how fast is extraction, in the stage and in bench/extract.py's pipeline-vs-textbook loops
(`--extract-json`). Run from the repository root after `dvc repro`.

    python bench/gpu_table.py --since EPOCH [--repro-seconds S] [--extract-json FILE]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.evaluate.tolerance import Tolerances  # noqa: E402
from pipeline.core.evaluate.verification import CLOSE, DIFFERENT, SAME, _git_show, verify  # noqa: E402
from pipeline.infra import runlog  # noqa: E402

RANK = {SAME: 0, CLOSE: 1, DIFFERENT: 2}


def stage_order(lock: dict, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The lock's stages (foreach items expanded) in dvc.yaml's order."""
    if not lock.get("stages"):
        return []
    order = list(yaml.safe_load(dvc_yaml.read_text())["stages"])
    return sorted(lock.get("stages", {}), key=lambda s: (order.index(s.split("@")[0]) if s.split("@")[0] in order
                                                         else len(order), s))


def by_stage(results: list[tuple[str, str, str]], lock: dict) -> dict[str, list[tuple[str, str, str]]]:
    """verify's results grouped by stage: `inputs: <stage>` and each output under the stage that writes it."""
    owner = {o["path"]: stage for stage, body in lock.get("stages", {}).items() for o in body.get("outs", [])}
    grouped: dict[str, list[tuple[str, str, str]]] = {}
    for name, verdict, detail in results:
        stage = name[len("inputs: "):] if name.startswith("inputs: ") else owner.get(name, "(other)")
        grouped.setdefault(stage, []).append((name, verdict, detail))
    return grouped


def _short(text: str, width: int = 110) -> str:
    text = re.sub(r"\s+", " ", text.replace("|", "/"))
    return text if len(text) <= width else text[:width - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--since", type=float, default=0.0,
                        help="epoch seconds when the run began: older run records count as not run here")
    parser.add_argument("--repro-seconds", type=float, help="wall time of the whole `dvc repro`")
    parser.add_argument("--extract-json", type=Path, help="bench/extract.py --json output of the same run")
    parser.add_argument("--no-verify", action="store_true", help="the pipeline did not run: times and speeds only")
    args = parser.parse_args(argv)

    committed = yaml.safe_load(_git_show("dvc.lock") or "{}") or {}
    results: list[tuple[str, str, str]] = []
    if args.no_verify:
        mode = "not run (--no-verify: the pipeline did not run here)"
    else:
        try:
            results, mode = verify(Path("data/features.h5"), Path("reference"), 1e-3, 1e-4, Tolerances())
        except Exception as e:  # noqa: BLE001 - the table still shows the times
            mode = f"failed: {type(e).__name__}: {e}"
    grouped = by_stage(results, committed)
    print(f"verify: {mode}")
    print()
    print("| stage | seconds | img/s | verdict | detail |")
    print("|---|---|---|---|---|")
    worst = SAME if results else "-" if args.no_verify else DIFFERENT
    for stage in stage_order(committed) + [s for s in grouped if s not in committed.get("stages", {})]:
        record = runlog.stage_record(stage)
        started = None
        if record:
            started = dt.datetime.fromisoformat(record["started"]).timestamp()
        ran = record is not None and started is not None and started >= args.since - 1
        seconds = f"{record['seconds']:.1f}" if ran else "not run"
        if ran and record.get("status") != "ok":
            seconds += f" ({record.get('status')})"
        img_s = f"{record['img_per_s']:.1f}" if ran and record.get("img_per_s") else ""
        if ran and stage == "extract" and record.get("device"):
            img_s += f" ({record['device']}, {record.get('precision')}, {record.get('images_extracted')} images)"
        rows = grouped.get(stage, [])
        verdict = max((v for _, v, _ in rows), key=RANK.get, default="-")
        if rows and worst in RANK:
            worst = max(worst, verdict, key=RANK.get)
        detail = "; ".join(f"{n}: {d}" for n, v, d in rows if d and v != SAME)
        print(f"| {stage} | {seconds} | {img_s} | {verdict} | {_short(detail)} |")
    if args.extract_json and args.extract_json.is_file():
        bench = json.loads(args.extract_json.read_text())
        where = f"{bench['rows']} generated JPEGs, {bench['device']}, {bench['precision']}"
        print(f"| bench/extract.py: textbook loop | | {bench['textbook_img_s']:.1f} | | {where} |")
        for decode, rate in bench["pipeline_img_s"].items():
            print(f"| bench/extract.py: pipeline, decode {decode} | | {rate:.1f} | | "
                  f"{rate / bench['textbook_img_s']:.2f}x the textbook loop |")
    elif args.extract_json:
        print(f"| bench/extract.py | | not run | | no {args.extract_json} |")
    total = f"{args.repro_seconds:.1f}" if args.repro_seconds is not None else ""
    print(f"| **dvc repro, all stages** | {total} | | **{worst}** | {len(results)} verdicts of pipeline.verify |")
    return 1 if worst == DIFFERENT else 0


if __name__ == "__main__":
    sys.exit(main())
