"""The headline numbers of a run, read from the metrics files the stages wrote: one short table.

`dvc metrics show` prints every number of every metrics file (per-class lists included) in one very wide table;
this is the part a person reads first: each head's val scores, the fine-tuned network's val and test scores, which
head was selected, and the backbone comparison when it has more than one row. README quotes this table (generated,
never typed: tests/test_readme.py checks that it equals the committed files).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.evaluate.comparison import HEADS, accuracy_cell  # the heads the pipeline fits, in its order


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(split: dict, key: str) -> str:
    """A proportion in percent with its 95 % interval when the file has one (`accuracy_ci95`...)."""
    return "-" if split.get(key) is None else accuracy_cell(split[key], split.get(f"{key}_ci95"))


def _scores(split: dict | None) -> list[str]:
    if not split:
        return ["-", "-"]
    return [_cell(split, "accuracy"), _cell(split, "balanced_accuracy")]


def _current_evaluation(metrics_dir: Path, chosen: str | None) -> dict:
    """metrics/evaluate.json when it scores the heads now on disk, else {}: after `dvc exp run select`, or with the
    fine-tune still to run, the file is an earlier run's, and its numbers must not sit beside the new heads'."""
    evaluate = _read(metrics_dir / "evaluate.json") or {}
    best = evaluate.get("best_head", {})
    fitted = _read(metrics_dir / "heads" / f"{best.get('name')}.json") if best.get("name") else None
    current = (fitted is not None and fitted["val"].get("accuracy") == best.get("val", {}).get("accuracy")
               and (chosen is None or chosen == best.get("name")))
    return evaluate if current else {}


def headline_rows(metrics_dir: Path, selected: Path | None = None) -> list[list[str]]:
    """[model, val accuracy, val balanced accuracy, test accuracy, test balanced accuracy] per model that ran, each
    with its 95 % interval when the metrics file has one.

    Heads: val from their own metrics, test from evaluate's (which scores only the selected head on test).
    """
    chosen = (_read(selected) or {}).get("head") if selected else None
    evaluate = _current_evaluation(metrics_dir, chosen)
    chosen = chosen or evaluate.get("best_head", {}).get("name")
    rows = []
    for head in HEADS:
        fitted = _read(metrics_dir / "heads" / f"{head}.json")
        if fitted is None:
            continue
        test = evaluate["best_head"].get("test") if evaluate.get("best_head", {}).get("name") == head else None
        name = f"head `{head}`" + (" (selected)" if head == chosen else "")
        rows.append([name, *_scores(fitted["val"]), *_scores(test)])
    if "finetune" in evaluate:
        rows.append(["fine-tuned network", *_scores(evaluate["finetune"].get("val")),
                     *_scores(evaluate["finetune"].get("test"))])
    return rows


def backbone_rows(metrics_dir: Path) -> list[list[str]]:
    """[backbone, crop size, val accuracy per head] from the compare stage's metrics/sweep.json ("-": a head the
    sweep did not fit, e.g. one added since)."""
    sweep = _read(metrics_dir / "sweep.json") or {}
    return [[f"`{name}`" + (" (main)" if i == 0 else ""), f"{r['image_size']} px",
             *["-" if r["val_accuracy"].get(h) is None
               else accuracy_cell(r["val_accuracy"][h], r.get("val_accuracy_ci95", {}).get(h)) for h in HEADS]]
            for i, (name, r) in enumerate(sweep.items())]


def markdown(metrics_dir: Path, selected: Path | None = None) -> str:
    """The headline table (and the backbone table when the sweep compared more than one backbone) in markdown."""
    lines = ["| model | val accuracy | val balanced accuracy | test accuracy | test balanced accuracy |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in headline_rows(metrics_dir, selected)]
    backbones = backbone_rows(metrics_dir)
    if len(backbones) > 1:
        lines += ["", "| backbone | image size | " + " | ".join(f"val accuracy {h}" for h in HEADS) + " |",
                  "|---|---|" + "---|" * len(HEADS)]
        lines += ["| " + " | ".join(row) + " |" for row in backbones]
    return "\n".join(lines) + "\n"


def text(metrics_dir: Path, selected: Path | None = None) -> str:
    """The same tables aligned for a terminal."""
    def aligned(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *rows)]

    rows = headline_rows(metrics_dir, selected)
    if not rows:
        return f"no metrics under {metrics_dir}: run `dvc repro` first\n"
    out = aligned(["model", "val acc", "val bal. acc", "test acc", "test bal. acc"],
                  [[c.replace("`", "") for c in r] for r in rows])
    backbones = backbone_rows(metrics_dir)
    if len(backbones) > 1:
        out += ["", *aligned(["backbone", "size", *[f"val acc {h}" for h in HEADS]],
                             [[c.replace("`", "") for c in r] for r in backbones])]
    return "\n".join(out) + "\n"
