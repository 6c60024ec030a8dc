"""Search over a head's params on the cached features: one row per point, the best row, rows equal to direct fits,
the same bytes from the same seed, and a resumed study equal to an uninterrupted one."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline.core.heads.fitting import fit_head
from pipeline.core.heads.search import open_study, point_config, run_search
from pipeline.infra.config import ConfigError, LogregConfig, MlpConfig, load_section
from pipeline.infra.space import Choice, check_space, parse_space
from pipeline.infra.study import budget


def _run(head, features, base, specs, tmp_path, sampler="grid", seed=0, trials=None):
    space = parse_space(specs, base, f"heads.{head}")
    study = open_study(tmp_path, head, base, features, space, sampler, seed)
    return run_search(head, features, base, study, budget(space, sampler, trials))


def test_grid_is_the_product_in_order_last_key_fastest(tiny_cache, tmp_path):
    base = load_section("heads", tiny_cache["params"]).mlp
    rows, _ = _run("mlp", tiny_cache["features"], base, ["dropout=[0.2,0.5]", "hidden=[8,[16,8]]", "lr=0.01"],
                   tmp_path)
    assert [(r["dropout"], r["hidden"], r["lr"]) for r in rows] == [
        (d, h, 0.01) for d in (0.2, 0.5) for h in ([8], [16, 8])]


def test_grid_is_checked_like_params_yaml_before_any_fit():
    with pytest.raises(ConfigError, match=r"unknown key 'heads.mlp.hiden'"):
        parse_space(["hiden=[256]"], MlpConfig(), "heads.mlp")
    space = parse_space(["dropout=[0.2,1.5]"], MlpConfig(), "heads.mlp")
    with pytest.raises(ConfigError, match=r"heads.mlp.dropout"):
        check_space(MlpConfig(), space, "heads.mlp")
    with pytest.raises(ConfigError, match=r"heads.mlp.dropout"):  # a range's end out of params.yaml's limits
        check_space(MlpConfig(), parse_space(["dropout=(0.0,1.2)"], MlpConfig(), "heads.mlp"), "heads.mlp")


def test_logreg_search_rows_are_direct_fits_and_best_is_argmax(tiny_cache, tmp_path):
    base = load_section("heads", tiny_cache["params"]).logreg
    rows, best = _run("logreg", tiny_cache["features"], base, ["C=[0.001,1.0]", "pooling=[avg,catavgmax]"], tmp_path)
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
    (["--grid", "dropout=[0.2,"], r"--grid 'dropout=\[0.2,': the values are neither a YAML list like \[0.2,0.5\] nor "
                                  r"a range like \(0.0,0.6\) or log\(1e-4,1e-2\)$"),
    (["--grid", "lr=log(1e-2)", "--sampler", "tpe", "--trials", "3"],
     r"^--grid 'lr=log\(1e-2\)': a range is two numbers, LOW,HIGH, e.g. lr=log\(1e-4,1e-2\)$"),
    (["--grid", "lr=log(1e-2,1e-4)", "--sampler", "tpe", "--trials", "3"],
     r"^--grid 'lr=log\(1e-2,1e-4\)': LOW must be below HIGH \(got 0.01 and 0.0001\)"),
    (["--grid", "lr=log(0,1e-2)", "--sampler", "tpe", "--trials", "3"],
     r"^--grid 'lr=log\(0,1e-2\)': a log range needs LOW above 0 \(got 0\)$"),
    (["--grid", "lr=(a,b)", "--sampler", "random", "--trials", "3"], r"^--grid 'lr=\(a,b\)': a range is two numbers"),
    (["--grid", "epochs=(1.5,9)", "--sampler", "random", "--trials", "3"],
     r"^--grid 'epochs=\(1.5,9\)': heads.mlp.epochs is an integer; give integer bounds, e.g. epochs=\(1,10\)$"),
    (["--grid", "hidden=(8,64)", "--sampler", "random", "--trials", "3"],
     r"^--grid 'hidden=\(8,64\)': heads.mlp.hidden is not a number, so it has no range; list its values"),
    (["--grid", "dropout=(0.0,0.6)"], r"^the grid needs lists of values, and dropout is a range; list the values "
                                      r"\(e.g. dropout=\[...\]\) or draw from the range with --sampler random or tpe "
                                      r"and --trials N$"),
    (["--grid", "dropout=(0.0,0.6)", "--sampler", "tpe"], r"^--sampler tpe draws from a range \(dropout\) and has no "
                                                          r"end of its own: give --trials N$"),
    (["--grid", "dropout=[0.2]", "--sampler", "tpe", "--trials", "0"], r"^--trials 0: give the number of trials, "
                                                                       r"1 to 10,000$"),
    (["--grid", "dropout=[0.2]", "--random", "2", "--sampler", "tpe"], r"^--random 2 is short for --sampler random "
                                                                       r"--trials 2; give either it or"),
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

    space = parse_space(["lr=[3e-4,1e-3,3E-3]", "weight_decay=[0,1e+0,.5e1]"], MlpConfig(), "heads.mlp")
    assert space == {"lr": Choice((0.0003, 0.001, 0.003)), "weight_decay": Choice((0, 1.0, 5.0))}
    assert parse_space(["C=[1e-2,1E2]"], LogregConfig(), "heads.logreg") == {"C": Choice(([0.01], [100.0]))}
    out = tmp_path / "out"
    search.main(["mlp", "--grid", "lr=[3e-4,1e-3,3e-3]", "--grid", "weight_decay=[0,0.01,0.1]", "--random", "5",
                 "--params", str(tiny_cache["params"]), "--features", str(tiny_cache["features"]),
                 "--index", str(tiny_cache["index"]), "--out", str(out)])
    result = json.loads((out / "search.json").read_text())
    assert len(result["rows"]) == 5 and all(r["lr"] in (0.0003, 0.001, 0.003) for r in result["rows"])


def test_the_printed_dvc_command_gives_back_the_values_through_dvc_and_params_yaml(tmp_path):
    """The -S line's values read back as the point's, and what DVC writes into params.yaml for them (Python's repr:
    1e-05, a string to PyYAML's YAML 1.1) is read by the stages as the same number."""
    import yaml

    from pipeline.core.heads.search import set_command
    from pipeline.infra.config import ParamsLoader

    point = {"lr": 3e-4, "weight_decay": 1e-05, "hidden": [256, 128], "pooling": "avg", "class_weight": None}
    command = set_command("mlp", point)
    assert command == ("dvc exp run -S 'heads.mlp.lr=0.0003' -S 'heads.mlp.weight_decay=1.0e-05' "
                       "-S 'heads.mlp.hidden=[256, 128]' -S 'heads.mlp.pooling=\"avg\"' "
                       "-S 'heads.mlp.class_weight=null'")
    values = [part.split("=", 1)[1].rstrip("'") for part in command.split(" -S '")[1:]]
    assert [yaml.safe_load(v) for v in values] == list(point.values())  # what PyYAML reads back
    assert set_command("logreg", {"C": [1e-05, 1e+16, 0.5]}) == ("dvc exp run "
                                                                  "-S 'heads.logreg.C=[1.0e-05, 1.0e+16, 0.5]'")
    written = tmp_path / "params.yaml"
    written.write_text(f"heads:\n  mlp:\n    weight_decay: {point['weight_decay']!r}\n    lr: 1E-4\n")
    assert "weight_decay: 1e-05" in written.read_text()
    assert load_section("heads", written).mlp.weight_decay == 1e-05 and load_section("heads", written).mlp.lr == 1e-4
    assert yaml.load(written.read_text(), Loader=ParamsLoader)["heads"]["mlp"]["weight_decay"] == 1e-05


def test_a_second_search_says_which_table_it_replaced(tiny_cache, tmp_path, caplog):
    """Issue 28: each run overwrote the last table without a word."""
    from pipeline import search

    out = tmp_path / "out"
    common = ["--params", str(tiny_cache["params"]), "--features", str(tiny_cache["features"]),
              "--index", str(tiny_cache["index"]), "--out", str(out)]
    search.main(["mlp", "--grid", "dropout=[0.1,0.5]", *common])
    assert "replaced" not in caplog.text
    search.main(["mlp", "--grid", "hidden=[8]", *common])
    assert (f"search: replaced {out}/table.csv and {out}/search.json from another search (heads.mlp, grid over "
            "dropout, 2 points); give --out DIR to keep each search") in caplog.text
    assert json.loads((out / "search.json").read_text())["space"] == {"hidden": "[[8]]"}


@pytest.mark.parametrize("argv,message", [
    (["--grid", "lr=[0.1]", "--seed", "3"], r"^--seed 3 seeds the draws of --sampler random or tpe, and the grid "
                                            r"draws nothing \(every point is fitted\); drop --seed or choose a sampler"),
    (["--grid", "lr=[0.1,0.2]", "--random", "1", "--seed", "-1"], r"^--seed -1: give a seed from 0 to 4,294,967,295$"),
    (["--grid", "lr=[0.1]", "--random", "20000"], r"^--random 20000: at most 10,000 points in one search"),
    (["--grid", "lr=[0.1,1e-1]"], r"^--grid 'lr=\[0.1,1e-1\]': 0.1 is listed twice; list each value once$"),
    (["--grid", "hidden=[" + ",".join(map(str, range(1, 101))) + "]",
      "--grid", "epochs=[" + ",".join(map(str, range(1, 102))) + "]"],
     r"^the grid has 10,100 points, more than 10,000; give fewer values, or fit a sample of it with "
     r"--sampler random --trials N$"),
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


def _tpe(tiny_cache, out, *extra):
    from pipeline import search

    search.main(["mlp", "--grid", "lr=log(1e-4,1e-1)", "--grid", "dropout=(0.0,0.6)", "--grid", "hidden=[8,16]",
                 "--sampler", "tpe", "--params", str(tiny_cache["params"]), "--features", str(tiny_cache["features"]),
                 "--index", str(tiny_cache["index"]), "--out", str(out), *extra])
    return (out / "table.csv").read_bytes(), (out / "search.json").read_bytes()


@pytest.mark.slow
def test_tpe_same_seed_same_bytes_and_an_interrupted_study_resumes_to_the_same_table(tiny_cache, tmp_path,
                                                                                     monkeypatch, caplog):
    """The same seed gives the same trials, table and search.json byte for byte; another seed other trials; and a
    search killed during its 5th fit, run again, fits trials 5.. only and ends with the uninterrupted table."""
    import pipeline.core.heads.fitting as fitting

    first = _tpe(tiny_cache, tmp_path / "a", "--trials", "12", "--seed", "7")
    assert _tpe(tiny_cache, tmp_path / "b", "--trials", "12", "--seed", "7") == first
    other = _tpe(tiny_cache, tmp_path / "c", "--trials", "12", "--seed", "8")
    assert other[0] != first[0]
    rows = json.loads(first[1])["rows"]
    assert len(rows) == 12 and all(1e-4 <= r["lr"] <= 1e-1 and 0.0 <= r["dropout"] <= 0.6 for r in rows)

    real, calls = fitting.fit_head, []

    def killed_on_the_fifth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "fit_head", killed_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        _tpe(tiny_cache, tmp_path / "d", "--trials", "12", "--seed", "7")
    assert len((tmp_path / "d" / "trials.jsonl").read_text().splitlines()) == 1 + 4  # header + 4 finished trials
    monkeypatch.setattr(fitting, "fit_head", real)
    caplog.clear()
    assert _tpe(tiny_cache, tmp_path / "d", "--trials", "12", "--seed", "7") == first
    assert "resuming the study in" in caplog.text and "4 trial(s) already done" in caplog.text
    assert "search: 4/12 " not in caplog.text and "search: 5/12 " in caplog.text
    # a larger budget extends the finished study: the first 12 rows are the same, the 13th and 14th are new
    _tpe(tiny_cache, tmp_path / "d", "--trials", "14", "--seed", "7")
    assert json.loads((tmp_path / "d" / "search.json").read_text())["rows"][:12] == rows


def test_random_draws_lie_in_their_ranges_and_a_repeated_point_is_not_fitted_again(tiny_cache, tmp_path,
                                                                                  monkeypatch, caplog):
    import pipeline.core.heads.fitting as fitting

    base = load_section("heads", tiny_cache["params"]).mlp
    real, fits = fitting.fit_head, []
    monkeypatch.setattr(fitting, "fit_head", lambda *a, **k: fits.append(1) or real(*a, **k))
    rows, _ = _run("mlp", tiny_cache["features"], base, ["hidden=[8]", "epochs=[2,3]"], tmp_path / "r",
                   sampler="random", seed=3, trials=3)
    assert len(rows) == 2  # lists of 2 points cannot give 3 distinct ones: the budget is capped at 2
    assert sorted(r["epochs"] for r in rows) == [2, 3]
    rows, _ = _run("mlp", tiny_cache["features"], base, ["hidden=[8]", "epochs=(2,3)", "lr=log(1e-3,1e-2)"],
                   tmp_path / "q", sampler="random", seed=3, trials=4)
    assert all(r["epochs"] in (2, 3) and isinstance(r["epochs"], int) and 1e-3 <= r["lr"] <= 1e-2 for r in rows)
    # TPE may propose a point it has seen (a small categorical space): the fit is deterministic, so it is not redone
    space = parse_space(["hidden=[8]", "epochs=(2,4)"], base, "heads.mlp")
    study = open_study(tmp_path / "t", "mlp", base, tiny_cache["features"], space, "tpe", 0)
    monkeypatch.setattr(study, "propose", lambda: {"hidden": [8], "epochs": 2})
    fits.clear()
    rows, _ = run_search("mlp", tiny_cache["features"], base, study, 3)
    assert len(rows) == 3 and len(fits) == 1 and "is trial 1's point again: not fitted again" in caplog.text
    assert rows[0]["val_accuracy"] == rows[1]["val_accuracy"] == rows[2]["val_accuracy"]
