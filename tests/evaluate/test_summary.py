"""`python -m pipeline.summary`: the headline numbers, read from the metrics files and nothing else."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pipeline.core.evaluate.summary import headline_rows, markdown

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _split(acc: float, bal: float) -> dict:
    return {"accuracy": acc, "balanced_accuracy": bal, "loss": 0.1, "per_class": {"recall": [acc] * 40}}


def test_rows_are_the_files_numbers_and_only_the_selected_head_has_test(tmp_path: Path):
    _write(tmp_path / "heads" / "logreg.json", {"train": _split(1, 1), "val": _split(0.93, 0.925)})
    _write(tmp_path / "heads" / "mlp.json", {"train": _split(1, 1), "val": _split(0.9275, 0.9)})
    _write(tmp_path / "evaluate.json", {"best_head": {"name": "mlp", "val": _split(0.9275, 0.9),
                                                      "test": _split(0.5, 0.25)},
                                        "finetune": {"val": _split(0.98, 0.97), "test": _split(0.99, 1.0)}})
    rows = headline_rows(tmp_path)
    assert rows == [["head `logreg`", "93.00 %", "92.50 %", "-", "-"],
                    ["head `mlp` (selected)", "92.75 %", "90.00 %", "50.00 %", "25.00 %"],
                    ["fine-tuned network", "98.00 %", "97.00 %", "99.00 %", "100.00 %"]]
    table = markdown(tmp_path)
    assert len(max(table.splitlines(), key=len)) < 120  # readable: not `dvc metrics show`'s 2,500-character line
    assert "per_class" not in table and "backbone" not in table  # one backbone: no comparison table


def test_command_before_any_run_says_what_to_do(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "pipeline.summary", "--metrics-dir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert out == f"no metrics under {tmp_path}: run `dvc repro` first\n"


def test_an_earlier_runs_evaluation_is_not_shown_beside_new_heads(tmp_path: Path):
    """After `dvc exp run select` on new data, metrics/evaluate.json is the previous run's: its fine-tuned network
    and test scores must not appear next to the new heads as if they were theirs."""
    _write(tmp_path / "heads" / "logreg.json", {"val": _split(0.9477, 0.9473)})
    _write(tmp_path / "heads" / "mlp.json", {"val": _split(0.9542, 0.9534)})
    _write(tmp_path / "evaluate.json", {"best_head": {"name": "logreg", "val": _split(0.9304, 0.9305),
                                                      "test": _split(0.9471, 0.9471)},
                                        "finetune": {"val": _split(0.98, 0.98), "test": _split(0.98, 0.98)}})
    _write(tmp_path / "selected.json", {"head": "mlp"})
    rows = headline_rows(tmp_path, tmp_path / "selected.json")
    assert rows == [["head `logreg`", "94.77 %", "94.73 %", "-", "-"],
                    ["head `mlp` (selected)", "95.42 %", "95.34 %", "-", "-"]]


def test_intervals_are_shown_when_the_files_have_them_and_knn_is_a_head(tmp_path: Path):
    """Metrics written since the intervals: each accuracy with its Wilson 95 % interval; the kNN head has its row,
    and the backbone table a column per head (a head the sweep did not fit: "-")."""
    from pipeline.core.heads.intervals import wilson_interval

    def split(k: int, n: int) -> dict:
        return {"accuracy": k / n, "accuracy_ci95": wilson_interval(k, n), "balanced_accuracy": k / n,
                "balanced_accuracy_ci95": wilson_interval(k, n), "loss": 0.1}

    _write(tmp_path / "heads" / "logreg.json", {"val": split(8, 10)})
    _write(tmp_path / "heads" / "knn.json", {"val": split(10, 10)})
    _write(tmp_path / "sweep.json", {
        "a": {"image_size": 96, "val_accuracy": {"logreg": 0.8, "knn": 1.0},
              "val_accuracy_ci95": {"logreg": wilson_interval(8, 10), "knn": wilson_interval(10, 10)}},
        "b": {"image_size": 96, "val_accuracy": {"logreg": 0.8, "mlp": 0.8}}})
    rows = headline_rows(tmp_path)
    # 8/10: Wilson [0.4902, 0.9433]; 10/10: [0.7225, 1]
    assert rows == [["head `logreg`", "80.00 % [49.02, 94.33]", "80.00 % [49.02, 94.33]", "-", "-"],
                    ["head `knn`", "100.00 % [72.25, 100.00]", "100.00 % [72.25, 100.00]", "-", "-"]]
    table = markdown(tmp_path)
    assert "| backbone | image size | val accuracy logreg | val accuracy mlp | val accuracy knn |" in table
    assert "| `a` (main) | 96 px | 80.00 % [49.02, 94.33] | - | 100.00 % [72.25, 100.00] |" in table
    assert "| `b` | 96 px | 80.00 % | 80.00 % | - |" in table  # an older sweep.json: no intervals


def test_sweep_table_shows_each_val_accuracy_with_its_interval():
    """compare's table (runs/sweep.md): the intervals from metrics/sweep.json beside each val accuracy (here rather
    than in test_compare.py, whose tests all run DVC)."""
    from pipeline.core.evaluate.comparison import sweep_table
    from pipeline.core.heads.intervals import wilson_interval

    results = {"a": {"image_size": 96, "val_accuracy": {"logreg": 0.8, "knn": 1.0},
                     "val_accuracy_ci95": {"logreg": wilson_interval(8, 10), "knn": wilson_interval(10, 10)},
                     "features": {"logreg": "avg 1280", "knn": "avg 1280"}}}
    lines = sweep_table(results)
    assert lines[0] == "| backbone | image size | val acc logreg | val acc knn | features (logreg / knn) |"
    assert lines[2] == "| `a` (main) | 96 px | 80.00 % [49.02, 94.33] | 100.00 % [72.25, 100.00] | avg 1280 / avg 1280 |"
