"""torchrun on CPU (gloo, 2 processes): DDP fine-tuning keeps the ranks' parameters identical."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, dvc_env
from safetensors.torch import load_file

from pipeline.core.data.index import read_index
from pipeline.core.heads.fitting import fit_head, save_head
from pipeline.infra.config import load_section

pytestmark = pytest.mark.slow


def test_ddp_finetune_keeps_ranks_identical(tiny_cache, tmp_path: Path):
    head_dir = tmp_path / "logreg"
    module, spec, _ = fit_head("logreg", tiny_cache["features"], load_section("heads", tiny_cache["params"]).logreg)
    save_head(head_dir, module, spec)
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load(tiny_cache["params"].read_text())
    raw["finetune"].update(bn="train", batch_size=4, epochs=1)
    params.write_text(yaml.safe_dump(raw))
    env = {**dvc_env(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "ddp_worker.py"), str(params), str(tiny_cache["index"]), str(head_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    seen0, seen1 = set(r0.pop("_seen_ids").tolist()), set(r1.pop("_seen_ids").tolist())
    assert seen0 and seen1 and not seen0 & seen1  # DistributedSampler: each rank its own share of train
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ at {key}"
    assert not torch.equal(r0["head.weight"], module.state_dict()["weight"])  # it did train
    rows, _ = read_index(tiny_cache["index"])
    assert seen0 | seen1 <= {int(r["id"]) for r in rows if r["split"] == "train"}
