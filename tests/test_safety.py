"""Crashes and safety: no pickle is ever run, stale caches are refused with the attribute that differs, HDF5 lock
problems name HDF5_USE_FILE_LOCKING, and stages killed with SIGKILL part way resume under `dvc repro` to the same
bytes as an uninterrupted run."""
from __future__ import annotations

import ast
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY, dvc, dvc_env, finetune_run, make_dvc_repo, write_digit_folder, write_params

from pipeline import extract, heads
from pipeline.core.features.cache import FeaturesFileError, StaleFeaturesError, read_attrs, read_split
from pipeline.core.finetune.network import ModelFileError, load_finetuned
from pipeline.core.heads.fitting import HeadFileError, fit_head, load_head, save_head
from pipeline.core.heads.selection import select_head
from pipeline.core.models.architectures import WeightsError
from pipeline.core.models.backbone import build_backbone
from pipeline.infra.artifacts import read_json, write_json
from pipeline.infra.config import BackboneConfig, load_section

LITE0 = "tf_efficientnet_lite0"


class _Payload:
    """Unpickling this runs a shell command: what a malicious 'checkpoint' would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_pickle(path: Path, marker: Path, writer: str = "pickle") -> Path:
    payload = {"conv_stem.weight": _Payload(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / f"pwned_{uuid.uuid4().hex}"


def test_the_crafted_pickle_is_live(tmp_path, marker):
    """Control: plain unpickling of the crafted file does run its code, so the refusals below mean something."""
    path = _crafted_pickle(tmp_path / "evil.pkl", marker)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"], check=True)
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_crafted_pickle_as_backbone_weights_is_refused(tmp_path, marker, writer):
    path = _crafted_pickle(tmp_path / "weights.pth", marker, writer)
    with pytest.raises(WeightsError, match=rf"'{path}' for backbone '{LITE0}' is not a plain state dict: "
                                           r"torch.load\(weights_only=True\) refused it"):
        build_backbone(BackboneConfig(name=LITE0, weights=str(path)))
    assert not marker.exists()


def test_crafted_pickle_in_place_of_a_head_or_checkpoint_is_refused(tmp_path, marker):
    head_dir = tmp_path / "heads" / "logreg"
    head_dir.mkdir(parents=True)
    write_json(head_dir / "head.json", {"head": "logreg", "in_features": 4, "num_classes": 2, "pooling": "avg"})
    _crafted_pickle(head_dir / "head.safetensors", marker)
    with pytest.raises(HeadFileError, match="does not hold a head the heads stage wrote"):
        load_head(head_dir)

    ckpt = tmp_path / "finetune"
    ckpt.mkdir()
    write_json(ckpt / "model.json", {
        "backbone": {"name": LITE0, "weights": "bundled", "image_size": 32},
        "head": {"head": "logreg", "in_features": 1280, "num_classes": 2, "pooling": "avg"},
        "preprocess": {"size": 32, "resize": 36, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}})
    _crafted_pickle(ckpt / "model.safetensors", marker, "torch")
    with pytest.raises(ModelFileError, match="does not hold a model the finetune stage wrote"):
        load_finetuned(ckpt)  # safetensors cannot even parse it: nothing is unpickled
    assert not marker.exists()


def test_no_pickle_anywhere_artefacts_are_read():
    """torch.load only with weights_only=True; no pickle, joblib or numpy allow_pickle in the package."""
    for source in sorted((REPO / "pipeline").glob("*.py")):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                banned = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
                assert not banned & {n.split(".")[0] for n in names}, f"{source.name}:{node.lineno} imports {names}"
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                keywords = {k.arg: k.value for k in node.keywords}
                if func.endswith("torch.load") or func == "load" and "weights_only" in keywords:
                    value = keywords.get("weights_only")
                    assert isinstance(value, ast.Constant) and value.value is True, \
                        f"{source.name}:{node.lineno}: {func} without weights_only=True"
                if "allow_pickle" in keywords:
                    value = keywords["allow_pickle"]
                    assert isinstance(value, ast.Constant) and value.value is False, f"{source.name}:{node.lineno}"


def test_weights_that_are_not_a_state_dict(tmp_path):
    for name, obj, holds in (("list.pth", [torch.zeros(2)], "list"), ("tensor.pth", torch.zeros(2), "Tensor"),
                             ("mixed.pth", {"a": torch.zeros(1), "b": "text"}, "a dict that does not map")):
        torch.save(obj, tmp_path / name)
        with pytest.raises(WeightsError, match=rf"'{tmp_path / name}' is not a state dict of tensors for backbone "
                                               rf"'{LITE0}' \(it holds {holds}"):
            build_backbone(BackboneConfig(name=LITE0, weights=str(tmp_path / name)))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="is not a valid safetensors file"):
        build_backbone(BackboneConfig(name=LITE0, weights=str(tmp_path / "junk.safetensors")))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_of_another_architecture_name_both(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError, match=rf"backbone.weights '{path}' does not fit backbone '{LITE0}' \(it was "
                                           r"saved from another architecture.*the file has 1\d\d tensors"):
        build_backbone(BackboneConfig(name=LITE0, weights=str(path)))
    build_backbone(BackboneConfig(name="resnet18", weights=str(path), image_size=None))  # the right name loads it


def test_killed_writer_never_leaves_a_partial_file(tmp_path):
    """SIGKILL in the middle of an atomic write: the old file stays whole, and the next write clears the leftover."""
    target = tmp_path / "metrics.json"
    write_json(target, {"version": 1})
    code = ("import sys, time\nfrom pipeline.infra.artifacts import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_text('{\"version\": 2, \"trunc')\n"
            "    print('writing', flush=True)\n    time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert read_json(target) == {"version": 1}
    assert len(list(tmp_path.glob(".metrics.json.*.tmp"))) == 1  # the killed writer's temporary, beside the target
    write_json(target, {"version": 3})
    assert read_json(target) == {"version": 3} and not list(tmp_path.glob(".metrics.json.*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


# --- HDF5 --------------------------------------------------------------------------------------------------------

def test_hdf5_lock_conflict_names_the_environment_variable(tiny_cache, tmp_path):
    """A real lock conflict: another process holds the features file open for writing."""
    features = tmp_path / "features.h5"
    shutil.copy2(tiny_cache["features"], features)
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               f"f = h5py.File({str(features)!r}, 'a')\nprint('locked', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FeaturesFileError, match=r"cannot lock HDF5 file .*unable to lock file.*"
                                                    r"set HDF5_USE_FILE_LOCKING=FALSE"):
            read_attrs(features)
        with pytest.raises(FeaturesFileError, match="HDF5_USE_FILE_LOCKING=FALSE"):
            read_split(features, "train")
        # the advice works: with locking off the same read succeeds while the writer still holds the file
        proc = subprocess.run([sys.executable, "-c", "from pipeline.core.features.cache import read_attrs\n"
                               f"print(read_attrs({str(features)!r})['backbone'])"],
                              env={**os.environ, "PYTHONPATH": str(REPO), "HDF5_USE_FILE_LOCKING": "FALSE"},
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == LITE0, proc.stderr
    finally:
        holder.kill()
        holder.wait()


def test_missing_or_half_written_features_file(tiny_cache, tmp_path):
    with pytest.raises(FeaturesFileError, match="not found; run `dvc repro`"):
        read_attrs(tmp_path / "nope.h5")
    data = tiny_cache["features"].read_bytes()
    (tmp_path / "half.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(FeaturesFileError, match="cannot be read as an HDF5 features file"):
        read_split(tmp_path / "half.h5", "train")


# --- fingerprints ------------------------------------------------------------------------------------------------

def _heads_main(cache: dict, params: Path, tmp_path: Path, index: Path | None = None) -> None:
    heads.main(["logreg", "--params", str(params), "--features", str(cache["features"]),
                "--out", str(tmp_path / "head"), "--metrics", str(tmp_path / "m.json"),
                "--index", str(index or cache["index"])])


@pytest.mark.parametrize("override,expected", [
    ({"backbone": {"image_size": 48}}, r"attribute 'preprocess' is .* \(resize: 36 vs 54, size: 32 vs 48\)"),
    ({"extract": {"dtype": "float16"}}, r"attribute 'dtype' is 'float32', but extract.dtype now gives 'float16'"),
    ({"extract": {"precision": "bf16"}}, r"attribute 'precision' is 'fp32', but extract.precision now gives 'bf16'"),
    ({"extract": {"decode": "torchcodec"}},
     r"attribute 'decode' is 'pil', but extract.decode now gives 'torchcodec'"),
    ({"backbone": {"name": "resnet18", "weights": "hub"}},
     rf"attribute 'backbone' is '{LITE0}', but backbone.name now gives 'resnet18'"),
])
def test_heads_refuse_features_from_other_params(tiny_cache, tmp_path, override, expected):
    raw = yaml.safe_load(tiny_cache["params"].read_text())
    for section, values in override.items():
        raw[section].update(values)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(StaleFeaturesError, match=expected + r".*run `dvc repro` \(or `python -m pipeline.extract`\)"):
        _heads_main(tiny_cache, params, tmp_path)
    assert not (tmp_path / "head").exists() and not (tmp_path / "m.json").exists()


def test_heads_check_auto_image_size_with_and_without_the_index(tiny_cache, tmp_path, caplog):
    """`auto` on the tiny digits resolves to 96 px from the index, so the 32 px cache is stale; with no index the
    images are unknown, and 32 px is not a size auto gives, so the cache is compared with the weights' own 224 px."""
    params = write_params(tmp_path / "params.yaml", **{**TINY, "data": {**TINY["data"], "source": "unused"},
                                                       "backbone": {"image_size": "auto"}})
    with pytest.raises(StaleFeaturesError, match=r"attribute 'preprocess' is .*backbone.image_size \(auto: the "
                                                 r"train images' sizes\) now gives .*size: 32 vs 96"):
        _heads_main(tiny_cache, params, tmp_path)
    with pytest.raises(StaleFeaturesError, match=r"size: 32 vs 224"):
        _heads_main(tiny_cache, params, tmp_path, tmp_path / "no_index")
    assert "stale-features check: image size 224 px (backbone.image_size: auto, no index to read the train " \
           "images' sizes from; compared with the weights' own)" in caplog.text
    assert not (tmp_path / "head").exists()


