"""95 % intervals of accuracy and balanced accuracy: the textbook Wilson score interval, checked against
hand-computed numbers, scipy's own Wilson interval, and the edge cases 0/n and n/n; and the keys summarize writes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.core.heads.intervals import (
    Z95,
    balanced_accuracy_interval,
    intervals_overlap,
    wilson_interval,
)
from pipeline.core.heads.metrics import split_metrics


def _textbook(k: float, n: float) -> tuple[float, float]:
    """Wilson (1927): (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), written out independently."""
    p, z = k / n, 1.959963984540054
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return centre - half, centre + half


def test_z_is_the_normal_975_quantile():
    from scipy.stats import norm

    assert Z95 == pytest.approx(norm.ppf(0.975), abs=1e-15)


def test_wilson_hand_computed():
    # 8 of 10: p = 0.8, z^2/n = 0.38415, centre 0.99207 / 1.38415 = 0.71673, half 0.22658
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=5e-5)
    # 0 of n: [0, z^2 / (n + z^2)]; n of n: [n / (n + z^2), 1], exactly 0 and 1 at the open ends
    z2 = Z95**2
    for n in (1, 10, 50, 1000):
        lo, hi = wilson_interval(0, n)
        assert lo == 0.0 and hi == pytest.approx(z2 / (n + z2), abs=1e-6)
        lo, hi = wilson_interval(n, n)
        assert hi == 1.0 and lo == pytest.approx(n / (n + z2), abs=1e-6)
    assert wilson_interval(50, 50)[0] == pytest.approx(0.9287, abs=5e-5)  # 100 % of 50 images: "at least 92.9 %"
    assert wilson_interval(0, 0) == [0.0, 1.0]  # no images: nothing known


@pytest.mark.parametrize("k,n", [(1, 3), (8, 10), (37, 40), (359, 360), (500, 1000), (3, 1000)])
def test_wilson_equals_the_textbook_formula_and_scipy(k, n):
    ours = wilson_interval(k, n)
    np.testing.assert_allclose(ours, _textbook(k, n), atol=1e-6)  # stored rounded to 6 decimals
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    np.testing.assert_allclose(ours, [ci.low, ci.high], atol=1e-6)
    assert ours[0] < k / n < ours[1]


def test_balanced_interval_is_wilson_at_kish_effective_size():
    # recalls 0.8 (of 10) and 1.0 (of 40): balanced 0.9, n_eff = 2^2 / (1/10 + 1/40) = 32
    assert balanced_accuracy_interval([0.8, 1.0], [10, 40]) == pytest.approx(list(_textbook(0.9 * 32, 32)), abs=1e-6)
    assert balanced_accuracy_interval([0.8, 1.0], [10, 40]) == pytest.approx([0.74996, 0.96429], abs=1e-5)
    # one class: the plain Wilson interval of its recall
    assert balanced_accuracy_interval([0.8], [10]) == wilson_interval(8, 10)
    # every class the same size: balanced accuracy is accuracy, and so is its interval
    assert balanced_accuracy_interval([0.5, 0.9, 1.0], [20, 20, 20]) == wilson_interval(48, 60)
    # all recalls 1: the upper bound is exactly 1, the lower one below it
    lo, hi = balanced_accuracy_interval([1.0, 1.0], [5, 45])
    assert hi == 1.0 and lo == pytest.approx(18 / (18 + Z95**2), abs=1e-6)  # n_eff = 4 / (1/5 + 1/45) = 18


def test_summarize_writes_both_intervals():
    labels = np.array([0] * 10 + [1] * 40)
    predicted = labels.copy()
    predicted[:2] = 1  # class 0: 8 of 10 right; class 1: 40 of 40
    logits = np.eye(2, dtype=np.float32)[predicted] * 5
    m = split_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(48 / 50)
    assert m["accuracy_ci95"] == wilson_interval(48, 50)
    assert m["balanced_accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy_ci95"] == balanced_accuracy_interval([0.8, 1.0], [10, 40])
    assert m["accuracy_ci95"][0] < m["accuracy"] < m["accuracy_ci95"][1]


def test_intervals_overlap():
    assert intervals_overlap([0.8, 0.9], [0.85, 0.95]) is True
    assert intervals_overlap([0.8, 0.9], [0.9, 0.95]) is True  # touching counts as overlapping
    assert intervals_overlap([0.8, 0.85], [0.86, 0.95]) is False
    assert intervals_overlap(None, [0.1, 0.2]) is None
