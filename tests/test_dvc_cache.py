"""Outputs of dvc.lock missing from the DVC cache (pipeline/infra/dvc_cache.py), in a real DVC repository: a missing
object is reported, a `cache: false` output and the leftover lock entry of a stage no longer in the pipeline are not."""
from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from conftest import dvc, run_cmd

from pipeline.infra.dvc_cache import cache_report, pipeline_stages, uncached_outputs


def _store(root: Path, text: str) -> str:
    md5 = hashlib.md5(text.encode()).hexdigest()
    obj = root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_text(text)
    return md5


def test_missing_objects_of_current_stages_only(tmp_path: Path):
    root = tmp_path / "repo"
    root.mkdir()
    run_cmd(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    (root / "params.yaml").write_text("sweep:\n  backbones: [a]\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "heads": {"foreach": ["logreg", "mlp"], "do": {"cmd": "echo ${item}", "outs": ["out/${item}"],
                                                       "metrics": [{"m/${item}.json": {"cache": False}}]}},
        "sweep": {"matrix": {"backbone": "${sweep.backbones}"}, "cmd": "echo ${item.backbone}",
                  "outs": ["sweep/${item.backbone}"]}}}))
    assert pipeline_stages(root) == {"heads@logreg", "heads@mlp", "sweep@a"}
    stored = _store(root, "logreg")
    lock = {"schema": "2.0", "stages": {
        "heads@logreg": {"cmd": "echo logreg", "outs": [{"path": "out/logreg", "md5": stored},
                                                         {"path": "m/logreg.json", "md5": "0" * 32}]},
        "heads@mlp": {"cmd": "echo mlp", "outs": [{"path": "out/mlp", "md5": "1" * 32}]},
        "sweep@a": {"cmd": "echo a", "outs": [{"path": "sweep/a", "md5": _store(root, "a")}]},
        "sweep@b": {"cmd": "echo b", "outs": [{"path": "sweep/b", "md5": "2" * 32}]},  # b left sweep.backbones
    }}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    missing = uncached_outputs(root)
    assert [path for path, _ in missing] == ["out/mlp"], missing
    assert missing[0][1].startswith("no object")
    ok, lines = cache_report(root)
    assert not ok and lines[0].startswith("dvc cache: out/mlp is NOT in the DVC cache")
    (root / "params.yaml").write_text("sweep:\n  backbones: [a, b]\n")  # b back in the pipeline: checked again
    assert [path for path, _ in uncached_outputs(root)] == ["out/mlp", "sweep/b"]
