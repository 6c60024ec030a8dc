"""Fine-tuning: the warm start reproduces the head (parity), BatchNorm policies do what they say, and LP-FT starts
from the head's accuracy, not from chance."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import TINY, finetune_run, write_params

from pipeline import extract, heads
from pipeline.core.evaluate.prediction import load_model
from pipeline.core.finetune.network import load_finetuned
from pipeline.core.finetune.optim import apply_bn_mode, lr_factor, make_optimizer, set_trainable
from pipeline.core.finetune.training import ParityError, check_parity
from pipeline.core.heads.fitting import fit_head, save_head
from pipeline.core.heads.selection import select_head
from pipeline.infra.artifacts import read_json, write_json
from pipeline.infra.config import FinetuneConfig, load_section


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


def _override(src: Path, dst: Path, **finetune) -> Path:
    import yaml

    params = yaml.safe_load(src.read_text())
    params["finetune"].update(finetune)
    dst.write_text(yaml.safe_dump(params))
    return dst


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
    f = [lr_factor(s, total_steps=10, warmup_steps=2) for s in range(11)]
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0) and f[6] == pytest.approx(0.5) and f[10] == pytest.approx(0.0)
    one = [lr_factor(s, 100, 0, "onecycle") for s in range(101)]
    assert one[0] == pytest.approx(0.04) and max(one) == pytest.approx(1.0, abs=1e-3) and one[-1] == pytest.approx(0)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _one_step(policy: str, freeze_epochs: int, epoch: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    net = _Net()
    cfg = FinetuneConfig(bn=policy, freeze_epochs=freeze_epochs, lr=0.1, body_lr_ratio=1.0, weight_decay=0.0)
    before = copy.deepcopy(net.state_dict())
    set_trainable(net, cfg, freeze_epochs + 1)
    opt = make_optimizer(net, cfg)
    set_trainable(net, cfg, epoch)
    net.train()
    apply_bn_mode(net.body, policy)
    net(torch.randn(8, 3, 6, 6)).square().mean().backward()
    opt.step()
    return before, net.state_dict()


@pytest.mark.parametrize("policy", ["frozen", "eval", "train"])
def test_bn_policy(policy):
    before, after = _one_step(policy, freeze_epochs=0, epoch=1)
    same = {k: torch.equal(before[k], after[k]) for k in before}
    assert same["body.1.running_mean"] == (policy in ("frozen", "eval"))  # statistics kept unless `train`
    assert same["body.1.weight"] == (policy == "frozen")  # affine frozen only under `frozen`
    assert not same["body.0.weight"] and not same["head.weight"]  # convolutions and head always train


@pytest.mark.parametrize("policy", ["frozen", "eval", "train"])
def test_head_first_phase(policy):
    before, after = _one_step(policy, freeze_epochs=1, epoch=1)
    same = {k: torch.equal(before[k], after[k]) for k in before}
    assert same["body.0.weight"] and same["body.3.weight"]  # the body is frozen in the first phase
    assert same["body.1.weight"] == (policy != "train")  # ... except BatchNorm under `train`
    assert not same["head.weight"]
    _, later = _one_step(policy, freeze_epochs=1, epoch=2)
    assert not torch.equal(before["body.0.weight"], later["body.0.weight"])  # unfrozen afterwards


def test_discriminative_learning_rates():
    net = _Net()
    opt = make_optimizer(net, FinetuneConfig(lr=1e-2, body_lr_ratio=0.1, layer_decay=0.5))
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(1e-2)  # head
    assert max(lrs[1:]) == pytest.approx(1e-3)  # top of the body at ratio x lr
    assert min(lrs[1:]) == pytest.approx(1e-3 * 0.5 ** 2)  # the stem conv: 2 layers (bn, conv) below the top
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("head", ["logreg", "mlp"])
def test_warm_start_reproduces_head_then_never_loses_to_it(fitted, tmp_path, head):
    selected = _select(fitted, tmp_path, head)
    metrics = finetune_run(fitted["params"], fitted["index"], fitted["features"], fitted["heads"], selected,
                  tmp_path / "model", tmp_path / "finetune.json")
    # epoch 0 is the warm start: the head's own val accuracy (LP-FT starts there, not from chance)
    assert metrics["start_val"]["accuracy"] == pytest.approx(fitted["metrics"][head]["val"]["accuracy"])
    assert metrics["start_val"]["loss"] == pytest.approx(fitted["metrics"][head]["val"]["loss"], abs=1e-4)
    assert metrics["val"]["accuracy"] >= metrics["start_val"]["accuracy"]
    info = read_json(tmp_path / "model" / "model.json")
    assert info["parity"]["max_abs_logit_diff"] <= info["finetune"]["parity_atol"]
    net, pre, meta = load_finetuned(tmp_path / "model")
    assert meta["warm_start"] == head and pre.size == 32
    assert read_json(tmp_path / "finetune.json") == metrics


def test_parity_failure_stops_before_training(fitted, tmp_path):
    """Cached features that the network does not reproduce (same fingerprint, other numbers: what a head fitted on
    a damaged or foreign cache would see) stop the stage at the parity check, before any training step."""
    import h5py

    features = tmp_path / "features.h5"
    shutil.copy(fitted["features"], features)
    with h5py.File(features, "r+") as f:  # the fingerprint attributes stay: only the parity check can catch this
        f["val/avg"][...] = f["val/avg"][...] * 3.0 + 1.0
    selected = _select(fitted, tmp_path, "logreg")
    with pytest.raises(ParityError, match="warm start does not reproduce the head on val"):
        finetune_run(fitted["params"], fitted["index"], features, fitted["heads"], selected, tmp_path / "model",
                     tmp_path / "finetune.json")
    assert not (tmp_path / "model").exists() and not (tmp_path / "finetune.json").exists()


@pytest.mark.slow
def test_same_seed_same_result(fitted, tmp_path):
    """Deterministic mode, same seed, same machine: two runs give identical metrics and identical weights."""
    from pipeline.infra.artifacts import sha256_file

    selected = _select(fitted, tmp_path, "mlp")
    runs = []
    for i in range(2):
        metrics = finetune_run(fitted["params"], fitted["index"], fitted["features"], fitted["heads"], selected,
                      tmp_path / f"model{i}", tmp_path / f"finetune{i}.json", tmp_path / f"live{i}")
        runs.append((metrics, sha256_file(tmp_path / f"model{i}" / "model.safetensors")))
    assert runs[0] == runs[1]
    curves = tmp_path / "live0" / "plots" / "metrics"
    assert (curves / "val" / "accuracy.tsv").read_text() == (tmp_path / "live1" / "plots" / "metrics" / "val" /
                                                              "accuracy.tsv").read_text()


def test_random_head_starts_from_chance(fitted, tmp_path):
    """warm_start: false (the LP-FT comparison) starts near chance; the warm start starts at the head's accuracy."""
    selected = _select(fitted, tmp_path, "logreg")
    params = _override(fitted["params"], tmp_path / "params.yaml", warm_start=False, epochs=0)
    metrics = finetune_run(params, fitted["index"], fitted["features"], fitted["heads"], selected, tmp_path / "m",
                  tmp_path / "f.json")
    assert metrics["warm_start"] is False
    assert metrics["start_val"]["accuracy"] < fitted["metrics"]["logreg"]["val"]["accuracy"]


