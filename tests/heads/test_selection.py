"""select: the best head overall (kNN included), the best warm-startable head for the fine-tune, and the tie within
the val accuracy interval, in selected.json and the log."""
from __future__ import annotations

import json
import logging

import pytest

from pipeline.core.heads.intervals import wilson_interval
from pipeline.core.heads.selection import WARM_STARTABLE, select_head, warm_start_head
from pipeline.infra.errors import PipelineError

N_VAL = 360


def _val(correct: int, loss: float) -> dict:
    return {"val": {"accuracy": correct / N_VAL, "accuracy_ci95": wilson_interval(correct, N_VAL), "loss": loss}}


def test_knn_can_be_selected_and_the_fine_tune_starts_from_the_best_head_with_weights():
    choice = select_head({"logreg": _val(330, 0.3), "mlp": _val(334, 0.25), "knn": _val(340, 0.9)})
    assert choice["head"] == "knn" and choice["warm_start_head"] == "mlp"
    assert [r["head"] for r in choice["ranking"]] == ["knn", "mlp", "logreg"]
    assert [r["warm_startable"] for r in choice["ranking"]] == [False, True, True]
    assert "knn has no weights to warm-start from" in choice["warm_start_reason"]
    assert "mlp is the best head that has" in choice["warm_start_reason"]
    assert warm_start_head(choice) == "mlp"
    # a head with weights on top: it is also the warm start
    choice = select_head({"logreg": _val(345, 0.3), "mlp": _val(334, 0.25), "knn": _val(340, 0.9)})
    assert choice["head"] == choice["warm_start_head"] == "logreg"
    assert choice["warm_start_reason"] == "logreg, the selected head"
    assert set(WARM_STARTABLE) == {"logreg", "mlp"}


def test_tie_within_the_interval():
    # 340/360 vs 330/360: Wilson [0.9158, 0.9638] and [0.8835, 0.9410] overlap (scipy binomtest agrees)
    choice = select_head({"logreg": _val(330, 0.3), "knn": _val(340, 0.9)})
    assert choice["head"] == "knn" and choice["tie_within_interval"] is True
    assert choice["interval"].startswith("tie within the interval: knn's val accuracy 95 % interval "
                                         "[91.58 %, 96.38 %] overlaps logreg's [88.35 %, 94.10 %]")
    assert choice["val_accuracy_ci95"] == wilson_interval(340, N_VAL)
    # 355/360 vs 300/360: [0.9679, 0.9941] above [0.7914, 0.8683]
    choice = select_head({"logreg": _val(300, 0.3), "mlp": _val(355, 0.1)})
    assert choice["tie_within_interval"] is False and "lies above logreg's" in choice["interval"]
    # metrics files without intervals (written before them): nothing is claimed
    choice = select_head({"logreg": {"val": {"accuracy": 0.9, "loss": 0.3}},
                          "mlp": {"val": {"accuracy": 0.8, "loss": 0.2}}})
    assert choice["tie_within_interval"] is None and choice["interval"] == ""
    assert select_head({"mlp": _val(300, 0.3)})["tie_within_interval"] is None  # no runner-up


def test_warm_start_head_from_selected_json():
    assert warm_start_head({"head": "mlp"}) == "mlp"  # a selected.json from before kNN: `head` is the warm start
    assert warm_start_head({"head": "knn", "warm_start_head": "logreg"}) == "logreg"
    for choice in ({"head": "knn"}, {"head": "knn", "warm_start_head": None}):
        with pytest.raises(PipelineError, match="names no head the fine-tune can warm-start from"):
            warm_start_head(choice)
    choice = select_head({"knn": _val(340, 0.9)})
    assert choice["warm_start_head"] is None and "none of the heads compared (knn)" in choice["warm_start_reason"]


def test_select_stage_writes_the_choice_and_logs_the_tie(tmp_path, caplog):
    from pipeline import select

    for head, metrics in (("logreg", _val(330, 0.3)), ("mlp", _val(334, 0.25)), ("knn", _val(340, 0.9))):
        (tmp_path / f"{head}.json").write_text(json.dumps(metrics))
    with caplog.at_level(logging.INFO, logger="pipeline.select"):
        select.main(["--metrics-dir", str(tmp_path), "--out", str(tmp_path / "selected.json")])
    choice = json.loads((tmp_path / "selected.json").read_text())
    assert choice["head"] == "knn" and choice["warm_start_head"] == "mlp" and choice["tie_within_interval"] is True
    assert "select: tie within the interval: knn's" in caplog.text
    assert "select: the fine-tune warm-starts from knn has no weights" in caplog.text


@pytest.mark.slow
def test_fine_tune_warm_starts_from_the_best_head_with_weights_when_knn_is_selected(tiny_cache, tmp_path):
    """selected.json names knn (forced here: the best val accuracy) and logreg as warm_start_head: the fine-tune loads
    logreg, reproduces its val accuracy at epoch 0, records it as its warm start, and writes accuracy intervals."""
    from conftest import finetune_run

    from pipeline.core.heads.fitting import fit_head, save_head
    from pipeline.infra.artifacts import read_json, write_json
    from pipeline.infra.config import load_section

    heads = load_section("heads", tiny_cache["params"])
    metrics = {}
    for name in ("logreg", "knn"):
        module, spec, metrics[name] = fit_head(name, tiny_cache["features"], getattr(heads, name))
        save_head(tmp_path / "heads" / name, module, spec)
    metrics["knn"]["val"]["accuracy"] = 1.0  # whatever the fits gave, knn ranks first
    choice = select_head(metrics)
    assert choice["head"] == "knn" and choice["warm_start_head"] == "logreg"
    write_json(tmp_path / "selected.json", choice)
    result = finetune_run(tiny_cache["params"], tiny_cache["index"], tiny_cache["features"], tmp_path / "heads",
                          tmp_path / "selected.json", tmp_path / "model", tmp_path / "finetune.json")
    assert read_json(tmp_path / "model" / "model.json")["warm_start"] == "logreg"
    assert result["start_val"]["accuracy"] == pytest.approx(metrics["logreg"]["val"]["accuracy"])
    n_val = sum(metrics["logreg"]["val"]["per_class"]["support"])
    for split in ("val", "start_val"):
        accuracy = result[split]["accuracy"]
        assert result[split]["accuracy_ci95"] == wilson_interval(round(accuracy * n_val), n_val)
