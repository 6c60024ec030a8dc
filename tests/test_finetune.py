"""Fine-tuning: the warm start reproduces the head (parity), BatchNorm policies do what they say, and LP-FT starts
from the head's accuracy, not from chance."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.artifacts import read_json, write_json
from pipeline.config import load_section
from pipeline.errors import PipelineError
from pipeline.finetune import ParityError, _apply_bn_policy, _schedule, check_parity, run
from pipeline.heads import fit_head, save_head
from pipeline.network import load_checkpoint
from pipeline.select import select_head


@pytest.fixture(scope="module")
def fitted(tiny_cache, tmp_path_factory) -> dict[str, Path]:
    """Both heads fitted on the tiny cache, and select's choice, as the DVC stages would write them."""
    out = tmp_path_factory.mktemp("heads")
    heads = load_section("heads", tiny_cache["params"])
    metrics = {}
    for name in ("logreg", "mlp"):
        module, spec, metrics[name] = fit_head(name, tiny_cache["features"], getattr(heads, name))
        save_head(out / name, module, spec)
    return {**tiny_cache, "heads": out, "metrics": metrics}


def _select(fitted, tmp_path: Path, head: str) -> Path:
    choice = select_head({head: fitted["metrics"][head]})
    write_json(tmp_path / "selected.json", choice)
    return tmp_path / "selected.json"


def test_check_parity_tolerances():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    assert check_parity(a, a + 1e-4, atol=1e-3, max_flips=0.0)["max_abs_logit_diff"] == pytest.approx(1e-4)
    with pytest.raises(ParityError, match="max \\|logit difference\\|"):
        check_parity(a, a + 0.1, atol=1e-3, max_flips=1.0)
    flipped = a.copy()
    flipped[0] = [0.0, 1.0]
    with pytest.raises(ParityError, match="argmax differs on 33.33%"):
        check_parity(a, flipped, atol=10.0, max_flips=0.1)


def test_schedule_warmup_then_cosine():
    f = _schedule(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


@pytest.mark.parametrize("policy", ["frozen", "eval", "train"])
def test_bn_policy(policy):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = copy.deepcopy(body.state_dict())
    body.train()
    _apply_bn_policy(body, policy)
    opt = torch.optim.SGD([p for p in body.parameters() if p.requires_grad], lr=0.1)
    body(torch.randn(8, 3, 6, 6)).square().mean().backward()
    opt.step()
    after = body.state_dict()
    stats_same = torch.equal(before["1.running_mean"], after["1.running_mean"])
    affine_same = torch.equal(before["1.weight"], after["1.weight"])
    assert stats_same == (policy in ("frozen", "eval"))
    assert affine_same == (policy == "frozen")
    assert not torch.equal(before["0.weight"], after["0.weight"])  # the convolution always trains


@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_warm_start_reproduces_head_then_never_loses_to_it(fitted, tmp_path, head):
    selected = _select(fitted, tmp_path, head)
    metrics = run(fitted["params"], fitted["index"], fitted["features"], fitted["heads"], selected,
                  tmp_path / "model", tmp_path / "finetune.json")
    # epoch 0 is the warm start: the head's own val accuracy (LP-FT starts there, not from chance)
    assert metrics["warm_start_val"]["accuracy"] == pytest.approx(fitted["metrics"][head]["val"]["accuracy"])
    assert metrics["warm_start_val"]["loss"] == pytest.approx(fitted["metrics"][head]["val"]["loss"], abs=1e-4)
    assert metrics["val"]["accuracy"] >= metrics["warm_start_val"]["accuracy"]
    info = read_json(tmp_path / "model" / "model.json")
    assert info["parity"]["max_abs_logit_diff"] <= info["finetune"]["parity_atol"]
    net, pre, meta = load_checkpoint(tmp_path / "model")
    assert meta["warm_start"] == head and pre.size == 32
    assert read_json(tmp_path / "finetune.json") == metrics


def test_parity_failure_stops_before_training(fitted, tmp_path):
    """Features from another image size do not fit the head: the stage must refuse, not train."""
    selected = _select(fitted, tmp_path, "logreg")
    params = tmp_path / "params.yaml"
    params.write_text(fitted["params"].read_text().replace("image_size: 32", "image_size: 48"))
    with pytest.raises(PipelineError):  # the features fingerprint check or, failing that, the parity check
        run(params, fitted["index"], fitted["features"], fitted["heads"], selected, tmp_path / "model",
            tmp_path / "finetune.json")
    assert not (tmp_path / "model").exists()
