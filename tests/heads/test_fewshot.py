"""Few-shot episodes: the draws (k per class, train only, seeded, nested), each probe against a direct fit or a hand
computation, the interval against its formula worked by hand, skipped shots, and byte-identical reruns."""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.features.cache import read_inputs, read_labels, read_split
from pipeline.core.heads.fewshot import (
    PROBES,
    class_orders,
    episode_predictions,
    episode_seeds,
    knn_probe,
    logreg_probe,
    ncm_similarities,
    run_fewshot,
    support_rows,
    t_interval,
    usable_shots,
)
from pipeline.infra.artifacts import write_json
from pipeline.infra.config import FewshotConfig

TINY = FewshotConfig(shots=[1, 2, 4], episodes=3)  # the tiny cache has ~8 train images per class


def _train(tiny_cache) -> tuple[np.ndarray, np.ndarray]:
    return read_inputs(tiny_cache["features"], "train", "avg"), read_labels(tiny_cache["features"], "train")


def test_nearest_class_mean_against_a_hand_computation():
    """Class 0's support rows (3, 4) and (1, 0) normalise to (0.6, 0.8) and (1, 0); their mean (0.8, 0.4) normalises
    to (2, 1) / sqrt(5). Class 1's one row (0, -2) gives (0, -1). So query (1, 1) has cosines 3 / sqrt(10) and
    -1 / sqrt(2), query (0, -5) has -1 / sqrt(5) and 1. The raw mean (2, 2) of class 0 would give (1, 1) a cosine
    of 1: the support rows are normalised before averaging."""
    x = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]])
    y = np.array([0, 0, 1])
    sims = ncm_similarities(x, y, np.array([[1.0, 1.0], [0.0, -5.0]]), 2)
    expected = [[3 / math.sqrt(10), -1 / math.sqrt(2)], [-1 / math.sqrt(5), 1.0]]
    np.testing.assert_allclose(sims, expected, rtol=0, atol=1e-12)
    assert sims.argmax(1).tolist() == [0, 1]


def test_t_interval_against_the_formula_by_hand():
    """[0.5, 0.6, 0.7]: mean 0.6, s = 0.1, and with 2 degrees of freedom the t quantile has a closed form,
    t(p, 2) = (2p - 1) sqrt(2 / (4 p (1 - p))) = 0.95 sqrt(2 / 0.0975) = 4.302653 at p = 0.975; half-width
    t s / sqrt(3) = 0.248414. An interval past 1 is clipped; equal values give a point."""
    half = 0.95 * math.sqrt(2 / 0.0975) * 0.1 / math.sqrt(3)
    assert t_interval([0.5, 0.6, 0.7]) == [round(0.6 - half, 6), round(0.6 + half, 6)] == [0.351586, 0.848414]
    assert t_interval([0.9, 1.0, 1.0])[1] == 1.0
    lo = 29 / 30 - 0.95 * math.sqrt(2 / 0.0975) * math.sqrt(1 / 300) / math.sqrt(3)  # s^2 = (2/300 + 2 * 1/900) / 2
    assert t_interval([0.9, 1.0, 1.0])[0] == round(lo, 6)
    assert t_interval([0.75] * 10) == [0.75, 0.75]


def test_draws_take_k_per_class_from_train_only_seeded_and_nested(tiny_cache):
    feats = {s: read_split(tiny_cache["features"], s) for s in ("train", "val", "test")}
    y = feats["train"].labels
    counts = np.bincount(y, minlength=3)
    assert counts.min() >= 4  # the fixture: ~8 train images per class
    orders = class_orders(y, 3, seed=123)
    previous: set[int] = set()
    for k in (1, 2, 4):
        rows = support_rows(orders, k)
        assert np.bincount(y[rows], minlength=3).tolist() == [k, k, k]
        assert len(set(rows.tolist())) == 3 * k and rows.max() < len(y)
        # rows index the train split: their ids are train images, never a val or test image
        ids = set(feats["train"].ids[rows].tolist())
        assert not ids & (set(feats["val"].ids.tolist()) | set(feats["test"].ids.tolist()))
        assert previous <= set(rows.tolist())  # nested: the k-shot support holds the smaller k's
        previous = set(rows.tolist())
    same = class_orders(y, 3, seed=123)
    assert all(np.array_equal(a, b) for a, b in zip(orders, same))
    other = class_orders(y, 3, seed=124)
    assert not np.array_equal(support_rows(other, 4), support_rows(orders, 4))
    seeds = episode_seeds(0, 10)
    assert len(set(seeds)) == 10 and seeds == episode_seeds(0, 10) and seeds != episode_seeds(1, 10)


