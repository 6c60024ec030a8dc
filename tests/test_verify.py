"""pipeline.verify: verdicts for identical, slightly different and very different artefacts."""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.core.verification import (
    CLOSE,
    DIFFERENT,
    SAME,
    committed_provenance,
    compare_features,
    compare_inputs,
    compare_lock,
    compare_metrics,
    record,
)
from pipeline.infra import numerics, provenance, runlog


def test_metrics_verdicts():
    then = {"val": {"accuracy": 0.93, "loss": 0.2}, "best_epoch": 3}
    assert compare_metrics(then, then, 0.01)[0] == SAME
    verdict, detail = compare_metrics({"val": {"accuracy": 0.935, "loss": 0.2}, "best_epoch": 3}, then, 0.01)
    assert verdict == CLOSE and "0.005" in detail
    assert compare_metrics({"val": {"accuracy": 0.90, "loss": 0.2}, "best_epoch": 3}, then, 0.01)[0] == DIFFERENT
    assert compare_metrics({"val": {"accuracy": 0.93, "loss": 0.2}, "best_epoch": 4}, then, 0.01)[0] == DIFFERENT


def test_speed_is_reported_never_compared():
    """The sweep's extraction speed differs on every machine and run: it must not decide the verdict."""
    then = {"lite0": {"val_accuracy": {"logreg": 0.9}, "speed": {"img_per_s": 120.0, "device": "cpu"}}}
    now = {"lite0": {"val_accuracy": {"logreg": 0.9}, "speed": {"img_per_s": 9.5, "device": "cuda:0"}}}
    assert compare_metrics(now, then, 0.01)[0] == SAME
    worse = {"lite0": {"val_accuracy": {"logreg": 0.5}, "speed": {"img_per_s": 120.0, "device": "cpu"}}}
    assert compare_metrics(worse, then, 0.01)[0] == DIFFERENT


def test_metrics_files_of_foreach_and_matrix_stages(tmp_path: Path):
    from pipeline.core.verification import _metrics_files

    (tmp_path / "params.yaml").write_text("sweep:\n  backbones: [a, b]\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  heads:\n    foreach: [logreg, mlp]\n    do:\n      cmd: x\n      metrics:\n        - m/${item}.json\n"
        "  sweep:\n    matrix:\n      backbone: ${sweep.backbones}\n      head: [logreg, mlp]\n    cmd: x\n"
        "    metrics:\n      - s/${item.backbone}/${item.head}.json:\n          cache: false\n")
    assert _metrics_files(tmp_path / "dvc.yaml", tmp_path / "params.yaml") == [
        "m/logreg.json", "m/mlp.json", "s/a/logreg.json", "s/a/mlp.json", "s/b/logreg.json", "s/b/mlp.json"]


def test_lock_verdicts():
    lock = {"stages": {"extract": {"outs": [{"path": "data/features.h5", "md5": "abc"}]}}}
    other = {"stages": {"extract": {"outs": [{"path": "data/features.h5", "md5": "abd"}]}}}
    assert [v for _, v, _ in compare_lock(lock, lock)] == [SAME]
    # bytes that differ are left to the metrics and features to judge; an output missing on one side is different
    assert [v for _, v, _ in compare_lock(other, lock)] == [CLOSE]
    assert [v for _, v, _ in compare_lock({"stages": {}}, lock)] == [DIFFERENT]


def test_inputs_must_be_identical_whatever_the_cpu():
    """Code, params, command and source data do not depend on the CPU: a change there is always `different`,
    while a dep that another stage writes (features.h5 for the heads) is an output, judged with tolerance."""
    def lock(code_md5="c1", lr=0.1, features_md5="f1"):
        return {"stages": {
            "extract": {"cmd": "x", "deps": [{"path": "pipeline/extract.py", "md5": "e1"}],
                        "outs": [{"path": "data/features.h5", "md5": features_md5}]},
            "heads@mlp": {"cmd": "h", "params": {"params.yaml": {"heads.mlp": {"lr": lr}}},
                          "deps": [{"path": "data/features.h5", "md5": features_md5},
                                   {"path": "pipeline/core/heads/mlp.py", "md5": code_md5}], "outs": []}}}
    verdicts = lambda now, then: {k: v for k, v, _ in compare_inputs(now, then)}  # noqa: E731
    assert set(verdicts(lock(), lock()).values()) == {SAME}
    assert verdicts(lock(features_md5="f2"), lock())["inputs: heads@mlp"] == SAME
    assert verdicts(lock(code_md5="c2"), lock())["inputs: heads@mlp"] == DIFFERENT
    assert verdicts(lock(lr=0.2), lock())["inputs: heads@mlp"] == DIFFERENT
    assert verdicts(lock(lr=0.2), lock())["inputs: extract"] == SAME


