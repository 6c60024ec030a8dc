"""Search over a head's params on the cached features: one row per point, the best row, rows equal to direct fits."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline.core.heads.fitting import fit_head
from pipeline.core.heads.search import grid_points, parse_grid, point_config, run_search
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
    assert len(rows) == 4 and [r["point"] for r in rows] == [1, 2, 3, 4]  # numbered as the progress lines count
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


def _search(tiny_cache, tmp_path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.search", *argv, "--params", str(tiny_cache["params"]),
                           "--features", str(tiny_cache["features"]), "--index", str(tiny_cache["index"])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")})


def test_no_grid_is_refused_in_one_line(tiny_cache, tmp_path):
    """Issue 28: without --grid it fitted the base once and suggested an empty `dvc exp run`; nothing was searched."""
    proc = _search(tiny_cache, tmp_path, "mlp", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert ("search: error: no --grid given: nothing to search; give at least one --grid KEY=VALUES, e.g. --grid "
            "'hidden=[...]' (keys of heads.mlp: hidden, pooling, ") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_points_are_numbered_from_1_in_progress_table_json_and_summary(tiny_cache, tmp_path, caplog):
    """Issue 28: the progress lines counted from 1 and the summary's "best point" from 0."""
    from pipeline import search

    out = tmp_path / "out"
    search.main(["mlp", "--grid", "dropout=[0.1,0.5]", "--grid", "hidden=[8]", "--params", str(tiny_cache["params"]),
                 "--features", str(tiny_cache["features"]), "--index", str(tiny_cache["index"]), "--out", str(out)])
    with open(out / "table.csv", newline="") as f:
        assert [r["point"] for r in csv.DictReader(f)] == ["1", "2"]
    result = json.loads((out / "search.json").read_text())
    assert [r["point"] for r in result["rows"]] == [1, 2]
    best = result["best"]["point"]
    assert best == max(result["rows"], key=lambda r: (r["val_accuracy"], -r["val_loss"], -r["point"]))["point"]
    assert "search: 1/2 " in caplog.text and "search: 2/2 " in caplog.text
    assert f"search: best point {best} of 2, " in caplog.text


def test_the_readme_example_with_exponents_runs(tiny_cache, tmp_path):
    """Issue 28: `--grid 'lr=[3e-4,1e-3,3e-3]'` (README and --help) stopped on "heads.mlp.lr = '3e-4' is read as a
    string by YAML 1.1": a command line's 3e-4 is a number."""
    from pipeline import search

    grid = parse_grid(["lr=[3e-4,1e-3,3E-3]", "weight_decay=[0,1e+0,.5e1]"], MlpConfig(), "heads.mlp")
    assert grid == {"lr": [0.0003, 0.001, 0.003], "weight_decay": [0, 1.0, 5.0]}
    assert parse_grid(["C=[1e-2,1E2]"], LogregConfig(), "heads.logreg") == {"C": [[0.01], [100.0]]}
    out = tmp_path / "out"
    search.main(["mlp", "--grid", "lr=[3e-4,1e-3,3e-3]", "--grid", "weight_decay=[0,0.01,0.1]", "--random", "5",
                 "--params", str(tiny_cache["params"]), "--features", str(tiny_cache["features"]),
                 "--index", str(tiny_cache["index"]), "--out", str(out)])
    result = json.loads((out / "search.json").read_text())
    assert len(result["rows"]) == 5 and all(r["lr"] in (0.0003, 0.001, 0.003) for r in result["rows"])