def test_heads_refuse_features_from_another_index(tiny_cache, tmp_path):
    index = tmp_path / "prepared"
    shutil.copytree(tiny_cache["index"], index)
    lines = (index / "index.csv").read_text().splitlines(keepends=True)
    (index / "index.csv").write_text("".join(lines[:-1]))  # one image fewer than the features were made from
    with pytest.raises(StaleFeaturesError, match="attribute 'index_sha256' is '[0-9a-f]{64}', but the dataset index"):
        _heads_main(tiny_cache, tiny_cache["params"], tmp_path, index)
    _heads_main(tiny_cache, tiny_cache["params"], tmp_path)  # the matching index and params: fits
    assert (tmp_path / "head" / "head.safetensors").is_file()


def test_heads_cli_stale_features_is_one_line(tiny_cache, tmp_path):
    params = write_params(tmp_path / "params.yaml", **{**TINY, "backbone": {"image_size": 40}})
    proc = subprocess.run([sys.executable, "-m", "pipeline.heads", "logreg", "--params", str(params), "--features",
                           str(tiny_cache["features"]), "--index", str(tiny_cache["index"]), "--out",
                           str(tmp_path / "h"), "--metrics", str(tmp_path / "m.json")], cwd=tmp_path,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("heads: error:")]
    assert len(errors) == 1 and "attribute 'preprocess'" in errors[0], proc.stderr


