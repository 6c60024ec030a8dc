"""Choosing the best head by val accuracy; ties go to the lower val loss, then to the simpler head."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


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
