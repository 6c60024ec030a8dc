"""pipeline.verify: verdicts for identical, slightly different and very different artefacts."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.core.verification import (
    CLOSE,
    DIFFERENT,
    SAME,
    compare_features,
    compare_inputs,
    compare_lock,
    compare_metrics,
    record,
)


def test_metrics_verdicts():
    then = {"val": {"accuracy": 0.93, "loss": 0.2}, "best_epoch": 3}
    assert compare_metrics(then, then, 0.01)[0] == SAME
    verdict, detail = compare_metrics({"val": {"accuracy": 0.935, "loss": 0.2}, "best_epoch": 3}, then, 0.01)
    assert verdict == CLOSE and "0.005" in detail
    assert compare_metrics({"val": {"accuracy": 0.90, "loss": 0.2}, "best_epoch": 3}, then, 0.01)[0] == DIFFERENT
    assert compare_metrics({"val": {"accuracy": 0.93, "loss": 0.2}, "best_epoch": 4}, then, 0.01)[0] == DIFFERENT


def test_lock_verdicts():
    lock = {"stages": {"extract": {"outs": [{"path": "data/features.h5", "md5": "abc"}]}}}
    other = {"stages": {"extract": {"outs": [{"path": "data/features.h5", "md5": "abd"}]}}}
    assert [v for _, v, _ in compare_lock(lock, lock)] == [SAME]
    # bytes that differ are left to the metrics and features to judge; an output missing on one side is different
    assert [v for _, v, _ in compare_lock(other, lock)] == [CLOSE]
    assert [v for _, v, _ in compare_lock({"stages": {}}, lock)] == [DIFFERENT]


def test_inputs_must_be_identical_whatever_the_cpu():
    """Code, params, command and source data do not depend on the CPU: a change there is always `different`,
    while a dep that another stage writes (features.h5 for the heads) is an output, judged with tolerance."""
    def lock(code_md5="c1", lr=0.1, features_md5="f1"):
        return {"stages": {
            "extract": {"cmd": "x", "deps": [{"path": "pipeline/extract.py", "md5": "e1"}],
                        "outs": [{"path": "data/features.h5", "md5": features_md5}]},
            "heads@mlp": {"cmd": "h", "params": {"params.yaml": {"heads.mlp": {"lr": lr}}},
                          "deps": [{"path": "data/features.h5", "md5": features_md5},
                                   {"path": "pipeline/core/heads/mlp.py", "md5": code_md5}], "outs": []}}}
    verdicts = lambda now, then: {k: v for k, v, _ in compare_inputs(now, then)}  # noqa: E731
    assert set(verdicts(lock(), lock()).values()) == {SAME}
    assert verdicts(lock(features_md5="f2"), lock())["inputs: heads@mlp"] == SAME
    assert verdicts(lock(code_md5="c2"), lock())["inputs: heads@mlp"] == DIFFERENT
    assert verdicts(lock(lr=0.2), lock())["inputs: heads@mlp"] == DIFFERENT
    assert verdicts(lock(lr=0.2), lock())["inputs: extract"] == SAME


def test_feature_verdicts(tiny_cache, tmp_path: Path):
    reference = tmp_path / "reference"
    record(tiny_cache["features"], reference)
    assert compare_features(tiny_cache["features"], reference, 1e-3, 1e-4)[0] == SAME
    for delta, expected in ((1e-6, CLOSE), (1e-1, DIFFERENT)):
        copy = tmp_path / f"features_{delta}.h5"
        shutil.copy(tiny_cache["features"], copy)
        with h5py.File(copy, "r+") as f:
            f["val/avg"][0] = f["val/avg"][0] + np.float32(delta)
        verdict, detail = compare_features(copy, reference, 1e-3, 1e-4)
        assert verdict == expected, detail
        # the detail reports the size of the difference itself (float32 rounding of x + delta aside)
        reported = float(re.search(r"max \|difference\| (\S+)", detail).group(1))
        assert reported == pytest.approx(delta, rel=0.2), detail