def test_stale_check_reads_the_recorded_data_cfg_instead_of_importing_timm(tiny_cache, tmp_path):
    """The heads' stale-features check rebuilds the expected preprocessing from the architecture config extraction
    recorded (timm and torchvision versions equal), with the same result as rebuilding it through timm; in a fresh
    process it never imports timm or torchvision. Another timm version, or another backbone, falls back to timm."""
    from pipeline.core.data.index import read_image_sizes
    from pipeline.core.features.cache import canonical_json
    from pipeline.core.features.staleness import expected_fingerprint, recorded_data_cfg
    from pipeline.core.models.architectures import architecture_data_cfg
    from pipeline.core.models.preprocessing import resolve_image_size

    attrs = read_attrs(tiny_cache["features"])
    backbone = load_section("backbone", tiny_cache["params"])
    recorded = recorded_data_cfg(attrs, backbone.name)
    assert recorded is not None
    assert canonical_json(recorded) == canonical_json(architecture_data_cfg(backbone.name))
    resolved, _ = resolve_image_size(backbone, read_image_sizes(tiny_cache["index"]))
    extract_cfg = load_section("extract", tiny_cache["params"])
    assert expected_fingerprint(resolved, extract_cfg, tiny_cache["index"], recorded) == \
        expected_fingerprint(resolved, extract_cfg, tiny_cache["index"])
    assert recorded_data_cfg({**attrs, "versions": {**attrs["versions"], "timm": "0.0.1"}}, backbone.name) is None
    assert recorded_data_cfg(attrs, "resnet18") is None
    code = ("import sys; from pipeline.core.features.staleness import verify_features; from pipeline.infra.config import "
            "load_section as s; p = sys.argv[1]; "
            "verify_features(sys.argv[2], s('backbone', p), s('extract', p), sys.argv[3]); "
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_cache["params"]), str(tiny_cache["features"]),
                           str(tiny_cache["index"])], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_finetune_refuses_a_head_fitted_on_other_features(tiny_cache, tmp_path):
    """The head was fitted on 32 px features; the features (and params) are now 40 px: refit first."""
    cfg = load_section("heads", tiny_cache["params"]).logreg
    module, spec, metrics = fit_head("logreg", tiny_cache["features"], cfg)
    save_head(tmp_path / "heads" / "logreg", module, spec)
    write_json(tmp_path / "selected.json", select_head({"logreg": metrics}))
    params = write_params(tmp_path / "params.yaml", **{**TINY, "backbone": {"image_size": 40}})
    features = tmp_path / "features40.h5"
    extract.main(["--params", str(params), "--index", str(tiny_cache["index"]), "--out", str(features)])
    with pytest.raises(StaleFeaturesError, match=r"head '.*logreg' was fitted on features with 'preprocess' = .*"
                                                 r"run `dvc repro` to refit it"):
        finetune_run(params, tiny_cache["index"], features, tmp_path / "heads", tmp_path / "selected.json",
                     tmp_path / "model", tmp_path / "finetune.json")
    with pytest.raises(StaleFeaturesError, match="attribute 'preprocess'"):  # old params, new features
        finetune_run(tiny_cache["params"], tiny_cache["index"], features, tmp_path / "heads",
                     tmp_path / "selected.json", tmp_path / "model", tmp_path / "finetune.json")
    assert not (tmp_path / "model").exists()


