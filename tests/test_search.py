"""Search over a head's params on the cached features: one row per point, the best row, rows equal to direct fits."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline.core.heads import fit_head
from pipeline.core.search import grid_points, parse_grid, point_config, run_search
from pipeline.infra.config import ConfigError, LogregConfig, MlpConfig, load_section


def test_grid_is_the_product_and_random_draws_distinct_points_of_it():
    grid = parse_grid(["dropout=[0.2,0.5]", "hidden=[256,[512,128]]", "lr=0.01"], MlpConfig(), "heads.mlp")
    assert grid == {"dropout": [0.2, 0.5], "hidden": [[256], [512, 128]], "lr": [0.01]}
    points = grid_points(grid)
    assert points == [{"dropout": d, "hidden": h, "lr": 0.01} for d in (0.2, 0.5) for h in ([256], [512, 128])]
    drawn = grid_points(grid, sample=3, seed=1)
    assert len(drawn) == 3 and all(p in points for p in drawn) and len({json.dumps(p) for p in drawn}) == 3
    assert drawn == grid_points(grid, sample=3, seed=1)  # seeded
    assert grid_points(grid, sample=10) == points  # more than the grid holds: the whole grid


def test_grid_is_checked_like_params_yaml_before_any_fit():
    with pytest.raises(ConfigError, match=r"unknown key 'heads.mlp.hiden'"):
        parse_grid(["hiden=[256]"], MlpConfig(), "heads.mlp")
    grid = parse_grid(["dropout=[0.2,1.5]"], MlpConfig(), "heads.mlp")
    with pytest.raises(ConfigError, match=r"heads.mlp.dropout"):
        run_search("mlp", REPO / "no-such-features.h5", MlpConfig(), grid_points(grid))  # fails before reading


def test_logreg_search_rows_are_direct_fits_and_best_is_argmax(tiny_cache):
    base = load_section("heads", tiny_cache["params"]).logreg
    grid = parse_grid(["C=[0.001,1.0]", "pooling=[avg,catavgmax]"], base, "heads.logreg")
    rows, best = run_search("logreg", tiny_cache["features"], base, grid_points(grid))
    assert len(rows) == 4 and [r["point"] for r in rows] == [0, 1, 2, 3]
    assert best == max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"], -r["point"]))
    row = rows[3]  # C = 1, catavgmax
    _, _, direct = fit_head("logreg", tiny_cache["features"], LogregConfig(**{**vars(base), "C": [1.0],
                                                                              "pooling": "catavgmax"}))
    assert (row["val_accuracy"], row["val_loss"]) == (direct["val"]["accuracy"], direct["val"]["loss"])
    assert row["train_accuracy"] == direct["train"]["accuracy"]


def test_search_command_writes_one_table_and_the_best_params(tiny_cache, tmp_path):
    """The command end to end on the tiny cache: an MLP grid of 4 points (2 of them drawn by --random 2 in a
    second run), the CSV and JSON tables, and one row equal to a direct fit of that head."""
    out = tmp_path / "search"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.search", "mlp", "--params", str(tiny_cache["params"]),
                           "--features", str(tiny_cache["features"]), "--index", str(tiny_cache["index"]),
                           "--grid", "dropout=[0.1,0.5]", "--grid", "hidden=[8,32]", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    result = json.loads((out / "search.json").read_text())
    assert len(table) == len(result["rows"]) == 4
    assert [(float(r["dropout"]), json.loads(r["hidden"])) for r in table] == [(0.1, [8]), (0.1, [32]), (0.5, [8]),
                                                                               (0.5, [32])]
    rows = result["rows"]
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["val_loss"], -r["point"]))
    assert result["best"]["point"] == best["point"]
    assert result["best"]["params"] == {"dropout": best["dropout"], "hidden": best["hidden"]}
    assert "-S 'heads.mlp.dropout=" in result["best"]["command"] and "best point" in proc.stderr
    base = load_section("heads", tiny_cache["params"]).mlp
    _, _, direct = fit_head("mlp", tiny_cache["features"], point_config(base, {"dropout": 0.5, "hidden": [32]},
                                                                        "heads.mlp"))
    assert float(table[3]["val_accuracy"]) == direct["val"]["accuracy"]
    assert float(table[3]["val_loss"]) == pytest.approx(direct["val"]["loss"], rel=1e-12)  # CSV's float text


@pytest.mark.parametrize("argv,message", [
    (["--grid", "dropout=[0.2,"], r"--grid 'dropout=\[0.2,': the values are not valid YAML"),
    (["--grid", "dropout"], r"--grid 'dropout': expected KEY=VALUES"),
    (["--grid", "drop=[0.2]"], r"unknown key 'heads.mlp.drop'; allowed keys: hidden, "),
    (["--grid", "dropout=[]"], r"--grid 'dropout=\[\]': no values"),
    (["--grid", "dropout=[0.2,0.5]", "--random", "0"], r"--random 0: give the number of points to draw, 1 or more"),
    (["--grid", "dropout=[0.2,0.5]", "--random", "-2"], r"--random -2: give the number of points"),
    (["--grid", "dropout="], r"heads.mlp.dropout"),  # YAML's null: refused like params.yaml would
])
def test_a_grid_that_does_not_parse_names_the_problem_before_the_features_are_read(tmp_path, argv, message):
    """Every one of these used to reach the features check (or fit zero points and crash in min()): the grid's own
    problem is the error, whatever the state of the features file."""
    from pipeline import search

    with pytest.raises(ConfigError, match=message):
        search.main(["mlp", *argv, "--features", str(tmp_path / "none.h5"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_zero_points_from_the_command_line_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.search", "mlp", "--grid", "dropout=[0.2,0.5]", "--random",
                           "0", "--features", str(tmp_path / "none.h5"), "--params", str(REPO / "params.yaml")],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")},
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "search: error: --random 0: give the number of points to draw, 1 or more" in proc.stderr