@pytest.mark.slow
def test_auto_image_size_agrees_everywhere_and_is_recorded_as_a_number(tiny_cache, tmp_path, caplog):
    """`image_size: auto` on the digits: extract, the heads' check (with and without the index), finetune and
    model.json all use 96 px, and predict reads 96 px back from the saved models, never from params.yaml."""
    params = write_params(tmp_path / "params.yaml", **{**TINY, "data": {**TINY["data"], "source": "unused"},
                                                       "backbone": {"image_size": "auto"}})
    models, features = tmp_path / "models", tmp_path / "features.h5"
    extract.main(["--params", str(params), "--index", str(tiny_cache["index"]), "--out", str(features)])
    for index in (tiny_cache["index"], tmp_path / "no_index"):
        heads.main(["logreg", "--params", str(params), "--features", str(features), "--index", str(index),
                    "--out", str(models / "heads" / "logreg"), "--metrics", str(tmp_path / "logreg.json")])
    write_json(models / "selected.json", select_head({"logreg": read_json(tmp_path / "logreg.json")}))
    finetune_run(params, tiny_cache["index"], features, models / "heads", models / "selected.json",
                 models / "finetune", tmp_path / "finetune.json")
    sizes = [r.getMessage() for r in caplog.records if "image size" in r.getMessage()]
    assert sizes[0].startswith("extract: image size 96 px (backbone.image_size: auto; the 24 train images' median")
    assert sizes[1].startswith("stale-features check: image size 96 px (backbone.image_size: auto; the 24 train")
    assert sizes[2] == ("stale-features check: image size 96 px (backbone.image_size: auto, no index to read the "
                        "train images' sizes from; the features' 96 px is a size auto gives for these weights)")
    assert sizes[3].startswith("finetune: image size 96 px (backbone.image_size: auto; the 24 train images'")
    assert read_json(models / "finetune" / "model.json")["backbone"]["image_size"] == 96
    for kind in ("finetune", "head"):
        _, pre, _, _ = load_model(kind, models)
        assert (pre.size, pre.resize) == (96, 109)


