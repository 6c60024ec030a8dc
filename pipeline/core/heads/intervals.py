"""95 % intervals for the proportions the pipeline reports: accuracy and balanced accuracy.

Accuracy is a binomial proportion (k of n images right); its interval is the Wilson score interval, which, unlike
the textbook `p +- z sqrt(p(1-p)/n)` (Wald), never leaves [0, 1] and does not collapse to a point at 0/n or n/n: a
head with 100 % on 50 val images is "at least ~92.9 %", not "exactly 100 %".

Balanced accuracy is the mean of the per-class recalls, i.e. a weighted mean of the images' 0/1 outcomes in which
an image of class c weighs 1 / (C n_c). Its interval is the Wilson interval of that weighted proportion at Kish's
effective sample size n_eff = (sum w)^2 / sum w^2 = C^2 / sum_c (1 / n_c) (the usual design-effect treatment of a
weighted proportion, Korn & Graubard 1998). Why this choice: it is closed-form and deterministic (no bootstrap seed
to record), it is exactly the accuracy's Wilson interval when every class has the same number of images (then
balanced accuracy is accuracy and n_eff = n), and it stays sensible at 0 % and 100 % recall, where a stratified
bootstrap degenerates to a single point. tests/heads/test_metrics.py checks both against hand-computed numbers.
"""
from __future__ import annotations

import math
from typing import Sequence

# The standard normal quantile for a two-sided 95 % interval: scipy.stats.norm.ppf(0.975).
Z95 = 1.959963984540054

# Interval bounds are stored rounded to this many decimals (like the per-class lists): 1e-6 is far below any
# difference one image makes, and the JSON stays readable.
DECIMALS = 6


def wilson_interval(successes: float, n: float, z: float = Z95) -> list[float]:
    """The Wilson score interval [lo, hi] of a proportion `successes` / `n`.

    `n` may be fractional (an effective sample size). With n = 0 nothing is known: [0, 1]. At 0/n the lower bound
    is exactly 0, at n/n the upper bound exactly 1 (the formula gives them up to rounding).
    """
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return [round(lo, DECIMALS), round(hi, DECIMALS)]


def balanced_accuracy_interval(recalls: Sequence[float], supports: Sequence[int], z: float = Z95) -> list[float]:
    """Wilson interval of the mean recall over the classes with images, at Kish's effective size (module doc).

    Args:
        recalls: each present class's recall (hits / support).
        supports: each present class's number of images (all > 0), in the same order.
    """
    if not len(supports):
        return [0.0, 1.0]
    c = len(supports)
    balanced = sum(recalls) / c
    n_eff = c * c / sum(1.0 / s for s in supports)
    return wilson_interval(balanced * n_eff, n_eff, z)


def intervals_overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    """Whether two [lo, hi] intervals share a point; None when either is unknown (an older metrics file)."""
    if not a or not b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]
