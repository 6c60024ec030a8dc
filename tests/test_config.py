"""params.yaml mistakes fail before any work, naming the key and what is allowed; and the data params that change
prepare's output are exactly the ones dvc.yaml lists for it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_params

from pipeline.infra.config import ConfigError, load_section
from pipeline.infra.errors import PipelineError


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,section,expected", [
    ("data:\n  val_fracton: 0.1\n", "data",
     r"unknown key 'data.val_fracton' in params.yaml \(did you mean 'data.val_fraction'\?\); allowed keys: "
     r"source, val_fraction, test_fraction, seed, max_image_pixels, max_aspect_ratio, on_bad_file, follow_links"),
    ("heads:\n  mlp:\n    hiden: [64]\n", "heads", r"unknown key 'heads.mlp.hiden' .*did you mean 'heads.mlp.hidden'"),
    ("heads:\n  mlpp: {}\n", "heads",
     r"unknown key 'heads.mlpp' .*did you mean 'heads.mlp'.*allowed keys: logreg, mlp"),
    ("finetuen:\n  epochs: 1\n", "data", r"unknown section 'finetuen' .*did you mean 'finetune'.*allowed: data, "),
])
def test_unknown_keys_name_the_key_and_the_allowed_ones(tmp_path, text, section, expected):
    with pytest.raises(ConfigError, match=expected):
        load_section(section, _params(tmp_path, text))


@pytest.mark.parametrize("text,expected", [
    ("heads:\n  mlp:\n    epochs: ten\n", r"heads.mlp.epochs must be an integer, got 'ten'"),
    ("heads:\n  mlp:\n    epochs: true\n", r"heads.mlp.epochs must be an integer, got True"),
    ("heads:\n  mlp:\n    hidden: 64\n", r"heads.mlp.hidden must be a list of int, got 64"),
    ("heads:\n  logreg:\n    C: [0.1, big]\n", r"heads.logreg.C\[1\] must be a number, got 'big'"),
    ("finetune:\n  hflip: 'no'\n", r"finetune.hflip must be true or false, got 'no'"),
    ("heads:\n  logreg:\n    refit: 'yes'\n", r"heads.logreg.refit must be true or false, got 'yes'"),
    ("heads:\n  logreg:\n    refine: 1.5\n", r"heads.logreg.refine must be an integer"),
    ("data:\n  source: 3\n", r"data.source must be a string, got 3"),
    ("data:\n  max_image_pixels: 2.5e8\n", r"data.max_image_pixels must be an integer"),
    ("data:\n  on_bad_file: ignore\n", r"data.on_bad_file = 'ignore' is not allowed; choose one of: skip, error"),
    ("extract:\n  precision: fp16\n", r"extract.precision = 'fp16' is not allowed; choose one of: fp32, bf16"),
    ("data: [1, 2]\n", r"data must be a mapping of keys"),
    ("heads:\n  logreg:\n    solver: lbfgs\n",
     r"heads.logreg.solver = 'lbfgs' is not allowed; choose one of: auto, sklearn, torch"),
    ("heads:\n  mlp:\n    class_weight: auto\n",
     r"heads.mlp.class_weight = 'auto' is not allowed; allowed: null \(every image counts once\) or balanced"),
])
def test_wrong_types(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_section("data", _params(tmp_path, text))


@pytest.mark.parametrize("text,expected", [
    ("data:\n  val_fraction: 1.5\n", r"data.val_fraction = 1.5 is out of range; allowed: \(0.0, 1.0\]"),
    ("data:\n  val_fraction: 0.6\n  test_fraction: 0.5\n", r"data.val_fraction \+ data.test_fraction must be < 1"),
    ("data:\n  max_image_pixels: 0\n", r"data.max_image_pixels = 0 is out of range; allowed: \[1, 2147483647\]"),
    ("data:\n  source: ''\n", r"data.source is empty"),
    ("heads:\n  mlp:\n    dropout: 1.0\n", r"heads.mlp.dropout must be < 1"),
    ("extract:\n  batch_size: 0\n", r"extract.batch_size = 0 is out of range; allowed: \[1, 65536\]"),
    ("backbone:\n  image_size: 8\n", r"backbone.image_size = 8 is out of range; allowed: \[16, 4096\]"),
    ("heads:\n  logreg:\n    tol: 0\n", r"heads.logreg.tol = 0.0 is out of range; allowed: \(0.0, 1.0\]"),
    ("heads:\n  logreg:\n    refine: -1\n", r"heads.logreg.refine = -1 is out of range; allowed: \[0, 20\]"),
    ("heads:\n  logreg:\n    refine: 21\n", r"heads.logreg.refine = 21 is out of range; allowed: \[0, 20\]"),
    ("heads:\n  mlp:\n    in_memory_gb: -1\n", r"heads.mlp.in_memory_gb = -1.0 is out of range; allowed: \[0.0, "),
    ("finetune:\n  swa_start: 1.0\n", r"finetune.swa_start = 1.0 is out of range; allowed: \[0.0, 1.0\)"),
    ("finetune:\n  ema_decay: 0.99\n", r"finetune.ema_decay \(0.99\) and finetune.swa_start \(0.5\) are two ways"),
    ("finetune:\n  patience: 2\n", r"finetune.patience \(2\) stops at the best val epoch, which finetune.select: last"),
])
def test_out_of_range(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_section("data", _params(tmp_path, text))


@pytest.mark.parametrize("value", ["big", "Auto", "true", "224.0", "[224]"])
def test_image_size_is_an_int_null_or_auto(tmp_path, value):
    with pytest.raises(ConfigError, match=r"backbone.image_size = .* is not allowed; allowed: an integer in "
                                          r"\[16, 4096\] \(pixels\), null \(the weights' own size\) or auto$"):
        load_section("backbone", _params(tmp_path, f"backbone:\n  image_size: {value}\n"))
    for text, want in (("auto", "auto"), ("null", None), ("160", 160)):
        assert load_section("backbone", _params(tmp_path, f"backbone:\n  image_size: {text}\n")).image_size == want


def test_every_section_is_checked_by_every_stage(tmp_path):
    """A typo in finetune stops prepare at once, not hours later when fine-tuning starts."""
    params = write_params(tmp_path / "params.yaml", finetune={"epoch": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'finetune.epoch' .*did you mean 'finetune.epochs'"):
        load_section("data", params)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 3, column 1"):
        load_section("data", _params(tmp_path, "data:\n  source: x\n\tseed: 1\n"))
    with pytest.raises(ConfigError, match="not found; run from the repository root or pass --params"):
        load_section("data", tmp_path / "nope.yaml")
    assert issubclass(ConfigError, PipelineError)


def test_bad_params_stop_the_stage_with_one_line(tmp_path):
    params = write_params(tmp_path / "params.yaml", heads={"mlp.hiden": [64]})
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["prepare: error: unknown key 'heads.mlp.hiden' in params.yaml (did you mean "
                      "'heads.mlp.hidden'?); allowed keys: hidden, pooling, dropout, lr, weight_decay, batch_size, epochs, "
                      "patience, seed, class_weight, device, in_memory_gb, views"], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("text,expected", [
    ("heads:\n  mlp:\n    lr: .nan\n", r"heads.mlp.lr = nan is not a finite number"),
    ("heads:\n  mlp:\n    lr: .inf\n", r"heads.mlp.lr = inf is not a finite number"),
    ("heads:\n  mlp:\n    weight_decay: .inf\n", r"heads.mlp.weight_decay = inf is not a finite number"),
    ("heads:\n  mlp:\n    dropout: .nan\n", r"heads.mlp.dropout = nan is not a finite number"),
    ("heads:\n  logreg:\n    C: [.nan]\n", r"heads.logreg.C\[0\] = nan is not a finite number"),
    ("data:\n  val_fraction: .nan\n", r"data.val_fraction = nan is not a finite number"),
    ("finetune:\n  lr: -.inf\n", r"finetune.lr = -inf is not a finite number"),
    ("finetune:\n  clip_grad_norm: .nan\n", r"finetune.clip_grad_norm = nan is not a finite number"),
])
def test_nan_and_inf_are_refused(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_section("data", _params(tmp_path, text))


@pytest.mark.parametrize("text,expected", [
    ("heads:\n  mlp:\n    hidden: [1000000]\n", r"heads.mlp.hidden = 1000000 is out of range; allowed: \[1, 65536\]"),
    ("heads:\n  mlp:\n    batch_size: 10000000\n", r"heads.mlp.batch_size = .* allowed: \[1, 65536\]"),
    ("heads:\n  mlp:\n    epochs: 1000000000\n", r"heads.mlp.epochs = .* allowed: \[1, 100000\]"),
    ("heads:\n  logreg:\n    max_iter: 100000000000\n", r"heads.logreg.max_iter = .* allowed: \[1, 10000000\]"),
    ("extract:\n  batch_size: 1000000\n", r"extract.batch_size = .* allowed: \[1, 65536\]"),
    ("extract:\n  workers: 10000\n", r"extract.workers = .* allowed: \[0, 256\]"),
    ("finetune:\n  batch_size: 1000000\n", r"finetune.batch_size = .* allowed: \[1, 65536\]"),
    ("finetune:\n  epochs: 1000000\n", r"finetune.epochs = .* allowed: \[0, 100000\]"),
    ("backbone:\n  image_size: 100000\n", r"backbone.image_size = 100000 is out of range; allowed: \[16, 4096\]"),
    ("data:\n  max_image_pixels: 100000000000\n", r"data.max_image_pixels = .* allowed: \[1, 2147483647\]"),
])
def test_absurd_sizes_are_refused_with_the_range(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_section("data", _params(tmp_path, text))


@pytest.mark.parametrize("value,number", [("1e-3", 1e-3), ("5E-4", 5e-4), ("1.5e2", 150.0), ("1.0e-05", 1e-05)])
def test_exponents_are_numbers_as_dvc_reads_them_and_a_quoted_number_gets_a_hint(tmp_path, value, number):
    """PyYAML (YAML 1.1) reads 1e-3 as a string and DVC (YAML 1.2) as a number, and DVC writes an `-S` value back
    as Python's repr (1e-05): params.yaml is read with YAML 1.2's floats, so the stages and DVC agree."""
    assert load_section("heads", _params(tmp_path, f"heads:\n  mlp:\n    lr: {value}\n")).mlp.lr == number
    with pytest.raises(ConfigError, match=rf"^heads.mlp.lr = '{value}' is a string \(in quotes\); write the number "
                                          rf"without quotes: {value}$"):
        load_section("data", _params(tmp_path, f"heads:\n  mlp:\n    lr: '{value}'\n"))


def test_nan_param_stops_the_stage_with_one_line(tmp_path):
    params = write_params(tmp_path / "params.yaml", heads={"mlp.lr": float("nan")})
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out",
                           str(tmp_path / "prepared")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "prepare: error: heads.mlp.lr = nan is not a finite number" in proc.stderr