def test_finetune_that_diverges_stops_with_one_line(fitted, tmp_path):
    """A learning rate far too high makes the loss NaN/inf: the stage names the cause and writes nothing."""
    from pipeline.core.heads.divergence import TrainingDivergedError

    selected = _select(fitted, tmp_path, "logreg")
    params = _override(fitted["params"], tmp_path / "params.yaml", lr=1.0e12, body_lr_ratio=1.0,
                       clip_grad_norm=0.0, epochs=2)
    with pytest.raises(TrainingDivergedError, match=r"finetune (train|val) loss is (nan|inf) at epoch 1: training "
                                                    r"diverged; lower finetune.lr \(now 1e\+12\)"):
        finetune_run(params, fitted["index"], fitted["features"], fitted["heads"], selected, tmp_path / "m",
                     tmp_path / "f.json")
    assert not (tmp_path / "m").exists() and not (tmp_path / "f.json").exists()


@pytest.mark.slow
def test_weight_average_is_what_is_validated_and_saved(fitted, tmp_path):
    """With `ema_decay` > 0 the saved model is the averaged one: scoring the saved checkpoint on val gives back the
    val numbers the stage reported (it would not if the last step's weights were saved), and the averaged run ends
    elsewhere than the plain one."""
    from pipeline.core.data.index import read_index
    from pipeline.core.evaluate.evaluation import score_finetuned
    from pipeline.infra.artifacts import sha256_file

    selected = _select(fitted, tmp_path, "logreg")
    runs = {}
    for name, decay in (("plain", 0.0), ("ema", 0.5)):
        params = _override(fitted["params"], tmp_path / f"{name}.yaml", ema_decay=decay, swa_start=0.0,
                           select="loss", epochs=3)
        runs[name] = finetune_run(params, fitted["index"], fitted["features"], fitted["heads"], selected,
                                  tmp_path / name, tmp_path / f"{name}.json")
    rows, meta = read_index(fitted["index"])
    saved = score_finetuned(tmp_path / "ema", rows, meta["source"], ["val"]).metrics["val"]
    assert saved["accuracy"] == pytest.approx(runs["ema"]["val"]["accuracy"])
    assert saved["loss"] == pytest.approx(runs["ema"]["val"]["loss"], rel=1e-4)
    assert runs["ema"]["best_epoch"] > 0, "the test needs an epoch that beats the warm start"
    assert sha256_file(tmp_path / "ema" / "model.safetensors") != sha256_file(tmp_path / "plain" / "model.safetensors")


