"""The report says which model is best by comparing numbers, not their formatted text."""
from __future__ import annotations

import json

from pipeline.core.report import write_markdown


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
