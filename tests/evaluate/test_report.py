"""The report says which model is best by comparing numbers, not their formatted text."""
from __future__ import annotations

import json

from pipeline.core.evaluate.report import write_markdown


def test_best_model_is_chosen_by_number_not_by_text(tmp_path):
    # "100.00 %" sorts below "99.00 %" as text: a string max would crown the worse model
    meta = {"classes": ["a", "b"], "source": "x", "counts": {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}}}
    attrs = {"backbone": "m", "weights": "bundled", "weights_sha256": "0" * 64, "precision": "fp32",
             "dtype": "float32", "num_features": 8, "preprocess": json.dumps({"size": 32})}
    selected = {"head": "logreg", "reason": "r", "ranking": [{"head": "logreg", "val_accuracy": 1.0, "val_loss": 0.1}]}
    for head_acc, ft_acc, winner in ((1.0, 0.99, "head `logreg`"), (0.99, 1.0, "fine-tuned network"),
                                     (0.5, 0.5, "head `logreg`")):
        result = {"best_head": {"name": "logreg", "val": {"accuracy": head_acc, "loss": 0.1}},
                  "finetune": {"val": {"accuracy": ft_acc, "loss": 0.1}}}
        write_markdown(tmp_path / "report.md", meta=meta, attrs=attrs, selected=selected, result=result,
                       finetune_info=None, figures={"heads": "h.png", "misclassified": "m.png"})
        assert f"Best on val: **{winner}**." in (tmp_path / "report.md").read_text()


def test_confusion_at_120_classes_and_most_confused_pairs(tmp_path):
    """Above 30 classes the matrix is drawn without cell numbers (a readable figure of fixed size), and the report
    names the most confused pairs from the counts."""
    import numpy as np
    from PIL import Image

    from pipeline.core.evaluate.report import most_confused, plot_confusion

    classes = [f"class_{i:03d}" for i in range(120)]
    matrix = np.diag(np.full(120, 20))
    matrix[5, 7], matrix[9, 2], matrix[3, 4] = 9, 4, 4
    pairs = most_confused(matrix, classes, top=3)
    assert pairs == [["class_005", "class_007", 9, 9 / 29], ["class_003", "class_004", 4, 4 / 24],
                     ["class_009", "class_002", 4, 4 / 24]]
    plot_confusion(tmp_path / "c.png", matrix, classes, "t")
    assert Image.open(tmp_path / "c.png").size == (1220, 1200)  # 12.2 x 12 in at 100 dpi, whatever the class count


def test_evaluate_reports_per_class_metrics_and_worst_mistakes(tiny_cache, tmp_path):
    """evaluate on the tiny cache with a fitted head: the new metrics reach evaluate.json and report.md."""
    from pipeline.core.evaluate.evaluation import evaluate
    from pipeline.core.heads.fitting import fit_head, save_head
    from pipeline.infra.artifacts import write_json
    from pipeline.infra.config import load_section

    module, spec, metrics = fit_head("logreg", tiny_cache["features"], load_section("heads", tiny_cache["params"]).logreg)
    save_head(tmp_path / "heads" / "logreg", module, spec)
    write_json(tmp_path / "selected.json", {"head": "logreg", "reason": "only head", "ranking": [
        {"head": "logreg", "val_accuracy": metrics["val"]["accuracy"], "val_loss": metrics["val"]["loss"]}]})
    result = evaluate(tiny_cache["index"], tiny_cache["features"], tmp_path / "heads", tmp_path / "selected.json",
                      None, tmp_path / "plots", tmp_path / "report")
    val = result["best_head"]["val"]
    assert val == metrics["val"]  # the same head on the same cached features: the same numbers
    assert set(val["per_class"]) == {"precision", "recall", "support"} and len(val["per_class"]["recall"]) == 3
    text = (tmp_path / "report" / "report.md").read_text()
    assert "balanced accuracy" in text and "### Per class on test (best head)" in text
    assert (tmp_path / "plots" / "misclassified.png").is_file()


def test_finetune_section_says_which_epoch_is_kept_and_that_it_is_an_average(tmp_path):
    """Under `select: last` with SWA the kept epoch is the last one and its weights are an average, not "the best
    epoch": the report says so in those words (it used to print "best epoch 8" beside a table whose best was 6)."""
    from pipeline.core.evaluate.report import _finetune_section

    history = [{"epoch": 0, "train_loss": None, "val_loss": 0.3, "val_accuracy": 0.9}] + [
        {"epoch": e, "train_loss": 0.1, "val_loss": 0.2, "val_accuracy": acc} for e, acc in ((1, 0.95), (2, 0.97),
                                                                                               (3, 0.96))]
    base = {"epochs": 3, "lr": 1e-3, "body_lr_ratio": 0.1, "bn": "eval"}
    info = {"warm_start": "logreg", "parity": None, "best_epoch": 3, "history": history,
            "finetune": {**base, "select": "last", "swa_start": 0.5, "ema_decay": 0.0}}
    text = "\n".join(_finetune_section(info, {"curves": "c.png"}))
    assert "kept: epoch 3" in text and "best epoch" not in text
    assert "`finetune.select: last`: the last epoch" in text and "uniform average (SWA)" in text
    info["finetune"] = {**base, "select": "accuracy", "swa_start": 0.0, "ema_decay": 0.0}
    info["best_epoch"] = 2
    text = "\n".join(_finetune_section(info, {"curves": "c.png"}))
    assert "kept: epoch 2" in text and "best val accuracy" in text and "average" not in text


