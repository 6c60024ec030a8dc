"""Choosing the best head by val accuracy (ties: the lower val loss, then the simpler head), and the head the
fine-tune warm-starts from.

Two choices, both recorded in models/selected.json:
- `head`: the best of every head, kNN included; evaluate scores it and `predict --model head` uses it.
- `warm_start_head`: the best head the fine-tune can start from (:data:`WARM_STARTABLE`). A kNN head has no weights to
  put on the backbone (it is a vote over stored train features), so when kNN ranks first the fine-tune starts from
  the best of logreg and mlp instead, and selected.json says so (`warm_start_reason`).

`tie_within_interval`: whether the best head's val accuracy interval (Wilson 95 %, pipeline/core/heads/intervals.py)
overlaps the runner-up's. Overlapping intervals mean the val split cannot tell the two apart with confidence (a
conservative check: two intervals can overlap while a paired test would separate the heads); the choice is still
made by the rule above, and the log says it is a tie within the interval. None when a metrics file has no interval.
"""
from __future__ import annotations

import logging

from pipeline.core.heads.intervals import intervals_overlap
from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)

# Heads the fine-tune can warm-start from: their module is a layer (stack) of weights on the pooled features.
WARM_STARTABLE = ("logreg", "mlp")


def _ranking_entry(head: str, val: dict) -> dict:
    return {"head": head, "val_accuracy": val["accuracy"], "val_accuracy_ci95": val.get("accuracy_ci95"),
            "val_loss": val["loss"], "warm_startable": head in WARM_STARTABLE}


def _pct(interval: list[float]) -> str:
    """[lo, hi] in percent, as the report and the summary print intervals (so the three never differ in a digit)."""
    return f"[{100 * interval[0]:.2f} %, {100 * interval[1]:.2f} %]"


def _interval_tie(best: str, runner_up: str | None, metrics: dict[str, dict]) -> tuple[bool | None, str]:
    """(tie within the interval or not, the sentence saying so); (None, "") when it cannot be said."""
    if runner_up is None:
        return None, ""
    a, b = metrics[best]["val"].get("accuracy_ci95"), metrics[runner_up]["val"].get("accuracy_ci95")
    tie = intervals_overlap(a, b)
    if tie is None:
        return None, ""
    if tie:
        return True, (f"tie within the interval: {best}'s val accuracy 95 % interval {_pct(a)} overlaps "
                      f"{runner_up}'s {_pct(b)}; val cannot tell them apart with confidence")
    return False, f"{best}'s val accuracy 95 % interval {_pct(a)} lies above {runner_up}'s {_pct(b)}"


def _warm_start(best: str, ranked: list[str], metrics: dict[str, dict]) -> tuple[str | None, str]:
    startable = [h for h in ranked if h in WARM_STARTABLE]
    if not startable:
        return None, (f"none of the heads compared ({', '.join(ranked)}) can be warm-started: the fine-tune needs "
                      f"one of {', '.join(WARM_STARTABLE)}")
    if startable[0] == best:
        return best, f"{best}, the selected head"
    first = startable[0]
    return first, (f"{best} has no weights to warm-start from (a vote over stored train features); {first} is the "
                   f"best head that has (val accuracy {metrics[first]['val']['accuracy']:.4f})")


def select_head(metrics: dict[str, dict]) -> dict:
    """Chooses among {head name: its metrics}; returns the choice, the warm-start head, the ranking and the reasons."""
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
    tie, interval = _interval_tie(best, rest[0] if rest else None, metrics)
    warm, warm_reason = _warm_start(best, ranked, metrics)
    return {"head": best, "val_accuracy": m["accuracy"], "val_accuracy_ci95": m.get("accuracy_ci95"),
            "val_loss": m["loss"], "reason": reason, "tie_within_interval": tie, "interval": interval,
            "warm_start_head": warm, "warm_start_reason": warm_reason,
            "ranking": [_ranking_entry(h, metrics[h]["val"]) for h in ranked]}


def warm_start_head(choice: dict) -> str:
    """The head the fine-tune starts from, from selected.json (a file from before kNN has only `head`).

    Raises:
        PipelineError: the choice names no head that can be warm-started.
    """
    name = choice.get("warm_start_head", choice.get("head"))
    if name not in WARM_STARTABLE:
        raise PipelineError(f"selected.json names no head the fine-tune can warm-start from (warm_start_head "
                            f"{name!r}; it needs one of {', '.join(WARM_STARTABLE)}): add logreg or mlp to "
                            f"`python -m pipeline.select --heads` and rerun `dvc repro select`")
    return name
