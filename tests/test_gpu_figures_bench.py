"""The GPU figures' scripts (issue 27 item 5; bench/gpu_check.sh part D), rehearsed on a CPU at tiny sizes so that a
lent GPU's minutes are not spent finding their bugs: bench/finetune_speed.py measures the stage's loop and the bare
step and writes their ratio; bench/heads.py's child reports no GPU memory where none was used."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import load_bench

REPO = Path(__file__).resolve().parents[1]


def test_finetune_speed_measures_both_loops_and_their_ratio(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "finetune_speed.py"), "--generate", "8",
                           "--size", "64x48", "--image-size", "32", "--batch-size", "4", "--workers", "0",
                           "--device", "cpu", "--bare-steps", "2", "--warmup", "1", "--workdir", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["device"].startswith("CPU: ") and figures["device"] in proc.stdout
    assert figures["precision"] == "fp32"  # params.yaml's on a CPU; bf16 is the GPU's default
    (run,) = figures["runs"]
    pipe, bare = run["pipeline"], run["bare"]
    assert pipe["images"] == 8 and pipe["steps"] == 2  # 8 images, batch 4, drop_last: one whole epoch timed
    assert bare["steps"] == 2 and bare["images"] == 8
    assert pipe["img_per_s"] > 0 and bare["img_per_s"] > 0
    assert run["ratio"] == pipe["img_per_s"] / bare["img_per_s"]
    assert f"**{100 * run['ratio']:.1f} %**" in proc.stdout


def _heads_bench():
    return load_bench("heads")


def test_heads_child_reports_no_gpu_memory_on_a_cpu(tmp_path):
    features = tmp_path / "features.h5"
    _heads_bench().write_cache(features, n=400, k=4, d=16, val_fraction=0.25)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "heads.py"), "--child", "logreg", "--features",
                           str(features)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["run"] == "logreg" and result["peak_gpu_bytes"] is None and result["gpu"] is None
    assert result["wall_s"] > 0 and 0 <= result["val_accuracy"] <= 1
    row = _heads_bench()._row(result)
    assert "peak GPU" not in row and "val accuracy" in row
    assert "peak GPU   1.50 GiB" in _heads_bench()._row({**result, "peak_gpu_bytes": 1.5 * 2**30})