def test_report_shows_intervals_and_the_warm_start_when_knn_is_selected(tmp_path):
    """Every accuracy in the report carries its Wilson 95 % interval; with kNN selected, the report says which head
    the fine-tune starts from, and that the heads tie within the interval."""
    from pipeline.core.heads.intervals import wilson_interval
    from pipeline.core.heads.selection import select_head

    def val(k: int, loss: float) -> dict:
        return {"val": {"accuracy": k / 10, "accuracy_ci95": wilson_interval(k, 10), "loss": loss}}

    selected = select_head({"logreg": val(8, 0.5), "mlp": val(7, 0.6), "knn": val(9, 2.0)})
    meta = {"classes": ["a", "b"], "source": "x", "counts": {"train": {"a": 1, "b": 1}, "val": {"a": 5, "b": 5}}}
    attrs = {"backbone": "m", "weights": "bundled", "weights_sha256": "0" * 64, "precision": "fp32",
             "dtype": "float32", "num_features": 8, "preprocess": json.dumps({"size": 32})}
    head_val = {"accuracy": 0.9, "accuracy_ci95": wilson_interval(9, 10), "balanced_accuracy": 0.9,
                "balanced_accuracy_ci95": wilson_interval(9, 10), "loss": 2.0}
    result = {"best_head": {"name": "knn", "val": head_val}}
    write_markdown(tmp_path / "report.md", meta=meta, attrs=attrs, selected=selected, result=result,
                   finetune_info=None, figures={"heads": "h.png", "misclassified": "m.png"})
    text = (tmp_path / "report.md").read_text()
    # Wilson 8/10: [0.490162, 0.943318]; 9/10: [0.595850, 0.982124] (6 decimals), in percent 59.59
    assert "| `logreg` | 80.00 % | [49.02, 94.33] | 0.5000 |" in text
    assert "| head `knn` | 90.00 % [59.59, 98.21] | 90.00 % [59.59, 98.21] |" in text
    assert "Tie within the interval: knn's val accuracy 95 % interval [59.59 %, 98.21 %] overlaps logreg's" in text
    assert "The fine-tune warm-starts from **logreg** (knn has no weights to warm-start from" in text


def test_evaluate_scores_a_selected_knn_head(tiny_cache, tmp_path):
    """kNN selected: evaluate loads it like any head and scores val and test; its val numbers are the fit's."""
    from pipeline.core.evaluate.evaluation import evaluate
    from pipeline.core.heads.fitting import fit_head, save_head
    from pipeline.core.heads.selection import select_head
    from pipeline.infra.artifacts import write_json
    from pipeline.infra.config import load_section

    module, spec, metrics = fit_head("knn", tiny_cache["features"], load_section("heads", tiny_cache["params"]).knn)
    save_head(tmp_path / "heads" / "knn", module, spec)
    write_json(tmp_path / "selected.json", select_head({"knn": metrics}))
    result = evaluate(tiny_cache["index"], tiny_cache["features"], tmp_path / "heads", tmp_path / "selected.json",
                      None, tmp_path / "plots", tmp_path / "report")
    assert result["best_head"]["name"] == "knn" and result["best_head"]["val"] == metrics["val"]
    assert "accuracy_ci95" in result["best_head"]["test"]
    assert "| `knn` |" in (tmp_path / "report" / "report.md").read_text()


def test_report_shows_the_fewshot_table_and_figure(tiny_cache, tmp_path):
    """With the fewshot stage's metrics, the report gains its section: one row per (k, probe) with both splits'
    mean accuracy and interval as stored, and the figure drawn into report/; a missing file names its stage."""
    import pytest

    from pipeline.core.evaluate.evaluation import evaluate
    from pipeline.core.heads.fewshot import run_fewshot
    from pipeline.core.heads.fitting import fit_head, save_head
    from pipeline.core.heads.selection import select_head
    from pipeline.infra.artifacts import write_json
    from pipeline.infra.config import FewshotConfig, load_section
    from pipeline.infra.errors import PipelineError

    module, spec, metrics = fit_head("knn", tiny_cache["features"], load_section("heads", tiny_cache["params"]).knn)
    save_head(tmp_path / "heads" / "knn", module, spec)
    write_json(tmp_path / "selected.json", select_head({"knn": metrics}))
    fewshot = run_fewshot(tiny_cache["features"], FewshotConfig(shots=[1, 2], episodes=2))
    write_json(tmp_path / "fewshot.json", fewshot)
    args = (tiny_cache["index"], tiny_cache["features"], tmp_path / "heads", tmp_path / "selected.json", None,
            tmp_path / "plots", tmp_path / "report")
    evaluate(*args, fewshot=tmp_path / "fewshot.json")
    text = (tmp_path / "report" / "report.md").read_text()
    cell = fewshot["results"]["2"]["ncm"]
    row = (f"| 2 | `ncm` | {100 * cell['val']['accuracy']:.2f} % [{100 * cell['val']['accuracy_ci95'][0]:.2f}, "
           f"{100 * cell['val']['accuracy_ci95'][1]:.2f}] | {100 * cell['test']['accuracy']:.2f} %")
    assert "## Few-shot" in text and row in text and "![few-shot](fewshot.png)" in text
    assert text.index("## Few-shot") < text.index("## Reproduce")
    assert (tmp_path / "report" / "fewshot.png").is_file()
    with pytest.raises(PipelineError, match="written by the `fewshot` stage"):
        evaluate(*args, fewshot=tmp_path / "absent.json")
