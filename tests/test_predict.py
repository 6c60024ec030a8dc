"""pipeline.predict: a folder with one bad file, with the best head and with the fine-tuned model."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import dvc_env, finetune_run

from pipeline.core.dataset import read_index
from pipeline.core.features import read_split
from pipeline.core.heads import fit_head, head_logits, save_head
from pipeline.core.selection import select_head
from pipeline.infra.artifacts import write_json
from pipeline.infra.config import load_section


@pytest.fixture(scope="module")
def models(tiny_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models")
    heads = load_section("heads", tiny_cache["params"])
    metrics = {}
    for name in ("logreg", "mlp"):
        module, spec, metrics[name] = fit_head(name, tiny_cache["features"], getattr(heads, name))
        save_head(out / "heads" / name, module, spec)
    write_json(out / "selected.json", select_head(metrics))
    finetune_run(tiny_cache["params"], tiny_cache["index"], tiny_cache["features"], out / "heads", out / "selected.json",
        out / "finetune", out / "finetune.json")
    return out


def _predict(models: Path, folder: Path, out: Path, *extra: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", str(folder), "--models-dir", str(models),
                           "--out", str(out), *extra], env=dvc_env(), capture_output=True, text=True, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["head", "finetune"])
def test_predict_folder_with_a_bad_file(tiny_cache, models, tmp_path, model):
    rows, meta = read_index(tiny_cache["index"])
    val = [r for r in rows if r["split"] == "val"]
    folder = tmp_path / "in"
    folder.mkdir()
    for r in val:
        shutil.copy(Path(meta["source"]) / r["path"], folder / f"{int(r['id']):04d}.png")
    (folder / "broken.png").write_bytes(b"this is not a png")
    got = _predict(models, folder, tmp_path / "pred.csv", "--model", model, "--top-k", "2")
    assert len(got) == len(val) + 1
    bad = [g for g in got if g["error"]]
    assert [Path(b["path"]).name for b in bad] == ["broken.png"] and not bad[0]["predicted"]
    good = [g for g in got if not g["error"]]
    assert all(len(g["top_k"].split(";")) == 2 and float(g["probability"]) > 0 for g in good)
    if model == "head":
        # the image route must reproduce the head's predictions from the cached features
        from pipeline.core.heads import load_head

        name = json.loads((models / "selected.json").read_text())["head"]
        module, spec = load_head(models / "heads" / name)
        cached = head_logits(module, spec, read_split(tiny_cache["features"], "val")).argmax(1)
        predicted = [g["predicted"] for g in good]
        assert predicted == [meta["classes"][i] for i in cached]
    assert np.mean([g["predicted"] == r["class"] for g, r in zip(good, val)]) >= 0.5


def _run_predict(models: Path, target: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.predict", target, "--models-dir", str(models), "--out",
                           str(out), *extra], env=dvc_env(), capture_output=True, text=True, cwd=out.parent)


@pytest.mark.parametrize("model,file", [("head", "head.json"), ("finetune", "model.json")])
def test_predict_refuses_edited_classes(tiny_cache, models, tmp_path, model, file):
    """Classes swapped in head.json used to invert every label with exit 0; now the checksum refuses the file."""
    edited = tmp_path / "models"
    shutil.copytree(models, edited)
    name = json.loads((edited / "selected.json").read_text())["head"]
    path = edited / "heads" / name / file if model == "head" else edited / "finetune" / file
    spec = json.loads(path.read_text())
    classes = spec["classes"]
    swapped = [classes[1], classes[0], *classes[2:]]
    if model == "head":
        spec["classes"] = swapped
    else:  # both copies edited consistently: only the checksum can tell
        spec["classes"] = spec["head"]["classes"] = swapped
    path.write_text(json.dumps(spec))
    image = tmp_path / "one.png"
    rows, meta = read_index(tiny_cache["index"])
    shutil.copy(Path(meta["source"]) / rows[0]["path"], image)
    proc = _run_predict(edited, str(image), tmp_path / "pred.csv", "--model", model)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{file}': its classes {swapped!r} or its features fingerprint do not match the checksum" in proc.stderr
    assert not (tmp_path / "pred.csv").exists()
