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

from pipeline.core.data.index import read_index
from pipeline.core.features.cache import read_split
from pipeline.core.heads.fitting import fit_head, head_logits, save_head
from pipeline.core.heads.selection import select_head
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


@pytest.mark.slow
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
        from pipeline.core.heads.fitting import load_head

        name = json.loads((models / "selected.json").read_text())["head"]
        module, spec = load_head(models / "heads" / name)
        cached = head_logits(module, spec, read_split(tiny_cache["features"], "val")).argmax(1)
        predicted = [g["predicted"] for g in good]
        assert predicted == [meta["classes"][i] for i in cached]
    assert np.mean([g["predicted"] == r["class"] for g, r in zip(good, val)]) >= 0.5


def _run_predict(models: Path, target: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.predict", target, "--models-dir", str(models), "--out",
                           str(out), *extra], env=dvc_env(), capture_output=True, text=True, cwd=out.parent)


@pytest.mark.slow
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


def test_predict_on_a_url_says_urls_are_not_supported(tmp_path):
    """It used to say "'https:/example.com/...' does not exist" (a slash lost, URLs not mentioned)."""
    proc = _run_predict(tmp_path / "models", "https://example.com/ant.jpg", tmp_path / "pred.csv")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert ("predict: error: 'https://example.com/ant.jpg' is a URL; URLs are not supported: download the file "
            "and give its local path") in proc.stderr


@pytest.mark.slow
def test_predict_empty_file_says_so_and_all_failed_is_an_error(models, tmp_path):
    """A 0-byte file: "empty file" (not "not in any image format"); every file failed: exit 2, the CSV still there."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_bytes(b"not an image")
    proc = _run_predict(models, str(folder), tmp_path / "pred.csv", "--model", "head")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "predict: error: none of the 2 files could be read (first: " in proc.stderr
    with open(tmp_path / "pred.csv", newline="") as f:
        errors = {Path(r["path"]).name: r["error"] for r in csv.DictReader(f)}
    assert errors["empty.jpg"].endswith("empty file (0 bytes)")
    assert "not in any image format" in errors["text.png"]


def test_csv_cells_are_escaped_against_formula_injection(tmp_path):
    """A class folder named '=cmd' (and a file '+x.png') reach index.csv escaped, and read back unchanged."""
    from conftest import write_digit_folder, write_params

    from pipeline import prepare
    from pipeline.infra.artifacts import escape_cell, read_csv_rows, write_csv

    digits = write_digit_folder(tmp_path / "digits", classes=2, per_class=8)
    (digits / "0").rename(digits / "=cmd")
    first = sorted((digits / "1").iterdir())[0]
    first.rename(first.with_name("+x.png"))
    params = write_params(tmp_path / "params.yaml", data={"source": str(digits), "val_fraction": 0.25,
                                                          "test_fraction": 0.25})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "prepared")])
    text = (tmp_path / "prepared" / "index.csv").read_text()
    assert ",'=cmd," in text and ",=cmd," not in text and "1/+x.png" in text  # mid-cell '+' is harmless
    rows, meta = read_index(tmp_path / "prepared")
    assert {r["class"] for r in rows} == {"=cmd", "1"} and "=cmd" in meta["classes"]
    assert escape_cell("\rx") == "'\rx"
    cells = ["=1+1", "+A1", "-A1", "@SUM(A1)", "\tx", "'quoted", "-0.5", "+1e-3", "plain", 3, -2.5, "a\rb"]
    write_csv(tmp_path / "t.csv", ["c"], [[c] for c in cells])
    with open(tmp_path / "t.csv", newline="") as f:
        written = [r[0] for r in csv.reader(f)][1:]
    assert written == ["'=1+1", "'+A1", "'-A1", "'@SUM(A1)", "'\tx", "''quoted",
                       "-0.5", "+1e-3", "plain", "3", "-2.5", "a\rb"]  # numbers stay numbers
    assert [escape_cell(c) for c in cells] == [*written[:9], 3, -2.5, "a\rb"]
    assert [r["c"] for r in read_csv_rows(tmp_path / "t.csv")] == [str(c) for c in cells]


def test_a_bare_cr_in_a_class_folder_name_survives_index_csv(tmp_path):
    """Linux allows CR in folder names; Python's csv writer with `\\n` line endings leaves such a cell unquoted, and
    reading index.csv back then splits the row (more rows, wrong columns). The row is now written fully quoted."""
    from conftest import write_digit_folder, write_params

    from pipeline import prepare

    digits = write_digit_folder(tmp_path / "digits", classes=2, per_class=8)
    (digits / "0").rename(digits / "zero\rx")
    (digits / "1").rename(digits / "\r=one")
    params = write_params(tmp_path / "params.yaml", data={"source": str(digits), "val_fraction": 0.25,
                                                          "test_fraction": 0.25})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "prepared")])
    rows, meta = read_index(tmp_path / "prepared")
    assert len(rows) == 16 and meta["classes"] == ["\r=one", "zero\rx"]
    assert {r["class"] for r in rows} == {"zero\rx", "\r=one"}
    assert all(r["path"].startswith(r["class"] + "/") for r in rows)


def _png(path: Path) -> Path:
    """A tiny real PNG (a gradient), enough for a flag check that never opens the model."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("flag,value,message", [
    ("--top-k", "0", "predict: error: --top-k 0: give how many classes to list per image, 1 or more"),
    ("--top-k", "-1", "predict: error: --top-k -1: give how many classes to list per image, 1 or more"),
    ("--batch-size", "0", "predict: error: --batch-size 0: give the number of images per batch, 1 to 65,536"),
], ids=["top-k-0", "top-k-negative", "batch-size-0"])
def test_predict_count_flags_out_of_range_are_one_line(models, tmp_path, flag, value, message):
    """Issue 28: each of these was a traceback from torch (topk, DataLoader) after the model had been loaded (real
    models here, so that the old code reaches that point)."""
    image = _png(tmp_path / "one.png")
    proc = _run_predict(models, str(image), tmp_path / "pred.csv", "--model", "head", flag, value)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr.splitlines()
    assert not (tmp_path / "pred.csv").exists()


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "70000"], "--batch-size 70000: give the number of images per batch, 1 to 65,536"),
    (["--workers", "-1"], "--workers -1: give the number of decoding processes, 0 (decode in this process) to 256"),
    (["--device", "gpu0"], "--device 'gpu0': not a device; give auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no GPU here, or not that many: either way one line
    (["--out", "{tmp}"], "--out {tmp} is a folder; give the CSV file to write, e.g. {tmp}/predictions.csv"),
    (["--out", "{tmp}/one.png/pred.csv"], "--out {tmp}/one.png/pred.csv: '{tmp}/one.png' is a file, not a folder"),
    (["--models-dir", "{tmp}/nowhere"], "--models-dir {tmp}/nowhere does not exist; run `dvc repro` first, or give "
                                        "the folder it wrote the models to"),
], ids=["batch-size-too-large", "workers-negative", "device-unknown", "device-absent", "out-a-folder",
        "out-under-a-file", "models-dir-missing"])
