"""bench/probes.py (the hymenoptera table of README "Few-shot"): it skips, and says why, without the data set, and on
a small cache its all-train rows are the heads' own `fit_head` figures and its table has one row per shot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from conftest import load_bench

from pipeline.core.features.resume import create_datasets, write_rows
from pipeline.core.heads.fitting import fit_head
from pipeline.infra.config import load_section

REPO = Path(__file__).resolve().parents[2]


def _bench():
    return load_bench("probes")


def test_skips_with_a_message_when_the_data_set_is_absent(tmp_path):
    out = tmp_path / "probes"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "probes.py"), "--data", str(tmp_path / "missing"),
                           "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped" in proc.stdout and str(tmp_path / "missing") in proc.stdout
    assert not list(tmp_path.glob("probes*"))  # nothing written: no half table


def test_table_rows_are_the_heads_own_figures(tmp_path):
    rng = np.random.default_rng(0)
    n_train, n_val, d = 40, 20, 16
    labels = np.r_[np.arange(n_train) % 2, np.arange(n_val) % 2]
    rows = [{"split": "train" if i < n_train else "val", "label": int(y), "id": i} for i, y in enumerate(labels)]
    avg = (rng.normal(size=(len(labels), d)) + 1.5 * labels[:, None]).astype(np.float32)
    features = tmp_path / "features.h5"
    with h5py.File(features, "w", track_order=True) as f:
        f.attrs["classes"] = json.dumps(["ants", "bees"])
        ranges = create_datasets(f, rows, {"avg": d, "max": d, "pre_logits": d}, "float32")
        write_rows(f, ranges, 0, {"avg": avg, "max": avg, "pre_logits": avg})
    measured = _bench().measure(features, REPO / "params.yaml")
    heads = load_section("heads", REPO / "params.yaml")
    for head in ("logreg", "knn"):
        _, _, metrics = fit_head(head, features, getattr(heads, head))
        for key in ("accuracy", "accuracy_ci95", "balanced_accuracy", "balanced_accuracy_ci95"):
            assert measured["all_train"][head][key] == metrics["val"][key]
    assert measured["splits"] == {"train": {"images": 40, "per_class": [20, 20]},
                                  "val": {"images": 20, "per_class": [10, 10]}}
    table = _bench().table({"measured": measured})
    shots = measured["fewshot"]["protocol"]["shots"]  # 1..16: every class has 20 train rows
    assert [line.split("|")[1].strip() for line in table[2:2 + len(shots)]] == [f"{k} per class, accuracy"
                                                                                for k in shots]
    assert "one image is 5.00 pt" in table[-1]
