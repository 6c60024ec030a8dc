"""The feature store's disk: `extract.store_max_gb` removes whole settings, least recently used first, never the
settings just used; `python -m pipeline.store` lists what the store holds and removes settings."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, write_digit_folder, write_params

from pipeline import extract, prepare
from pipeline.core.features.store_space import entries

GB = 1e9


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory) -> dict:
    """One index, extracted with three settings (float32, float16, 48 px) into one store, with no cap."""
    root = tmp_path_factory.mktemp("store")
    src = write_digit_folder(root / "digits", classes=3, per_class=6)
    params = {}
    for name, extra in {"f32": {}, "f16": {"extract": {"dtype": "float16"}}, "px48": {"backbone": {"image_size": 48}}}.items():
        sections = {**TINY, "data": {**TINY["data"], "source": str(src)},
                    "extract": {**TINY["extract"], "store": str(root / "store"), "store_max_gb": None,
                                **extra.get("extract", {})},
                    "backbone": {**TINY["backbone"], **extra.get("backbone", {})}}
        params[name] = write_params(root / f"{name}.yaml", **sections)
    prepare.main(["--params", str(params["f32"]), "--out", str(root / "prepared")])
    for name in ("f32", "f16", "px48"):
        extract.main(["--params", str(params[name]), "--index", str(root / "prepared"), "--out",
                      str(root / f"{name}.h5")])
    return {"root": root, "store": root / "store", "params": params}


def _run(store_runs, name: str, tmp: Path, **extract_keys) -> None:
    import yaml

    raw = yaml.safe_load(store_runs["params"][name].read_text())
    raw["extract"].update(extract_keys)
    params = tmp / f"{name}.yaml"
    params.write_text(yaml.safe_dump(raw))
    extract.main(["--params", str(params), "--index", str(store_runs["root"] / "prepared"), "--out",
                  str(tmp / f"{name}.h5")])


def _by_backbone_setting(store: Path) -> dict[str, Path]:
    """{f32|f16|px48: settings folder}, from each folder's settings.json."""
    import json

    out = {}
    for e in entries(store):
        size = json.loads(e.settings["preprocess"])["size"]
        out["px48" if size == 48 else "f16" if e.settings["dtype"] == "float16" else "f32"] = e.folder
    return out


@pytest.mark.slow
def test_cap_removes_least_recently_used_settings_whole_never_the_ones_just_used(store_runs, tmp_path, caplog):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(store_runs["store"], store)
    runs = {**store_runs, "params": {}}
    for name, path in store_runs["params"].items():  # the same settings, writing to this test's copy of the store
        runs["params"][name] = tmp_path / f"orig-{name}.yaml"
        runs["params"][name].write_text(path.read_text().replace(str(store_runs["store"]), str(store)))
    folders = _by_backbone_setting(store)
    assert len(folders) == 3
    for age, name in enumerate(("f16", "f32", "px48")):  # last used: f16 oldest, then f32, px48 newest
        os.utime(folders[name] / "settings.json", (1e9 + age, 1e9 + age))
    sizes = {e.folder: e.bytes for e in entries(store)}
    assert all(s > 0 for s in sizes.values())
    caplog.set_level(logging.INFO, logger="pipeline")

    # f32 again with room for two settings: f32 becomes the most recent, f16 (the oldest) goes
    _run(runs, "f32", tmp_path, store_max_gb=(sizes[folders["f32"]] + sizes[folders["px48"]] + 1000) / GB)
    assert sorted(_by_backbone_setting(store)) == ["f32", "px48"]
    assert f"feature store: removed the rows of {folders['f16'].name} (tf_efficientnet_lite0" in caplog.text
    assert "fp32/float16" in caplog.text  # the settings in words: precision/dtype

    # a cap below what f32 alone takes: everything else goes, f32 is kept and the log says so
    caplog.clear()
    _run(runs, "f32", tmp_path, store_max_gb=1e-6)
    assert sorted(_by_backbone_setting(store)) == ["f32"]
    assert "over extract.store_max_gb = 1e-06, in the settings just used alone; kept" in caplog.text
    assert "0 run through the backbone" in caplog.text  # f32's rows survived their own cap


def _store_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(cwd / "runs")}
    return subprocess.run([sys.executable, "-m", "pipeline.store", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_store_command_lists_settings_rows_bytes_last_used_and_removes(store_runs, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(store_runs["store"], store)
    listed = _store_cmd("--store", str(store), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = [ln.split("pipeline.store: ", 1)[1] for ln in listed.stderr.splitlines() if "pipeline.store: " in ln
             and ("feature store" in ln or " rows " in ln)]
    assert lines[0].startswith(f"feature store {store}: 3 settings, ")
    rows = lines[1:]
    assert len(rows) == 3 and all(" 18 rows " in r and " MB  last used 20" in r for r in rows)
    assert sum("fp32/float16" in r for r in rows) == 1 and sum(" 48 px " in r for r in rows) == 1
    newest_first = [e.key for e in reversed(entries(store))]
    assert [r.split()[0] for r in rows] == newest_first

    gone = _store_cmd("--store", str(store), "--remove", newest_first[0], cwd=tmp_path)
    assert gone.returncode == 0 and not (store / newest_first[0]).exists() and len(entries(store)) == 2
    unknown = _store_cmd("--store", str(store), "--remove", "0123456789abcdef", cwd=tmp_path)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "store: error: the feature store" in unknown.stderr and "holds no settings 0123456789abcdef" in unknown.stderr
    kept = _store_cmd("--store", str(store), "--remove-all-but", "1", cwd=tmp_path)
    assert kept.returncode == 0 and [e.key for e in entries(store)] == [newest_first[1]]
    assert _store_cmd("--help", cwd=tmp_path).stdout.count("extract.store_max_gb *") == 1


def test_store_max_gb_is_speed_only_and_checked():
    from pipeline.infra.config import ConfigError, ExtractConfig, build, output_keys

    assert "extract.store_max_gb" not in output_keys("extract")
    assert build(ExtractConfig, {"store_max_gb": None}, "extract").store_max_gb is None
    with pytest.raises(ConfigError, match=r"extract.store_max_gb = 0.0 is out of range"):
        build(ExtractConfig, {"store_max_gb": 0}, "extract")


def test_settings_with_decode_jpeg_name_the_decoder_chosen(tmp_path: Path):
    """`decode: jpeg` keeps TorchCodec's and torchvision's rows under two settings; the listing tells them apart."""
    from pipeline.core.features.store_space import SettingsEntry

    base = {"backbone": "b", "weights": "bundled", "preprocess": '{"size": 32}', "precision": "fp32",
            "dtype": "float32", "device_type": "cpu"}
    described = [SettingsEntry("k", tmp_path, settings, 0, 0, 0.0).describe() for settings in (
        {**base, "decode": "jpeg", "jpeg_decoder": "torchvision"}, {**base, "decode": "pil"})]
    assert described == ["b weights=bundled 32 px fp32/float32 decode=jpeg (torchvision) on cpu",
                         "b weights=bundled 32 px fp32/float32 decode=pil on cpu"]