def test_predict_every_other_flag_is_checked_with_one_line(tmp_path, argv, message):
    """The other flags: a traceback from torch or from the CSV writer (after predicting everything) before."""
    from pipeline import predict
    from pipeline.infra.errors import PipelineError

    image = _png(tmp_path / "one.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(PipelineError) as err:
        predict.main([str(image), *argv])
    text = str(err.value)
    assert text.startswith(message.replace("{tmp}", str(tmp_path))) and "\n" not in text, text


@pytest.mark.slow
def test_predict_counts_and_lists_the_files_it_skipped(models, tmp_path):
    """Issue 28: a non-image (or hidden) file in a folder was left out without a word; now it is counted and named,
    in its own line and in the summary, and --top-k above the classes says it lists them all."""
    folder = tmp_path / "in"
    for i in range(3):
        _png(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    proc = _run_predict(models, str(folder), tmp_path / "pred.csv", "--model", "head", "--top-k", "9")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"predict: 2 file(s) in the folders skipped (hidden, or not an image extension): {folder}/.DS_Store, "
            f"{folder}/notes.txt") in proc.stderr
    assert "3 predicted, 0 unreadable (see the error column), 2 skipped in the folders, written to" in proc.stderr
    assert "--top-k 9 is more than the model's 3 classes: listing all 3" in proc.stderr
    with open(tmp_path / "pred.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [Path(g["path"]).name for g in got] == ["0.png", "1.png", "2.png"]
    assert all(len(g["top_k"].split(";")) == 3 for g in got)


def test_predict_a_folder_of_no_images_names_what_it_skipped(tmp_path):
    from pipeline import predict
    from pipeline.infra.errors import PipelineError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("text")
    with pytest.raises(PipelineError, match=r"^no image files found in the given paths \(1 file\(s\) skipped: "
                                            r".*/in/a\.txt\); image files end in \.bmp, "):
        predict.main([str(tmp_path / "in"), "--out", str(tmp_path / "pred.csv")])