def test_the_printed_dvc_command_keeps_floats_floats_for_yaml_1_1():
    """The -S line writes floats as both PyYAML (1.1, params.yaml's reader) and DVC (1.2) read as numbers: 1e-05
    as json.dumps wrote it is a string to PyYAML. DVC itself rewrites such a float as 1e-05 in params.yaml, so the
    search also says to put it in params.yaml by hand."""
    import yaml

    from pipeline.core.heads.search import dvc_note, set_command

    point = {"lr": 3e-4, "weight_decay": 1e-05, "hidden": [256, 128], "pooling": "avg", "class_weight": None}
    command = set_command("mlp", point)
    assert command == ("dvc exp run -S 'heads.mlp.lr=0.0003' -S 'heads.mlp.weight_decay=1.0e-05' "
                       "-S 'heads.mlp.hidden=[256, 128]' -S 'heads.mlp.pooling=\"avg\"' "
                       "-S 'heads.mlp.class_weight=null'")
    values = [part.split("=", 1)[1].rstrip("'") for part in command.split(" -S '")[1:]]
    assert [yaml.safe_load(v) for v in values] == list(point.values())  # what PyYAML reads back
    assert set_command("logreg", {"C": [1e-05, 1e+16, 0.5]}) == ("dvc exp run "
                                                                  "-S 'heads.logreg.C=[1.0e-05, 1.0e+16, 0.5]'")
    assert dvc_note("mlp", {"lr": 3e-4}) is None
    assert dvc_note("mlp", point) == ("DVC writes heads.mlp.weight_decay into params.yaml without a decimal point "
                                      "(e.g. 1e-05), which YAML 1.1 reads as a string; instead write "
                                      "heads.mlp.weight_decay: 1.0e-05 in params.yaml and run `dvc exp run`")


def test_a_second_search_says_which_table_it_replaced(tiny_cache, tmp_path, caplog):
    """Issue 28: each run overwrote the last table without a word."""
    from pipeline import search

    out = tmp_path / "out"
    common = ["--params", str(tiny_cache["params"]), "--features", str(tiny_cache["features"]),
              "--index", str(tiny_cache["index"]), "--out", str(out)]
    search.main(["mlp", "--grid", "dropout=[0.1,0.5]", *common])
    assert "replaced" not in caplog.text
    search.main(["mlp", "--grid", "hidden=[8]", *common])
    assert (f"search: replaced {out}/table.csv and {out}/search.json from an earlier search (heads.mlp, grid "
            "dropout, 2 points); give --out DIR to keep each search") in caplog.text
    assert json.loads((out / "search.json").read_text())["grid"] == {"hidden": [[8]]}


@pytest.mark.parametrize("argv,message", [
    (["--grid", "lr=[0.1]", "--seed", "3"], r"^--seed 3 seeds the draw of --random N, and no --random was given "
                                            r"\(every point is fitted\); drop --seed or add --random N"),
    (["--grid", "lr=[0.1,0.2]", "--random", "1", "--seed", "-1"], r"^--seed -1: give a seed from 0 to 4,294,967,295$"),
    (["--grid", "lr=[0.1]", "--random", "20000"], r"^--random 20000: at most 10,000 points in one search"),
    (["--grid", "lr=[0.1,1e-1]"], r"^--grid 'lr=\[0.1,1e-1\]': 0.1 is listed twice; list each value once$"),
    (["--grid", "hidden=[" + ",".join(map(str, range(1, 101))) + "]",
      "--grid", "epochs=[" + ",".join(map(str, range(1, 102))) + "]"],
     r"^the grid has 10,100 points \(100 x 101\), more than 10,000; give fewer values, or fit a sample of it with "
     r"--random N$"),
    (["--grid", "lr=[0.1]", "--features", "{tmp}"], r"^--features {tmp} is a folder; give the features file"),
    (["--grid", "lr=[0.1]", "--features", "{tmp}/none.h5"], r"^--features {tmp}/none.h5 does not exist; run "),
    (["--grid", "lr=[0.1]", "--index", "{tmp}"], r"^--index {tmp} has no index.csv; give prepare's output folder"),
    (["--grid", "lr=[0.1]", "--out", "{tmp}/file"], r"^--out {tmp}/file is a file; give a folder for table.csv"),
], ids=["seed-without-random", "seed-negative", "random-too-many", "value-twice", "grid-too-large", "features-folder",
        "features-missing", "index-without-csv", "out-a-file"])
def test_every_other_search_flag_is_checked_before_any_fit(tiny_cache, tmp_path, argv, message):
    """A seed that changes nothing, a seed or a count out of range, a value twice, a grid too large to list, and
    paths that cannot work: one line naming the flag, before the first fit (each used to fit, or crash late)."""
    from pipeline import search

    (tmp_path / "file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    defaults = {"--features": str(tiny_cache["features"]), "--index": str(tiny_cache["index"]),
                "--out": str(tmp_path / "out")}
    extra = [x for flag, value in defaults.items() if flag not in argv for x in (flag, value)]
    with pytest.raises(ConfigError, match=message.replace("{tmp}", str(tmp_path))):
        search.main(["mlp", *argv, "--params", str(tiny_cache["params"]), *extra])
    assert not (tmp_path / "out").exists()
