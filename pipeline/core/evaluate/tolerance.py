"""How far apart two runs' metrics may be when their bytes cannot match (a GPU against a CPU, another torch build).

Each kind of number gets the tolerance a statistician would give it:
- proportions of images (accuracy, balanced and top-5 accuracy and the bounds of their 95 % intervals, per-class
  precision and recall) are compared in images: the two counts may differ by up to z x the standard deviation of the difference of two binomial counts on
  that many images, `z sqrt(n (p1 q1 + p2 q2))`, and always by one image. One image of a 36-image class is not a
  regression; a 3-point drop on 359 images (11 images, bound 9) is;
- losses relative: `|a - b| <= loss_rtol max(|a|, |b|) + loss_atol` (a loss near zero moves by tiny absolute amounts);
- anything else (counts, epochs, sizes, names) must be equal.
The size of each proportion comes from the metrics themselves: a split's size is the sum of its per-class
`support`; a class's recall is over its support; its precision over the images predicted as that class (recall x
support / precision).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

SPLITS = ("train", "val", "test")
PROPORTIONS = ("accuracy", "balanced_accuracy", "top5_accuracy")
HEADLINE = ("accuracy", "loss")  # what a `different` line names first


@dataclass(frozen=True)
class Tolerances:
    """The bounds above: `z` for counts of images, `loss_rtol` + `loss_atol` for losses."""

    z: float = 1.96
    loss_rtol: float = 0.2
    loss_atol: float = 1e-3


def leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a JSON document; list items as `key[i]`."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, value in enumerate(obj):
            out.update(leaves(value, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def split_sizes(*documents: dict) -> dict[str, int]:
    """{split: images} from the `per_class.support` lists found in any of `documents`."""
    sizes: dict[str, int] = {}
    for doc in documents:
        totals: dict[str, int] = {}
        for key, value in leaves(doc).items():
            match = re.search(r"(?:^|\.)(train|val|test)\.per_class\.support\[\d+\]$", key)
            if match and isinstance(value, int):
                totals[key.rsplit("[", 1)[0]] = totals.get(key.rsplit("[", 1)[0], 0) + value
        for key, n in totals.items():
            sizes.setdefault(key.split(".per_class")[0].rsplit(".", 1)[-1], n)
    return sizes


def count_bound(p1: float, p2: float, n: float, z: float) -> float:
    """Largest difference in images between two proportions of `n` images that the bound accepts."""
    return max(1.0, z * math.sqrt(max(n, 0.0) * (p1 * (1 - p1) + p2 * (1 - p2))))


def _split_of(key: str) -> str | None:
    for part in key.split("."):
        for split in SPLITS:
            if part == split or part.startswith(split + "_"):
                return split
    return None


def _kind(key: str) -> str:
    """`proportion`, `precision`, `recall`, `loss` or `exact`, from the key's last name."""
    # an interval's bounds (`accuracy_ci95[0]`) are proportions of the same images as the proportion itself
    parts = [re.sub(r"_ci95$", "", re.sub(r"\[\d+\]$", "", p)) for p in key.split(".")]
    last = parts[-1]
    named = [re.sub(r"^(train|val|test)_", "", p) for p in parts]
    if last in ("precision", "recall") and "per_class" in parts:
        return last
    if last in PROPORTIONS or any(p in PROPORTIONS for p in named[-2:]):
        return "proportion"
    if last == "loss" or last.endswith("_loss") or any(p == "loss" for p in named[-2:]):
        return "loss"
    return "exact"


def _images(key: str, then: dict[str, Any], sizes: dict[str, int]) -> float | None:
    """How many images the proportion at `key` is over (None: not known)."""
    kind = _kind(key)
    if kind == "proportion":
        split = _split_of(key)
        return sizes.get(split) if split else None
    index = re.search(r"\[(\d+)\]$", key)
    support = then.get(re.sub(r"\.(precision|recall)\[\d+\]$", f".support[{index.group(1)}]", key)) if index else None
    if not isinstance(support, int):
        return None
    if kind == "recall":
        return float(support)
    recall = then.get(key.replace(".precision[", ".recall["))
    precision = then.get(key)
    if isinstance(recall, float) and precision:
        return recall * support / precision
    return float(support)


def differences(now: dict, then: dict, sizes: dict[str, int], tol: Tolerances
                ) -> Iterator[tuple[str, Any, Any, bool, str]]:
    """(key, committed, current, within the bound, how far) for every number or value that differs."""
    a, b = leaves(then), leaves(now)
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if x is None or y is None:
            yield key, x, y, False, "in one of the two files only"
            continue
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))
        kind = _kind(key) if numbers else "exact"
        if kind in ("proportion", "precision", "recall"):
            n = _images(key, a, sizes)
            if n is None:
                yield key, x, y, False, "size unknown"
                continue
            moved, bound = abs(x - y) * n, count_bound(x, y, n, tol.z)
            yield key, x, y, moved <= bound + 1e-9, f"{moved:.1f} of {n:.0f} images (bound {bound:.1f})"
        elif kind == "loss":
            allowed = tol.loss_rtol * max(abs(x), abs(y)) + tol.loss_atol
            yield key, x, y, abs(x - y) <= allowed, f"relative {abs(x - y) / max(abs(x), abs(y), 1e-12):.1%}"
        else:
            yield key, x, y, False, "must be equal"


def headline(diffs: list[tuple[str, Any, Any, bool, str]], limit: int = 4) -> str:
    """The differences a reader looks at first (accuracy and loss of each split, not per-class lists)."""
    def rank(d):
        key = d[0]
        per_class = "per_class" in key
        named = any(key.endswith(h) for h in HEADLINE)
        return (per_class, not named, d[3], key)

    shown = []
    for key, x, y, ok, how in sorted(diffs, key=rank)[:limit]:
        values = f"{x:.4f} -> {y:.4f}" if isinstance(x, float) and isinstance(y, float) else f"{x!r} -> {y!r}"
        shown.append(f"{key} {values} ({how})")
    more = len(diffs) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
