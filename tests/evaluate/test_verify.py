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

from pipeline.core.evaluate.tolerance import Tolerances, count_bound, split_sizes
from pipeline.core.evaluate.verification import (
    CLOSE,
    DIFFERENT,
    SAME,
    bytes_must_match,
    committed_provenance,
    compare_features,
    compare_inputs,
    compare_metrics,
    record,
)
from pipeline.infra import numerics, provenance, runlog


def test_metrics_verdicts_in_images_and_relative_losses():
    """Across a GPU or another torch build: accuracies judged in images against a binomial bound, losses relative."""
    support = [36] * 10
    then = {"val": {"accuracy": 0.9721, "loss": 0.110, "per_class": {"precision": [0.945946] + [1.0] * 9,
                                                                     "recall": [1.0] * 10, "support": support}},
            "best_epoch": 8}
    sizes = split_sizes(then)
    assert sizes == {"val": 360}
    tol = Tolerances()
    same_numbers = json.loads(json.dumps(then))
    assert compare_metrics(same_numbers, then, sizes, tol, strict=False)[0] == CLOSE  # other bytes, same numbers
    # one image of a 36-image class, 2 images of 360 and a loss 20 % higher: what another platform may give
    near = json.loads(json.dumps(then))
    near["val"].update(accuracy=0.9666, loss=0.131)
    near["val"]["per_class"]["precision"][0] = 0.972222
    verdict, detail = compare_metrics(near, then, sizes, tol, strict=False)
    assert verdict == CLOSE, detail
    assert "val.accuracy 0.9721 -> 0.9666 (2.0 of 360 images" in detail
    # a 3-point drop on 360 images (11 images, bound ~10) is a regression; so is a doubled loss or another epoch
    for change in ({"accuracy": 0.9415}, {"loss": 0.25}):
        far = json.loads(json.dumps(then))
        far["val"].update(change)
        verdict, detail = compare_metrics(far, then, sizes, tol, strict=False)
        assert verdict == DIFFERENT, detail
    assert compare_metrics({**then, "best_epoch": 7}, then, sizes, tol, strict=False)[0] == DIFFERENT
    # between two pinned CPU runs nothing may differ, and the line names the headline numbers, not per-class lists
    verdict, detail = compare_metrics(near, then, sizes, tol, strict=True)
    assert verdict == DIFFERENT and detail.startswith("val.accuracy 0.9721 -> 0.9666")



def test_interval_bounds_are_judged_in_images_like_their_accuracy():
    """accuracy_ci95 = [lo, hi] moves with its accuracy on another platform: its bounds are proportions of the same
    images (within the binomial bound), not values that must be equal."""
    from pipeline.core.evaluate.tolerance import _kind
    from pipeline.core.heads.intervals import wilson_interval

    then = {"val": {"accuracy": 350 / 360, "accuracy_ci95": wilson_interval(350, 360),
                    "balanced_accuracy_ci95": wilson_interval(350, 360), "per_class": {"support": [36] * 10}}}
    near = json.loads(json.dumps(then))
    near["val"].update(accuracy=348 / 360, accuracy_ci95=wilson_interval(348, 360),
                       balanced_accuracy_ci95=wilson_interval(348, 360))
    assert compare_metrics(near, then, split_sizes(then), Tolerances(), strict=False)[0] == CLOSE
    for key in ("val.accuracy_ci95[0]", "test.balanced_accuracy_ci95[1]", "ranking[0].val_accuracy_ci95[1]"):
        assert _kind(key) == "proportion", key


def test_binomial_bound_is_the_textbook_one():
    # z sqrt(n (p1 q1 + p2 q2)) images, and never less than one image
    assert count_bound(0.9, 0.9, 100, 1.96) == pytest.approx(1.96 * (100 * 2 * 0.09) ** 0.5)
    assert count_bound(1.0, 1.0, 1079, 1.96) == 1.0


def test_bytes_must_match_unless_a_gpu_another_build_or_native_numerics():
    cpu = {"numerics": "portable x86-64-v3", "threads": 2, "packages": {"torch": "2.14.1"}, "device": "cpu"}
    assert bytes_must_match({"finetune": cpu}, {"finetune": {**cpu, "cpu": "AMD EPYC"}})[0]
    assert bytes_must_match(None, {"finetune": cpu})[0]
    for other in ({"device": "cuda:0", "gpu": "NVIDIA H100"}, {"packages": {"torch": "2.11.0"}},
                  {"numerics": "native"}):
        strict, why = bytes_must_match({"finetune": cpu}, {"finetune": {**cpu, **other}})
        assert not strict and "finetune" in why


def test_metrics_files_of_foreach_and_matrix_stages(tmp_path: Path):
    from pipeline.core.evaluate.verification import _metrics_files

    (tmp_path / "params.yaml").write_text("sweep:\n  backbones: [a, b]\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  heads:\n    foreach: [logreg, mlp]\n    do:\n      cmd: x\n      metrics:\n        - m/${item}.json\n"
        "  sweep:\n    matrix:\n      backbone: ${sweep.backbones}\n      head: [logreg, mlp]\n    cmd: x\n"
        "    metrics:\n      - s/${item.backbone}/${item.head}.json:\n          cache: false\n")
    assert _metrics_files(tmp_path / "dvc.yaml", tmp_path / "params.yaml") == [
        "m/logreg.json", "m/mlp.json", "s/a/logreg.json", "s/a/mlp.json", "s/b/logreg.json", "s/b/mlp.json"]


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
    """compare depends on metrics/sweep/, the folder of the sweep stages' metrics: a fresh run on
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
    monkeypatch.setenv("DVC_STAGE", "heads@mlp")  # as `dvc repro` tells the command
    runlog.write_record("heads", 0.0, 1.5, "ok")
    monkeypatch.delenv("DVC_STAGE")
    runlog.write_record("heads", 0.0, 1.5, "ok")  # by hand: runs/manual/heads.json, never read as the stage's
    assert (tmp_path / "runs" / "manual" / "heads.json").is_file()
    found = provenance.current()
    assert set(found) == {"heads@mlp"}
    heads = found["heads@mlp"]
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