# --- SIGKILL part way, then dvc repro ------------------------------------------------------------------------------

KILL_PARAMS = {**TINY, "data": {**TINY["data"], "source": "tiny"},
               # long enough that the kill lands inside training (seconds): 40 epochs of a small MLP, 2 of fine-tuning
               "heads": {**TINY["heads"], "mlp.epochs": 40, "mlp.patience": 40},
               "finetune": {**TINY["finetune"], "epochs": 2}}
RESULTS = ("models/heads/mlp/head.safetensors", "models/heads/mlp/head.json", "metrics/heads/mlp.json",
           "models/selected.json", "models/finetune/model.safetensors", "models/finetune/model.json",
           "metrics/finetune.json", "data/features.h5", "data/prepared/index.csv")


def _kill_when(repo: Path, args: list[str], marker: str, timeout: float = 300) -> str:
    """Runs `dvc <args>` and SIGKILLs its whole process group (DVC and the stage) when `marker` is printed."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), *args], cwd=repo, env=dvc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        watchdog.cancel()
        proc.wait()
    output = "".join(seen)
    assert marker in output and proc.returncode == -signal.SIGKILL, output
    return output


def _digests(repo: Path) -> dict[str, str]:
    return {name: hashlib.sha256((repo / name).read_bytes()).hexdigest() for name in RESULTS}


@pytest.mark.slow
def test_sigkilled_stages_resume_to_the_same_result(tmp_path):
    """SIGKILL (DVC and the stage together, as an OOM kill or a pre-empted machine would) inside the MLP head's
    training, then inside fine-tuning; `dvc repro` then completes and gives the bytes of an uninterrupted run."""
    clean = tmp_path / "clean"
    write_digit_folder(clean / "tiny", classes=3, per_class=12)
    make_dvc_repo(clean, **KILL_PARAMS)
    dvc(clean, "repro", "extract")
    killed = tmp_path / "killed"
    shutil.copytree(clean, killed, symlinks=True)  # the same repo state, before any head ran: no run-cache for them
    dvc(clean, "repro", "finetune")
    expected = _digests(clean)

    _kill_when(killed, ["repro", "heads@mlp"], "heads@mlp: fitting on")
    assert not (killed / "models/heads/mlp/head.safetensors").exists()  # killed inside training, before saving
    _kill_when(killed, ["repro", "finetune"], "finetune: warm start reproduces")
    assert (killed / "models/heads/mlp/head.safetensors").exists()
    assert not (killed / "models/finetune/model.safetensors").exists()

    out = dvc(killed, "repro", "finetune").stdout
    assert "Running stage 'finetune'" in out
    assert _digests(killed) == expected
    assert "up to date" in dvc(killed, "status", "finetune").stdout
