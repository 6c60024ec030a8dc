"""The few-shot section, CSV and figure show metrics/fewshot.json's numbers as stored, skipped shots included."""
from __future__ import annotations

from pipeline.core.evaluate.fewshot_report import fewshot_section, plot_fewshot, write_plot_rows


def _cell(acc: float, lo: float, hi: float) -> dict:
    return {"accuracy": acc, "accuracy_ci95": [lo, hi], "per_episode": {"accuracy": [acc, acc]}}


def _fewshot(shots: list[int]) -> dict:
    probes = {"logreg": {"C": 1.0}, "knn": {"k": 20, "T": 0.07}, "ncm": {}}
    results = {str(k): {p: {"val": _cell(0.5 + k / 100, 0.4, 0.6 + k / 100), "test": _cell(0.25, 0.125, 0.375)}
                        for p in probes} for k in shots}
    return {"protocol": {"episodes": 2, "seed": 0, "pooling": "avg", "in_features": 8, "probes": probes,
                         "scored_rows": {"val": 8, "test": 8}},
            "skipped": {"16": "class 'b' has 3 train images, fewer than 16",
                        "8": "class 'b' has 3 train images, fewer than 8"},
            "results": results}


def test_section_rows_csv_and_skipped_lines(tmp_path):
    fewshot = _fewshot([2, 1])
    text = "\n".join(fewshot_section(fewshot, "fewshot.png"))
    assert "| shots | probe | val accuracy | test accuracy |" in text
    assert "| 1 | `logreg` | 51.00 % [40.00, 61.00] | 25.00 % [12.50, 37.50] |" in text
    assert text.index("| 1 | `ncm`") < text.index("| 2 | `logreg`")  # by shots (numerically), then probe
    assert text.index("> skipped: 8-shot") < text.index("> skipped: 16-shot")
    write_plot_rows(tmp_path / "f.csv", fewshot)
    lines = (tmp_path / "f.csv").read_text().splitlines()
    assert lines[1] == "1,logreg,val,0.510000,0.400000,0.610000" and len(lines) == 1 + 2 * 3 * 2
    plot_fewshot(tmp_path / "f.png", fewshot)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_every_shot_skipped_still_writes_a_section_and_a_figure(tmp_path):
    fewshot = _fewshot([])
    text = "\n".join(fewshot_section(fewshot, "fewshot.png"))
    assert "| shots |" not in text and "> skipped: 8-shot" in text
    plot_fewshot(tmp_path / "f.png", fewshot)
    write_plot_rows(tmp_path / "f.csv", fewshot)
    assert (tmp_path / "f.csv").read_text() == "shots,probe,split,accuracy,ci95_low,ci95_high\n"
