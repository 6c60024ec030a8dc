"""Search spaces and studies (pipeline/infra/space.py, study.py): what a range means, seeded draws that depend only on
the seed, the trial's number and the trials before it, and a journal that replays to the same proposals."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from pipeline.infra.config import ConfigError, FinetuneConfig, MlpConfig
from pipeline.infra.space import Choice, Range, describe, parse_space
from pipeline.infra.study import Study, budget, objective


def test_the_forms_a_spec_takes():
    space = parse_space(["lr=log(1e-4,1e-2)", "dropout=(0.0,0.6)", "hidden=[256,512,[1024,256]]", "epochs=(5,40)",
                         "batch_size=log(16,256)", "pooling=avg"], MlpConfig(), "heads.mlp")
    assert space == {"lr": Range(1e-4, 1e-2, log=True, integer=False),
                     "dropout": Range(0.0, 0.6, log=False, integer=False),
                     "hidden": Choice(([256], [512], [1024, 256])),
                     "epochs": Range(5, 40, log=False, integer=True),
                     "batch_size": Range(16, 256, log=True, integer=True),
                     "pooling": Choice(("avg",))}
    assert describe(space)["lr"] == "log(0.0001,0.01)" and describe(space)["epochs"] == "(5,40)"
    assert parse_space(["body_lr_ratio=(0.05,0.5)"], FinetuneConfig(), "finetune")["body_lr_ratio"].low == 0.05


@pytest.mark.parametrize("spec,message", [
    ("lr=log(1e-2,1e-4)", r"LOW must be below HIGH"),
    ("lr=(1e-4,1e-2,1e-1)", r"a range is two numbers, LOW,HIGH, e.g. lr=\(0.0,0.6\)$"),
    ("lr=(1e-4,.inf)", r"the bounds must be finite numbers"),
    ("lr=log(-1,1)", r"a log range needs LOW above 0 \(got -1\)"),
    ("pooling=(0,1)", r"heads.mlp.pooling is not a number, so it has no range"),
    ("seed=(0.5,3)", r"heads.mlp.seed is an integer; give integer bounds"),
    ("lr=(true,1)", r"a range is two numbers"),
])
def test_a_range_that_does_not_parse_is_one_line_naming_it(spec, message):
    with pytest.raises(ConfigError, match=rf"^--grid '{spec.replace('(', '[(]').replace(')', '[)]')}': {message}"):
        parse_space([spec], MlpConfig(), "heads.mlp")


def _draws(space, sampler, seed, n, tmp_path, values=None):
    study = Study(tmp_path / f"{sampler}-{seed}.jsonl", space, sampler, seed, {"test": 1})
    for i in range(n):
        point = study.propose()
        acc = values(point) if values else 0.5
        study.record(point, {"val_accuracy": acc, "val_loss": 1.0 - acc}, 0.0)
    return [t["point"] for t in study.trials]


def test_random_draws_follow_their_scale_and_depend_only_on_seed_and_number(tmp_path):
    space = parse_space(["lr=log(1e-4,1e-2)", "dropout=(0.0,0.6)", "epochs=log(1,100)"], MlpConfig(), "heads.mlp")
    points = _draws(space, "random", 0, 400, tmp_path)
    lrs = [p["lr"] for p in points]
    assert all(1e-4 <= v <= 1e-2 for v in lrs) and all(0.0 <= p["dropout"] <= 0.6 for p in points)
    # log-uniform: half the draws below the geometric mean 1e-3 (binomial sd at n=400: 0.025), uniform: mean 0.3
    assert abs(sum(v < 1e-3 for v in lrs) / 400 - 0.5) < 0.1
    assert abs(statistics.mean(p["dropout"] for p in points) - 0.3) < 0.03
    epochs = [p["epochs"] for p in points]
    assert all(isinstance(e, int) and 1 <= e <= 100 for e in epochs) and min(epochs) == 1
    assert abs(sum(e < 10 for e in epochs) / 400 - math.log(10) / math.log(101)) < 0.1  # share of ln(1..10) in ln 101
    assert _draws(space, "random", 0, 5, tmp_path / "again") == points[:5]  # the same seed, the same draws
    assert _draws(space, "random", 1, 5, tmp_path) != points[:5]


def test_tpe_learns_where_the_good_points_are_and_replays_from_its_journal(tmp_path):
    """On a known objective (peak at lr = 1e-3) TPE's last 20 of 40 proposals lie closer to the peak than random's;
    and a study reopened from its journal proposes what the original would have next."""
    space = parse_space(["lr=log(1e-5,1e-1)"], MlpConfig(), "heads.mlp")

    def accuracy(point):
        return 1.0 - abs(math.log10(point["lr"]) + 3.0) / 4.0

    tpe = _draws(space, "tpe", 0, 40, tmp_path, accuracy)
    rnd = _draws(space, "random", 0, 40, tmp_path, accuracy)

    def distance(points):
        return statistics.median(abs(math.log10(p["lr"]) + 3.0) for p in points[20:])

    assert distance(tpe) < 0.5 * distance(rnd), (distance(tpe), distance(rnd))
    again = Study(tmp_path / "tpe-0.jsonl", space, "tpe", 0, {"test": 1})
    assert [t["point"] for t in again.trials] == tpe
    truncated = tmp_path / "cut.jsonl"
    truncated.write_text("\n".join((tmp_path / "tpe-0.jsonl").read_text().splitlines()[:21]) + "\n")
    assert Study(truncated, space, "tpe", 0, {"test": 1}).propose() == tpe[20]


def test_a_journal_of_another_search_is_replaced_and_a_cut_line_is_dropped(tmp_path, caplog):
    space = parse_space(["dropout=[0.1,0.2,0.3]"], MlpConfig(), "heads.mlp")
    path = tmp_path / "trials.jsonl"
    _draws(space, "random", 0, 2, tmp_path / "x")
    (tmp_path / "x" / "random-0.jsonl").rename(path)
    assert len(Study(path, space, "random", 0, {"test": 1}).trials) == 2
    path.write_text(path.read_text() + '{"trial": 3, "po')  # killed while writing
    assert len(Study(path, space, "random", 0, {"test": 1}).trials) == 2
    assert "line 4 is incomplete" in caplog.text
    assert Study(path, space, "random", 1, {"test": 1}).trials == [] and not path.exists()
    assert "held another search (seed: 0 (now 1)); starting this one afresh" in caplog.text


def test_budget_and_objective():
    grid = parse_space(["dropout=[0.1,0.2]", "hidden=[8,16,32]"], MlpConfig(), "heads.mlp")
    assert budget(grid, "grid", None) == 6 and budget(grid, "random", 4) == 4 and budget(grid, "tpe", 50) == 6
    with pytest.raises(ConfigError, match=r"^--sampler bayes: choose one of grid, random, tpe$"):
        budget(grid, "bayes", 3)
    # accuracy first; the loss only orders equal accuracies (by less than one image in a billion)
    assert objective(0.9, 5.0) > objective(0.9, 6.0) > objective(0.9 - 1e-9, 0.0)
    assert objective(0.9, float("nan")) < objective(0.9, 1e6)
    assert json.loads(json.dumps(describe(grid))) == {"dropout": "[0.1, 0.2]", "hidden": "[[8], [16], [32]]"}