def test_a_dep_folder_holding_other_stages_outputs_is_not_an_input():
    """compare depends on metrics/sweep/, the folder of the sweep stages' metrics (speed included): a fresh run on
    another machine changes its hash, which must be judged with the outputs, not fail as changed inputs."""
    def lock(folder_md5):
        return {"stages": {
            "sweep_extract@a": {"cmd": "x", "outs": [{"path": "metrics/sweep/a/extract.json", "md5": "m1"}]},
            "compare": {"cmd": "c", "deps": [{"path": "metrics/sweep", "md5": folder_md5},
                                             {"path": "pipeline/compare.py", "md5": "p1"}], "outs": []}}}
    assert {k: v for k, v, _ in compare_inputs(lock("d2.dir"), lock("d1.dir"))}["inputs: compare"] == SAME


def test_feature_verdicts(tiny_cache, tmp_path: Path):
    reference = tmp_path / "reference"
    record(tiny_cache["features"], reference)
    assert compare_features(tiny_cache["features"], reference, 1e-3, 1e-4)[0] == SAME
    for delta, expected in ((1e-6, CLOSE), (1e-1, DIFFERENT)):
        copy = tmp_path / f"features_{delta}.h5"
        shutil.copy(tiny_cache["features"], copy)
        with h5py.File(copy, "r+") as f:
            f["val/avg"][0] = f["val/avg"][0] + np.float32(delta)
        verdict, detail = compare_features(copy, reference, 1e-3, 1e-4)
        assert verdict == expected, detail
        # the detail reports the size of the difference itself (float32 rounding of x + delta aside)
        reported = float(re.search(r"max \|difference\| (\S+)", detail).group(1))
        assert reported == pytest.approx(delta, rel=0.2), detail


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo,
                   check=True, capture_output=True)


def test_provenance_from_run_records_has_no_time_or_host(tmp_path, monkeypatch):
    """The run log's records become per-stage provenance: CPU, numerics, ISA, threads, precision; no time, no host."""
    monkeypatch.setenv("PIPELINE_RUN_DIR", str(tmp_path / "runs"))
    runlog.note(device="cpu", precision="fp32")
    runlog.write_record("heads", 0.0, 1.5, "ok")
    found = provenance.current()
    assert set(found) == {"heads"}
    heads = found["heads"]
    assert heads["cpu"] == numerics.cpu_model() and heads["precision"] == "fp32" and heads["device"] == "cpu"
    assert heads["numerics"].startswith(numerics.STATUS["mode"])
    if numerics.STATUS["mode"] == "portable":  # conftest imports pipeline first: this pytest process is pinned
        assert heads["threads"] == numerics.THREADS
    text = json.dumps(found)
    for banned in (platform.node(), "started", "seconds", "host"):
        assert banned not in text
    assert "live" in provenance.current(tmp_path / "empty")  # no records: this machine's own environment


def test_record_writes_provenance_and_verify_reads_it_from_git(tiny_cache, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    committed = {"cpu": "Intel Xeon", "numerics": "portable x86-64-v3", "threads": 2,
                 "isa": {"openblas": "Haswell", "aten": "AVX2", "mkl": "COMPATIBLE"}, "precision": "fp32"}
    in_use = {"aten": "AVX2", "torch_threads": 2, "mkl_cbwr": "COMPATIBLE", "openblas": ["lib.so: Haswell, 2 threads"]}
    (runs / "extract.json").write_text(json.dumps({
        "cpu": "Intel Xeon", "precision": "fp32", "torch_threads": 2, "host": "box", "started": "2025-01-01T00:00:00",
        "numerics": {"mode": "portable", "baseline": "x86-64-v3", "in_use": in_use}}))
    repo = tmp_path / "repo"
    repo.mkdir()
    record(tiny_cache["features"], repo / "reference", runs)
    written = json.loads((repo / "reference" / "provenance.json").read_text())
    assert written == {"extract": committed}
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "reference")
    (repo / "reference" / "provenance.json").write_text("{}")  # not committed: verify reads git HEAD
    monkeypatch.chdir(repo)
    assert committed_provenance(Path("reference")) == written
    assert committed_provenance(Path("elsewhere")) is None

    here = {"extract": {**committed, "cpu": "AMD EPYC", "numerics": "native",
                        "isa": {"openblas": "SkylakeX", "aten": "AVX512", "mkl": "OFF"}}}
    lines = provenance.report_lines(written, here)
    text = "\n".join(lines)
    assert "Intel Xeon; portable x86-64-v3; openblas Haswell, aten AVX2, mkl COMPATIBLE; 2 threads; fp32" in text
    assert "AMD EPYC; native; openblas SkylakeX, aten AVX512, mkl OFF" in text
    assert "differs in: cpu, numerics, isa" in text
    assert "committed: none" in "\n".join(provenance.report_lines(None, here))
