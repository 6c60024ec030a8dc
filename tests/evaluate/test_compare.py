"""The backbone comparison through real DVC: opt-in `matrix` stages per sweep backbone, the main backbone never
extracted twice, reuse of unchanged backbones, metrics/sweep.json, `dvc exp show`, plots/sweep.csv and sweep.png."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY, dvc, make_dvc_repo, run_cmd, write_digit_folder

from pipeline.core.evaluate.comparison import HEADS, best

pytestmark = pytest.mark.slow

LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def _extracted(repo: Path, stage: str) -> dict:
    """How many images the stage's own run extracted and how many it took from the feature store."""
    ran = json.loads((repo / "runs" / f"{stage}.json").read_text())
    assert ran["dvc_stage"] == stage
    return {"extracted": ran["images_extracted"], "reused": ran["images_reused"]}


def test_default_pipeline_extracts_once_and_compares_the_main_backbone(tmp_path: Path):
    """sweep.backbones is empty by default: no sweep stage, one extraction, and compare still has the main row."""
    repo = tmp_path / "repo"
    write_digit_folder(repo / "tiny", classes=3, per_class=12)
    make_dvc_repo(repo, **{**TINY, "data": {**TINY["data"], "source": "tiny"}})
    out = dvc(repo, "repro").stdout
    assert "sweep_" not in out and out.count("Running stage 'extract'") == 1, out
    assert "Running stage 'compare'" in out and "Running stage 'evaluate'" in out, out
    assert _extracted(repo, "extract") == {"extracted": 36, "reused": 0}
    sweep = json.loads((repo / "metrics" / "sweep.json").read_text())
    assert list(sweep) == [LITE[0]]
    for head in ("logreg", "mlp"):
        fitted = json.loads((repo / "metrics" / "heads" / f"{head}.json").read_text())
        assert sweep[LITE[0]]["val_accuracy"][head] == fitted["val"]["accuracy"]
    assert "## Backbone sweep" not in (repo / "report" / "report.md").read_text()  # evaluate never waits for it


def test_sweep_reuses_the_main_backbone_runs_per_backbone_and_reports(tmp_path: Path):
    repo = tmp_path / "repo"
    write_digit_folder(repo / "tiny", classes=3, per_class=12)
    # the main backbone listed in the sweep too: its rows come from the feature store, its row from the main heads
    make_dvc_repo(repo, **{**TINY, "data": {**TINY["data"], "source": "tiny"}, "sweep": {"backbones": LITE[:2]}})
    first = dvc(repo, "repro").stdout
    for stage in ("extract", "sweep_extract@tf_efficientnet_lite0", "sweep_extract@tf_efficientnet_lite1",
                  "sweep_heads@tf_efficientnet_lite1-mlp", "compare", "evaluate"):
        assert f"Running stage '{stage}'" in first, first
    # each image extracted once per backbone: Lite0 by whichever of `extract` and its sweep stage DVC ran first (both
    # wait only for prepare), the other one reusing those rows from the feature store; Lite1 by its sweep stage
    lite0 = [_extracted(repo, "extract"), _extracted(repo, f"sweep_extract@{LITE[0]}")]
    assert sorted(lite0, key=lambda r: r["extracted"]) == [{"extracted": 0, "reused": 36},
                                                          {"extracted": 36, "reused": 0}], lite0
    assert _extracted(repo, f"sweep_extract@{LITE[1]}") == {"extracted": 36, "reused": 0}
    sweep = json.loads((repo / "metrics" / "sweep.json").read_text())
    assert list(sweep) == LITE[:2]  # the main backbone once, first
    for name, folder in ((LITE[0], repo / "metrics" / "heads"), (LITE[1], repo / "metrics" / "heads" / "sweep" / LITE[1])):
        for head, pooling in (("logreg", "avg 1280"), ("mlp", "catavgmax 2560"), ("knn", "avg 1280")):
            fitted = json.loads((folder / f"{head}.json").read_text())
            assert sweep[name]["val_accuracy"][head] == fitted["val"]["accuracy"]
            assert sweep[name]["val_accuracy_ci95"][head] == fitted["val"]["accuracy_ci95"]
            assert sweep[name]["features"][head] == pooling and fitted["features"]["backbone"] == name
        assert sweep[name]["image_size"] == 32 and "speed" not in sweep[name]  # speeds stay out of tracked files
    table = (repo / "runs" / "sweep.md").read_text()
    assert f"| `{LITE[0]}` (main) | 32 px |" in table and f"| `{LITE[1]}` | 32 px |" in table, table
    # the sweep's Lite0 features are the main pipeline's bytes, so its heads are the same to the last digit
    for head in ("logreg", "mlp"):
        main = json.loads((repo / "metrics" / "heads" / f"{head}.json").read_text())
        swept = json.loads((repo / "metrics" / "heads" / "sweep" / LITE[0] / f"{head}.json").read_text())
        assert main == swept
    rows = list(csv.DictReader((repo / "plots" / "sweep.csv").open()))
    assert [(r["backbone"], r["head"]) for r in rows] == [(b, h) for b in LITE[:2] for h in HEADS]
    assert (repo / "plots" / "sweep.png").is_file() and best(sweep)[0] in LITE[:2]

    run_cmd(["git", "add", "-A"], repo)
    run_cmd(["git", "commit", "-qm", "two backbones"], repo)
    second = dvc(repo, "exp", "run", "-S", f"sweep.backbones=[{','.join(LITE)}]").stdout
    assert "Running stage 'sweep_extract@tf_efficientnet_lite2'" in second, second
    for unchanged in ("sweep_extract@tf_efficientnet_lite0", "sweep_extract@tf_efficientnet_lite1",
                      "sweep_heads@tf_efficientnet_lite0-logreg", "extract", "finetune", "evaluate"):
        assert f"Running stage '{unchanged}'" not in second, second
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "metrics/sweep.json" in text and LITE[2] in text