def test_a_k_above_the_smallest_class_is_skipped_and_said(caplog):
    labels = np.array([0] * 8 + [1] * 3 + [2] * 5)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.heads.fewshot"):
        kept, skipped = usable_shots([8, 1, 4, 2], labels, ["a", "b", "c"])
    assert kept == [1, 2]
    assert skipped == {"4": "class 'b' has 3 train images, fewer than 4",
                       "8": "class 'b' has 3 train images, fewer than 8"}
    assert "4-shot skipped: class 'b' has 3 train images" in caplog.text


def test_probes_equal_direct_scikit_learn_fits_on_the_episode_rows(tiny_cache):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics.pairwise import cosine_similarity
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler, normalize

    x_train, y_train = _train(tiny_cache)
    queries = {s: read_inputs(tiny_cache["features"], s, "avg") for s in ("val", "test")}
    rows = support_rows(class_orders(y_train, 3, episode_seeds(0, 1)[0]), 2)
    x, y = x_train[rows], y_train[rows]
    cfg = FewshotConfig()
    predicted = episode_predictions(x, y, queries, cfg, 3)

    ref_lr = make_pipeline(StandardScaler(), LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)).fit(x, y)
    # kNN: 6 support rows, so min(20, 6) = 6 neighbours, each weighing exp(cosine / T) (cosine = 1 - distance)
    ref_knn = KNeighborsClassifier(n_neighbors=6, metric="cosine", algorithm="brute",
                                   weights=lambda d: np.exp((1 - d) / cfg.knn_T)).fit(x, y)
    layer, knn = logreg_probe(x, y, cfg, 3), knn_probe(x, y, cfg, 3)
    assert knn.k == 6
    for split, q in queries.items():
        np.testing.assert_array_equal(predicted["logreg"][split], ref_lr.predict(q))
        np.testing.assert_array_equal(predicted["knn"][split], ref_knn.predict(q))
        with torch.no_grad():
            lr_probs = torch.softmax(layer(torch.from_numpy(q)), 1).numpy()
            knn_probs = torch.softmax(knn(torch.from_numpy(q)), 1).numpy()
        np.testing.assert_allclose(lr_probs, ref_lr.predict_proba(q), atol=1e-5)
        np.testing.assert_allclose(knn_probs, ref_knn.predict_proba(q), atol=1e-4)  # within the vote's 1e-6 floor
        # NCM by a second route: scikit-learn's normalize and cosine_similarity (which normalises the means)
        unit = normalize(x)
        means = np.stack([unit[y == c].mean(0) for c in range(3)])
        np.testing.assert_array_equal(predicted["ncm"][split], cosine_similarity(q, means).argmax(1))


def test_recorded_seeds_reproduce_the_episodes_and_reruns_are_byte_identical(tiny_cache, tmp_path):
    first = run_fewshot(tiny_cache["features"], TINY)
    assert first["protocol"]["episode_seeds"] == episode_seeds(0, 3)
    assert first["protocol"]["shots"] == [1, 2, 4] and first["skipped"] == {}
    assert set(first["results"]) == {"1", "2", "4"}
    y_val = read_labels(tiny_cache["features"], "val")
    assert first["protocol"]["scored_rows"] == {"val": len(y_val), "test": len(read_labels(tiny_cache["features"],
                                                                                           "test"))}
    # episode 1's recorded seed alone gives its 4-shot rows, and the NCM's val accuracy recorded for it
    x_train, y_train = _train(tiny_cache)
    rows = support_rows(class_orders(y_train, 3, first["protocol"]["episode_seeds"][1]), 4)
    x_val = read_inputs(tiny_cache["features"], "val", "avg")
    again = float((ncm_similarities(x_train[rows], y_train[rows], x_val, 3).argmax(1) == y_val).mean())
    cell = first["results"]["4"]["ncm"]["val"]
    assert cell["per_episode"]["accuracy"][1] == round(again, 6)
    for probe in PROBES:
        for split in ("val", "test"):
            r = first["results"]["2"][probe][split]
            assert len(r["per_episode"]["accuracy"]) == 3
            assert r["accuracy"] == round(math.fsum(r["per_episode"]["accuracy"]) / 3, 6)
            assert r["accuracy_ci95"] == t_interval(r["per_episode"]["accuracy"])
    write_json(tmp_path / "a.json", first)
    write_json(tmp_path / "b.json", run_fewshot(tiny_cache["features"], TINY))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    other = run_fewshot(tiny_cache["features"], dataclasses.replace(TINY, seed=1))
    assert other["protocol"]["episode_seeds"] != first["protocol"]["episode_seeds"]
    assert other["results"] != first["results"]


