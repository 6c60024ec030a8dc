"""Stage `select`: picks the best head by val accuracy and records which and why.

Ties go to the lower val loss, then to the simpler head (the order of `--heads`). `dvc repro select` runs
everything up to here and stops before fine-tuning.

    python -m pipeline.select --heads logreg mlp --out models/selected.json
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.errors import run_main
from pipeline.artifacts import read_json, write_json
from pipeline.runtime import setup_logging

log = logging.getLogger("pipeline.select")


def select_head(metrics: dict[str, dict]) -> dict:
    """Chooses among {head name: its metrics}; returns the choice, the ranking and the reason."""
    order = list(metrics)
    ranked = sorted(order, key=lambda h: (-metrics[h]["val"]["accuracy"], metrics[h]["val"]["loss"], order.index(h)))
    best, rest = ranked[0], ranked[1:]
    m = metrics[best]["val"]
    if not rest:
        reason = f"{best} is the only head"
    else:
        other = metrics[rest[0]]["val"]
        if m["accuracy"] > other["accuracy"]:
            reason = f"{best} has the highest val accuracy ({m['accuracy']:.4f} vs {rest[0]} {other['accuracy']:.4f})"
        elif m["loss"] < other["loss"]:
            reason = (f"{best} ties {rest[0]} on val accuracy ({m['accuracy']:.4f}) and has the lower val loss "
                      f"({m['loss']:.4f} vs {other['loss']:.4f})")
        else:
            reason = f"{best} ties {rest[0]} on val accuracy and loss; the simpler head wins"
    return {"head": best, "val_accuracy": m["accuracy"], "val_loss": m["loss"], "reason": reason,
            "ranking": [{"head": h, "val_accuracy": metrics[h]["val"]["accuracy"],
                         "val_loss": metrics[h]["val"]["loss"]} for h in ranked]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.select", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=["logreg", "mlp"], help="heads to compare, simplest first")
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics/heads"), help="where heads wrote metrics")
    parser.add_argument("--out", type=Path, default=Path("models/selected.json"), help="choice file to write")
    args = parser.parse_args(argv)
    setup_logging()
    metrics = {h: read_json(args.metrics_dir / f"{h}.json") for h in args.heads}
    choice = select_head(metrics)
    write_json(args.out, choice)
    log.info("select: %s", choice["reason"])


if __name__ == "__main__":
    run_main(main, "select")
