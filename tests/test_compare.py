"""The backbone sweep through real DVC: `matrix` stages per backbone, reuse of unchanged backbones, the comparison
in metrics/sweep.json, `dvc exp show`, plots/sweep.csv and the report."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY, dvc, make_dvc_repo, run_cmd, write_digit_folder

from pipeline.core.comparison import best

pytestmark = pytest.mark.slow

LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def test_sweep_runs_per_backbone_reuses_unchanged_ones_and_reports(tmp_path: Path):
    repo = tmp_path / "repo"
    write_digit_folder(repo / "tiny", classes=3, per_class=12)
    make_dvc_repo(repo, **{**TINY, "data": {**TINY["data"], "source": "tiny"}, "sweep": {"backbones": LITE[:2]}})
    first = dvc(repo, "repro").stdout
    for stage in ("sweep_extract@tf_efficientnet_lite0", "sweep_extract@tf_efficientnet_lite1",
                  "sweep_heads@tf_efficientnet_lite1-mlp", "compare", "evaluate"):
        assert f"Running stage '{stage}'" in first, first
    sweep = json.loads((repo / "metrics" / "sweep.json").read_text())
    assert list(sweep) == LITE[:2]
    for name in LITE[:2]:
        for head in ("logreg", "mlp"):
            fitted = json.loads((repo / "metrics" / "sweep" / name / f"{head}.json").read_text())
            assert sweep[name]["val_accuracy"][head] == fitted["val"]["accuracy"]
        assert sweep[name]["features_per_image"] == {"avg": 1280, "max": 1280, "pre_logits": 1280}
        assert sweep[name]["image_size"] == 32 and "speed" not in sweep[name]  # speeds stay out of tracked files
        extract = json.loads((repo / "metrics" / "sweep" / name / "extract.json").read_text())
        assert "speed" not in extract
        ran = json.loads((repo / "runs" / f"sweep_extract@{name}.json").read_text())  # the stage's own run record
        assert ran["dvc_stage"] == f"sweep_extract@{name}" and ran["img_per_s"] > 0
        assert f"| `{name}` | 32 px |" in (repo / "runs" / "sweep.md").read_text()
    # the sweep's Lite0 row is the main pipeline's: same features bytes, so the same heads to the last digit
    for head in ("logreg", "mlp"):
        main = json.loads((repo / "metrics" / "heads" / f"{head}.json").read_text())
        swept = json.loads((repo / "metrics" / "sweep" / LITE[0] / f"{head}.json").read_text())
        assert main == swept
    rows = list(csv.DictReader((repo / "plots" / "sweep.csv").open()))
    assert [(r["backbone"], r["head"]) for r in rows] == [(b, h) for b in LITE[:2] for h in ("logreg", "mlp")]
    report = (repo / "report" / "report.md").read_text()
    name, head, _ = best(sweep)
    assert "## Backbone sweep" in report and f"best: `{name}` with {head}" in report
    assert all(f"| `{b}` | 32 px |" in report for b in LITE[:2]) and (repo / "report" / "sweep.png").is_file()

    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "two backbones"], repo)
    second = dvc(repo, "exp", "run", "-S", f"sweep.backbones=[{','.join(LITE)}]").stdout
    assert "Running stage 'sweep_extract@tf_efficientnet_lite2'" in second, second
    for unchanged in ("sweep_extract@tf_efficientnet_lite0", "sweep_extract@tf_efficientnet_lite1",
                      "sweep_heads@tf_efficientnet_lite0-logreg", "extract", "finetune"):
        assert f"Running stage '{unchanged}'" not in second, second
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "metrics/sweep.json" in text and LITE[2] in text