def test_select_by_loss_keeps_the_lowest_val_loss_epoch():
    from pipeline.core.finetune.training import _better

    best = {"val_accuracy": 0.90, "val_loss": 0.30}
    assert _better(0.89, 0.25, best, "loss") and not _better(0.89, 0.25, best, "accuracy")
    assert _better(0.91, 0.35, best, "accuracy") and not _better(0.91, 0.35, best, "loss")
    assert _better(0.90, 0.29, best, "accuracy")  # accuracy ties go to the lower loss
    assert _better(0.10, 9.0, best, "last")  # `last`: every epoch replaces the one before


@pytest.mark.slow
@pytest.mark.parametrize("lr,kept", [(1e-3, "last"), (30.0, "start")])
def test_select_last_keeps_the_final_epoch_unless_the_warm_start_is_better(fitted, tmp_path, lr, kept):
    """`select: last` saves the final epoch's (averaged) network; a run that ends worse on val than the warm start
    (a learning rate far too high, clipped so it stays finite) keeps the warm start, so the saved model is never
    worse on val than the head. Either way the checkpoint's val score is the one the stage reported."""
    from pipeline.core.data.index import read_index
    from pipeline.core.evaluate.evaluation import score_finetuned

    selected = _select(fitted, tmp_path, "logreg")
    params = _override(fitted["params"], tmp_path / "params.yaml", select="last", swa_start=0.5, epochs=2, lr=lr)
    metrics = finetune_run(params, fitted["index"], fitted["features"], fitted["heads"], selected, tmp_path / "m",
                           tmp_path / "f.json")
    history = read_json(tmp_path / "m" / "model.json")["history"]
    final = history[-1]
    assert final["epoch"] == 2
    worse = (final["val_accuracy"], -final["val_loss"]) < (history[0]["val_accuracy"], -history[0]["val_loss"])
    assert worse == (kept == "start")
    assert metrics["best_epoch"] == (0 if kept == "start" else 2)
    rows, meta = read_index(fitted["index"])
    saved = score_finetuned(tmp_path / "m", rows, meta["source"], ["val"]).metrics["val"]
    assert saved["accuracy"] == pytest.approx(metrics["val"]["accuracy"])
    assert saved["loss"] == pytest.approx(metrics["val"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_refitted_head_parity_and_its_in_sample_start_is_not_kept(fitted, tmp_path):
    """A logreg head refitted on train + val (heads.logreg.refit): the warm start reproduces the saved, refitted
    model (parity against its own val logits; epoch 0 scores the in-sample val the heads stage recorded, not the
    selection fit's), and a run worse on val than that start (lr far too high, as in the `select: last` test above)
    still keeps its trained epoch: in-sample val scores are no yardstick."""
    import dataclasses

    cfg = dataclasses.replace(load_section("heads", fitted["params"]).logreg, refit=True)
    module, spec, head_metrics = fit_head("logreg", fitted["features"], cfg)
    save_head(tmp_path / "heads" / "logreg", module, spec)
    write_json(tmp_path / "selected.json", select_head({"logreg": head_metrics}))
    params = _override(fitted["params"], tmp_path / "params.yaml", select="last", epochs=1, lr=30.0)
    metrics = finetune_run(params, fitted["index"], fitted["features"], tmp_path / "heads",
                           tmp_path / "selected.json", tmp_path / "m", tmp_path / "f.json")
    in_sample = head_metrics["refit"]["val_in_sample"]
    assert metrics["start_val"]["accuracy"] == pytest.approx(in_sample["accuracy"])
    assert metrics["start_val"]["loss"] == pytest.approx(in_sample["loss"], abs=1e-4)
    info = read_json(tmp_path / "m" / "model.json")
    assert info["parity"]["max_abs_logit_diff"] <= info["finetune"]["parity_atol"]
    assert metrics["best_epoch"] == 1
    first = info["history"][1]
    assert (first["val_accuracy"], -first["val_loss"]) < (in_sample["accuracy"], -in_sample["loss"])
