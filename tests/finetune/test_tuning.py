"""Fine-tune tuning through DVC experiments (pipeline/core/finetune/tuning.py): two tiny trials in a temporary git
repository, each an ordinary experiment that `dvc exp show` lists with its params and metrics."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY, dvc, make_dvc_repo, run_cmd, write_digit_folder

from pipeline.core.finetune.tuning import _params_match, check_name, experiment_name
from pipeline.infra.errors import PipelineError


@pytest.mark.slow
def test_two_tpe_trials_are_two_experiments_with_their_params_and_metrics(tmp_path: Path):
    repo = tmp_path / "repo"
    write_digit_folder(repo / "tiny", classes=3, per_class=12)
    make_dvc_repo(repo, **{**TINY, "data": {**TINY["data"], "source": "tiny"}})
    dvc(repo, "repro", "select")  # the trials run the fine-tune from the heads
    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "baseline run"], repo)

    tune = [sys.executable, "-m", "pipeline.tune", "--grid", "lr=log(1e-4,1e-2)", "--grid", "bn=[eval,frozen]",
            "--sampler", "tpe", "--trials", "2", "--seed", "3", "--name", "t"]
    proc = run_cmd(tune, repo)
    assert "tune: best trial" in proc.stderr, proc.stderr
    result = json.loads((repo / "search" / "finetune" / "t" / "tune.json").read_text())
    rows = result["rows"]
    assert [r["experiment"] for r in rows] == ["t-001", "t-002"]

    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev["data"]
                found[rev["name"]] = (data["params"]["params.yaml"]["data"]["finetune"],
                                      data["metrics"]["metrics/finetune.json"]["data"])
    assert set(found) >= {"t-001", "t-002"}, found
    for row in rows:
        params, metrics = found[row["experiment"]]
        assert (params["lr"], params["bn"]) == (row["lr"], row["bn"])  # the proposed values, as DVC stored them
        assert 1e-4 <= params["lr"] <= 1e-2 and params["bn"] in ("eval", "frozen")
        assert metrics["val"]["accuracy"] == row["val_accuracy"] and metrics["val"]["loss"] == row["val_loss"]
    assert rows[0]["lr"] != rows[1]["lr"]

    # Run again: the study is finished, nothing is queued or run.
    again = run_cmd(tune, repo)
    assert "2 trial(s) already done" in again.stderr and "queued" not in again.stderr
    assert json.loads((repo / "search" / "finetune" / "t" / "tune.json").read_text())["rows"] == rows


def test_outside_a_committed_dvc_repository_is_one_line(tmp_path: Path):
    proc = run_cmd([sys.executable, "-m", "pipeline.tune", "--grid", "lr=[0.001]", "--params",
                    str(Path(__file__).parents[2] / "params.yaml")], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"tune: error: {tmp_path} is not the root of a DVC repository (no .dvc/ or dvc.yaml)" in proc.stderr
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    run_cmd(["git", "init", "-q"], tmp_path)
    proc = run_cmd([sys.executable, "-m", "pipeline.tune", "--grid", "lr=[0.001]", "--params",
                    str(Path(__file__).parents[2] / "params.yaml")], tmp_path, check=False)
    assert proc.returncode == 2 and f"{tmp_path} has no git commit" in proc.stderr, proc.stderr


def test_names_and_params_matching():
    assert experiment_name("tune", 7) == "tune-007" and check_name("lr_sweep-2") == "lr_sweep-2"
    for bad in ("2fast", "a b", "x/y", ""):
        with pytest.raises(PipelineError, match=r"--name"):
            check_name(bad)
    params = {"finetune": {"lr": 0.001, "bn": "eval", "epochs": 8}}
    assert _params_match(params, "finetune", {"lr": 0.001, "bn": "eval"})
    assert not _params_match(params, "finetune", {"lr": 0.002})
