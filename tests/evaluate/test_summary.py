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