def test_skipped_shots_stay_out_of_the_results(tiny_cache):
    smallest = int(np.bincount(read_labels(tiny_cache["features"], "train")).min())
    out = run_fewshot(tiny_cache["features"], FewshotConfig(shots=[1, smallest + 1], episodes=2))
    assert set(out["results"]) == {"1"} and out["protocol"]["shots"] == [1]
    assert list(out["skipped"]) == [str(smallest + 1)]


def test_stage_writes_metrics_and_plots_and_reruns_byte_identical(tiny_cache, tmp_path):
    """The stage's own entry point, twice: the same JSON, CSV and PNG bytes; the CSV has one row per (k, probe,
    split)."""
    from pipeline import fewshot

    params = yaml.safe_load(tiny_cache["params"].read_text())
    params["fewshot"] = {"shots": [1, 2, 4], "episodes": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    outputs = []
    for run in ("a", "b"):
        fewshot.main(["--params", str(tmp_path / "params.yaml"), "--features", str(tiny_cache["features"]),
                      "--index", str(tiny_cache["index"]), "--out", str(tmp_path / run / "fewshot.json"),
                      "--plots", str(tmp_path / run)])
        outputs.append({name: (tmp_path / run / name).read_bytes()
                        for name in ("fewshot.json", "fewshot.csv", "fewshot.png")})
    assert outputs[0] == outputs[1]
    lines = outputs[0]["fewshot.csv"].decode().splitlines()
    assert lines[0] == "shots,probe,split,accuracy,ci95_low,ci95_high" and len(lines) == 1 + 3 * 3 * 2


@pytest.mark.parametrize("text,expected", [
    ("fewshot:\n  shots: [1, 2, 2]\n", r"fewshot.shots lists a value twice"),
    ("fewshot:\n  shots: []\n", r"fewshot.shots must list at least one value"),
    ("fewshot:\n  episodes: 1\n", r"fewshot.episodes = 1 is out of range"),
    ("fewshot:\n  C: 0\n", r"fewshot.C = 0.0 is out of range"),
    ("fewshot:\n  pooling: max\n", r"fewshot.pooling = 'max' is not allowed"),
    ("fewshot:\n  shot: [1]\n", r"unknown key 'fewshot.shot' .*did you mean 'fewshot.shots'"),
])
def test_config_refuses_bad_values_naming_the_key(tmp_path, text, expected):
    from pipeline.infra.config import ConfigError, load_section

    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_section("fewshot", tmp_path / "params.yaml")


@pytest.mark.slow
def test_dvc_repro_fewshot_skips_the_shots_a_small_class_lacks(tmp_path):
    """Through real DVC on 3 classes x 12 images (6 train per class): `dvc repro fewshot` runs prepare, extract and
    fewshot only; 8 and 16 shots are skipped and said; a second repro runs nothing."""
    import json

    from conftest import TINY as TINY_PARAMS
    from conftest import dvc, make_dvc_repo, write_digit_folder

    repo = tmp_path / "repo"
    write_digit_folder(repo / "tiny", classes=3, per_class=12)
    make_dvc_repo(repo, **{**TINY_PARAMS, "data": {**TINY_PARAMS["data"], "source": "tiny"},
                           "fewshot": {"episodes": 2}})
    out = dvc(repo, "repro", "fewshot").stdout
    assert "Running stage 'fewshot'" in out and "Running stage 'heads@" not in out, out
    metrics = json.loads((repo / "metrics" / "fewshot.json").read_text())
    assert sorted(metrics["skipped"], key=int) == ["8", "16"] and metrics["protocol"]["shots"] == [1, 2, 4]
    assert "6 train images, fewer than 8" in metrics["skipped"]["8"]
    assert (repo / "plots" / "fewshot.png").is_file() and (repo / "plots" / "fewshot.csv").is_file()
    assert "Running stage" not in dvc(repo, "repro", "fewshot").stdout
