"""Extraction: deterministic bytes, equality with a direct forward, the input path, resume after a kill, torchrun.

Real model (bundled EfficientNet-Lite0), real images (scikit-learn digits as PNGs, hymenoptera JPEGs when present).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, copy_hymenoptera_slice, write_digit_folder, write_params
from PIL import Image

from pipeline.core.data.images import eval_transform, load_rgb
from pipeline.core.data.index import read_index
from pipeline.core.features import extraction as ex
from pipeline.core.features import loader as loader_module
from pipeline.core.features.jpeg_decoders import JpegDecoderError, choose_jpeg_decoder, why_unusable
from pipeline.core.features.loader import (
    DeviceInput,
    ExtractDataset,
    apply_orientation,
    collate,
    decode_jpegs,
    jpeg_orientation,
    make_loader,
    pil_pixels,
    strip_app1,
)
from pipeline.core.models.backbone import build_backbone
from pipeline.core.models.pooling import pool_avg_max
from pipeline.core.models.preprocessing import ImageSizeError
from pipeline.infra.config import BackboneConfig, ConfigError, ExtractConfig, load_section

BB32 = BackboneConfig(image_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread here and in the subprocesses: on a shared 2-core runner, OpenMP threads that wait for each
    other behind other processes make a 32 px forward 10-100x slower. Bytes do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_folder(root: Path, source: Path, **extract: object) -> tuple[Path, Path]:
    """params.yaml (32 px) and a prepared index for an image folder, through prepare's own entry point."""
    from pipeline import prepare

    params = write_params(root / "params.yaml", data={"source": str(source), "val_fraction": 0.25,
                                                      "test_fraction": 0.25},
                          backbone={"image_size": 32}, extract={"workers": 0, "batch_size": 16, **extract})
    prepare.main(["--params", str(params), "--out", str(root / "prepared")])
    return params, root / "prepared"


@pytest.fixture(scope="module")
def digits60(tmp_path_factory, one_torch_thread) -> dict[str, Path]:
    """60 digit PNGs (3 classes), prepared, and their features extracted once with batch 64 on two threads (the
    reference the other runs, on one thread, must match byte for byte)."""
    root = tmp_path_factory.mktemp("digits60")
    params, index = prepare_folder(root, write_digit_folder(root / "digits", classes=3, per_class=20))
    ref = root / "ref.h5"
    torch.set_num_threads(2)
    try:
        ex.extract_features(index, ref, BB32, ExtractConfig(batch_size=64, workers=0))
    finally:
        torch.set_num_threads(1)
    return {"root": root, "params": params, "index": index, "ref": ref}


def _features(path: Path) -> dict[str, dict[str, np.ndarray]]:
    with h5py.File(path, "r") as f:
        return {s: {k: f[s][k][...] for k in ("avg", "max", "labels", "ids")} for s in f}


# --- the file: bytes, layout, values -------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_and_batch_size_workers_checkpoints_give_identical_bytes(digits60, tmp_path: Path):
    again = tmp_path / "again.h5"
    # store=None: both runs compute every row (with the feature store the second would copy the first's rows)
    ex.extract_features(digits60["index"], again, BB32, ExtractConfig(batch_size=64, workers=0, store=None))
    other = tmp_path / "other.h5"
    ex.extract_features(digits60["index"], other, BB32, ExtractConfig(batch_size=7, workers=2, checkpoint_rows=5,
                                                                      store=None))
    assert sha256(again) == sha256(digits60["ref"])
    assert sha256(other) == sha256(digits60["ref"])  # batch, workers, checkpoint size: speed only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.h5", "other.h5"]  # no partial, no temp file left


def test_summary_splits_the_wall_time_and_the_stage_logs_and_records_it(digits60, tmp_path: Path, monkeypatch,
                                                                         caplog):
    """Issue 27: the time to the first batch, the steady rate after it and the time after the last batch, in the
    summary (parts summing to the wall time), the stage's log line and its run record; the bytes are unchanged."""
    from pipeline import extract
    from pipeline.infra import runlog

    notes: dict = {}
    monkeypatch.setattr(runlog, "note", lambda **values: notes.update(values))
    summaries = []
    real = ex.extract_features
    monkeypatch.setattr(extract, "extract_features", lambda *a, **k: summaries.append(real(*a, **k)) or summaries[-1])
    out = tmp_path / "split.h5"
    params = write_params(tmp_path / "params.yaml", backbone={"image_size": 32},
                          extract={"workers": 0, "batch_size": 16, "store": None})
    with caplog.at_level(logging.INFO, logger="pipeline"):
        extract.main(["--params", str(params), "--index", str(digits60["index"]), "--out", str(out)])
    assert sha256(out) == sha256(digits60["ref"])  # waiting for the first batch at once changes no byte
    [s] = summaries
    assert s["first_batch_s"] > 0 and s["after_last_batch_s"] > 0 and s["steady_s"] >= 0
    assert s["steady_rows"] == 60 - 16 and s["steady_img_per_s"] > 0  # batches 2-4 (16, 16, 12 rows)
    parts = s["first_batch_s"] + s["steady_s"] + s["after_last_batch_s"]
    assert parts == pytest.approx(s["wall_s"], rel=1e-6, abs=1e-6)
    assert s["wall_s"] >= s["seconds"]  # `seconds` starts after the backbone is built
    assert {k: notes[k] for k in extract.TIME_SPLIT} == {k: round(s[k], 3) for k in extract.TIME_SPLIT}
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("extract: 60 images in")]
    assert f"{s['first_batch_s']:.1f} s to the first batch, then {s['steady_img_per_s']:.1f} img/s over 44 rows" \
        in line and "after the last batch" in line

    cfg = ExtractConfig(batch_size=16, workers=0, store=str(tmp_path / "store"))
    ex.extract_features(digits60["index"], tmp_path / "first.h5", BB32, cfg)
    again = ex.extract_features(digits60["index"], tmp_path / "again.h5", BB32, cfg)  # every row from the store
    assert again["rows_extracted"] == 0 and again["first_batch_s"] is None  # nothing to run: no batch parts
    assert "no batch run" in extract.time_split(again)


def test_features_equal_a_direct_forward_in_index_order(digits60):
    rows, meta = read_index(digits60["index"])
    net, pre, _ = build_backbone(BB32)
    tf = eval_transform(pre)
    x = torch.stack([tf(load_rgb(Path(meta["source"]) / r["path"])) for r in rows])
    with torch.inference_mode():
        nchw_avg, nchw_max = pool_avg_max(net(x))
        net = net.to(memory_format=torch.channels_last)
        cl_avg, cl_max = pool_avg_max(net(x.contiguous(memory_format=torch.channels_last)))
    feats = _features(digits60["ref"])
    got_ids = np.concatenate([feats[s]["ids"] for s in ("train", "val", "test")])
    assert got_ids.tolist() == list(range(len(rows)))  # row order is the index's, split by split
    got_avg = np.concatenate([feats[s]["avg"] for s in ("train", "val", "test")])
    got_max = np.concatenate([feats[s]["max"] for s in ("train", "val", "test")])
    labels = np.concatenate([feats[s]["labels"] for s in ("train", "val", "test")])
    assert labels.tolist() == [int(r["label"]) for r in rows]
    # bit for bit the channels_last forward of the tutorial transform; NCHW differs only in the last bits
    np.testing.assert_array_equal(got_avg, cl_avg.numpy())
    np.testing.assert_array_equal(got_max, cl_max.numpy())
    np.testing.assert_allclose(got_avg, nchw_avg.numpy(), atol=2e-5, rtol=0)
    np.testing.assert_allclose(got_max, nchw_max.numpy(), atol=2e-5, rtol=0)


def test_attributes_record_precision_dtype_decode(digits60, tmp_path: Path):
    out = tmp_path / "f16.h5"
    ex.extract_features(digits60["index"], out, BB32, ExtractConfig(dtype="float16", precision="bf16"))
    with h5py.File(out, "r") as f:
        attrs = dict(f.attrs)
        assert f["train/avg"].dtype == np.float16 and f["train/avg"].chunks[1] == f["train/avg"].shape[1]
    assert (attrs["precision"], attrs["dtype"], attrs["decode"]) == ("bf16", "float16", "pil")
    assert list(attrs) == sorted(attrs)  # a fixed attribute order, part of the byte-for-byte reproducibility
    ref = _features(digits60["ref"])["train"]["avg"]
    got = _features(out)["train"]["avg"].astype(np.float32)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.98  # bf16 is a different cache, but the same features


def test_unknown_decode_is_refused_with_the_choices(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  decode: nvjpeg\n")
    with pytest.raises(ConfigError, match=r"extract.decode = 'nvjpeg' is not allowed; choose one of: pil, jpeg, torchcodec, torchvision"):
        load_section("extract", params)


def test_share_gives_contiguous_slices_covering_everything():
    items = list(range(11))
    slices = [ex.share(items, r, 4) for r in range(4)]
    assert [len(s) for s in slices] == [3, 3, 3, 2]
    assert sum(slices, []) == items


# --- resume --------------------------------------------------------------------------------------------------------


def _die_before_assembly(monkeypatch, index: Path, out: Path, cfg: ExtractConfig) -> None:
    """A run that dies after its last checkpoint: every checkpoint is on disk, no output file."""
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ex, "assemble", die)
        with pytest.raises(KeyboardInterrupt):
            ex.extract_features(index, out, BB32, cfg)


def _record_checkpoints_run(monkeypatch) -> list:
    """The checkpoint spans each later `_run_rows` call is given (its 4th argument), in order."""
    calls, real = [], ex._run_rows
    monkeypatch.setattr(ex, "_run_rows", lambda *a: calls.append(a[3]) or real(*a))
    return calls


def test_resume_reuses_checkpoints_and_discards_foreign_ones(digits60, tmp_path: Path, monkeypatch, caplog):
    cfg = ExtractConfig(batch_size=8, workers=0, checkpoint_rows=8)
    out = tmp_path / "f.h5"
    partial = ex.partial_dir(out)
    _die_before_assembly(monkeypatch, digits60["index"], out, cfg)
    assert not out.exists() and len(list(partial.glob("rows-*.h5"))) == 8
    for p in sorted(partial.glob("rows-*.h5"))[3:6]:  # as if killed with three checkpoints missing
        p.unlink()
    calls = _record_checkpoints_run(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        summary = ex.extract_features(digits60["index"], out, BB32, cfg)
    assert calls == [[(24, 32), (32, 40), (40, 48)]] and summary["rows_resumed"] == 36
    assert "resuming from" in caplog.text
    assert sha256(out) == sha256(digits60["ref"]) and not partial.exists()

    # checkpoints made with other settings (here: storage dtype) are discarded, with a log line saying why
    partial.mkdir()
    (partial / "fingerprint.json").write_text('{"dtype": "float16"}')
    (partial / "rows-0000000000-0000000008.h5").write_bytes(b"not these")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        ex.extract_features(digits60["index"], out, BB32, cfg)
    assert "discarding the partial extraction" in caplog.text and "dtype" in caplog.text
    assert sha256(out) == sha256(digits60["ref"])


def test_damaged_checkpoint_is_recomputed_never_merged(digits60, tmp_path: Path, monkeypatch, caplog):
    """16 damaged bytes in a checkpoint's data (used to end as a 1.9e37 value in features.h5, exit 0): the resume
    sees the checksum mismatch, recomputes that checkpoint alone, and the file equals an uninterrupted run's."""
    cfg = ExtractConfig(batch_size=8, workers=0, checkpoint_rows=8)
    out = tmp_path / "f.h5"
    partial = ex.partial_dir(out)
    _die_before_assembly(monkeypatch, digits60["index"], out, cfg)
    victim = partial / "rows-0000000016-0000000024.h5"
    with h5py.File(victim, "r") as f:
        offset = f["max"].id.get_offset()  # contiguous data: the raw bytes of the array in the file
    with open(victim, "r+b") as fh:
        fh.seek(offset + 64)
        fh.write(bytes(range(200, 216)))
    calls = _record_checkpoints_run(monkeypatch)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        ex.extract_features(digits60["index"], out, BB32, cfg)
    assert calls == [[(16, 24)]]
    assert "does not match its checksum (damaged on disk); recomputing its rows 16-24" in caplog.text
    assert sha256(out) == sha256(digits60["ref"]) and not partial.exists()


def _extract_cmd(params: Path, index: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.extract", "--params", str(params), "--index", str(index), "--out", str(out)]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1",
            **extra}


@pytest.mark.slow
def test_second_run_on_the_same_out_names_the_holder_and_ctrl_c_is_one_line(digits60, tmp_path: Path):
    """Two real extract runs on one --out: the second says who writes it (it used to report a checkpoint missing
    "under multi-node torchrun"); Ctrl-C in the first prints one line and exits 130 (a 70-line traceback before)."""
    import shutil

    rows, meta = read_index(digits60["index"])
    source = tmp_path / "source"
    shutil.copytree(meta["source"], source)
    index = tmp_path / "prepared"
    shutil.copytree(digits60["index"], index)
    classes = json.loads((index / "classes.json").read_text())
    (index / "classes.json").write_text(json.dumps({**classes, "source": str(source)}))
    blocker = source / rows[40]["path"]
    blocker.unlink()
    os.mkfifo(blocker)  # the first run blocks here (rows 0-31 written), holding the output, until interrupted
    out = tmp_path / "features.h5"
    params = write_params(tmp_path / "params.yaml", backbone={"image_size": 32},
                          extract={"batch_size": 8, "workers": 0, "checkpoint_rows": 8})
    # SIGINT's default action in the child, whatever this process inherited: a shell that starts a job in the
    # background sets SIGINT to ignored, and Python then installs no handler, so Ctrl-C would never reach the run
    first = subprocess.Popen(_extract_cmd(params, index, out), env=_env(tmp_path), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _second_run_and_interrupt(first, params, index, out, tmp_path, blocker)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def _release_fifo(fifo: Path, proc: subprocess.Popen, seconds: float = 10.0) -> None:
    """Opens and closes the FIFO's write end while `proc` is still blocked opening it for reading.

    A signal sent to a process lands on any of its threads (OpenMP workers, tqdm's monitor); when it is not the main
    thread, the main thread's blocking open() is never interrupted and the pending KeyboardInterrupt waits for the
    syscall to return. A real file read always returns; the FIFO here stands in for a slow read, so it is released.
    """
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader has it open
        except OSError:
            pass
        time.sleep(0.2)


def _second_run_and_interrupt(first: subprocess.Popen, params: Path, index: Path, out: Path, tmp_path: Path,
                              blocker: Path) -> None:
    deadline = time.monotonic() + 120
    while len(list(ex.partial_dir(out).glob("rows-*.h5"))) < 4:
        assert first.poll() is None, f"extract ended early:\n{first.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    second = subprocess.run(_extract_cmd(params, index, out), env=_env(tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"extract: error: '{out}' is being written by another process (pid {first.pid} on " in second.stderr
    assert len(list(ex.partial_dir(out).glob("rows-*.h5"))) >= 2  # the second run touched nothing
    first.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the usual case: the main thread gets the signal and its open() returns EINTR at once
    _release_fifo(blocker, first)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "Traceback" not in err, err
    assert "extract: interrupted (Ctrl-C)" in err and not out.exists()


@pytest.mark.slow
def test_killed_extraction_leaves_no_output_and_resumes_to_identical_bytes(tmp_path: Path):
    """SIGKILL a real `python -m pipeline.extract` part way; the rerun resumes and matches an uninterrupted run.

    Row 40's file is swapped for a named pipe, so the run blocks there after writing its first checkpoints: the
    kill lands mid-extraction every time, however fast or loaded the machine.
    """
    from pipeline import prepare

    digits = write_digit_folder(tmp_path / "digits", classes=3, per_class=24)
    params = write_params(tmp_path / "params.yaml", data={"source": str(digits)}, backbone={"image_size": 32},
                          extract={"batch_size": 8, "workers": 0, "checkpoint_rows": 8})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "prepared")])
    index, out = tmp_path / "prepared", tmp_path / "features.h5"
    partial = ex.partial_dir(out)
    rows, meta = read_index(index)
    blocker = Path(meta["source"]) / rows[40]["path"]
    blocker.rename(tmp_path / "aside.png")
    os.mkfifo(blocker)

    proc = subprocess.Popen(_extract_cmd(params, index, out), env=_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # rows 0-31 are written; rows 32-39 wait for the batch after them, which never comes
    while len(list(partial.glob("rows-*.h5"))) < 4:
        assert proc.poll() is None, f"extract ended before it could be killed:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not out.exists()  # killed: nothing where DVC and the heads stage read
    assert len(list(partial.glob("rows-*.h5"))) == 4

    blocker.unlink()
    (tmp_path / "aside.png").rename(blocker)
    resumed = subprocess.run(_extract_cmd(params, index, out), env=_env(tmp_path), cwd=tmp_path,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "32 of 72 rows already extracted" in resumed.stderr
    assert not partial.exists()

    ref = tmp_path / "ref.h5"
    ex.extract_features(index, ref, load_section("backbone", params), load_section("extract", params))
    assert sha256(out) == sha256(ref)


# --- torchrun ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_processes_merge_into_the_one_process_file(digits60, tmp_path: Path):
    """2 CPU ranks (gloo) each write their checkpoints; rank 0 merges them into the one-process file."""
    params = write_params(tmp_path / "params.yaml", backbone={"image_size": 32},
                          extract={"batch_size": 16, "workers": 0, "checkpoint_rows": 8})
    out = tmp_path / "merged.h5"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pipeline.extract", "--params", str(params), "--index", str(digits60["index"]), "--out", str(out)]
    proc = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2" in proc.stderr  # rank 0 reports a world of two
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("runs", "feature_store")) == ["merged.h5",
                                                                                                  "params.yaml"]

    ref, got = _features(digits60["ref"]), _features(out)
    assert list(got) == list(ref)
    for split in ref:
        np.testing.assert_array_equal(got[split]["ids"], ref[split]["ids"])
        np.testing.assert_array_equal(got[split]["labels"], ref[split]["labels"])
        np.testing.assert_allclose(got[split]["avg"], ref[split]["avg"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[split]["max"], ref[split]["max"], rtol=0, atol=1e-6)
    with h5py.File(out, "r") as a, h5py.File(digits60["ref"], "r") as b:
        assert dict(a.attrs) == dict(b.attrs)
    assert sha256(out) == sha256(digits60["ref"])  # and in fact the very same bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path: Path, params: Path, index: Path, outs: tuple[Path, Path]) -> tuple[list[int], list[str]]:
    """Runs extraction as two torchrun nodes on this machine (one agent each, c10d rendezvous, gloo on the CPU), node
    `k` writing `outs[k]`; returns their exit codes and outputs."""
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"localhost:{_free_port()}", "--rdzv_id", f"extract-{os.getpid()}"]
    # is_host: the first agent serves the rendezvous store (on two real hosts, the endpoint's host does)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, "--rdzv_conf",
                               f"is_host={int(node == 0)}", "-m", "pipeline.extract", "--params", str(params),
                               "--index", str(index), "--out", str(outs[node])],
                              env=_env(tmp_path / f"node{node}"), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in nodes]
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in nodes], logs


@pytest.mark.slow
def test_torchrun_two_nodes_merge_into_the_one_process_file(digits60, tmp_path: Path):
    """Two torchrun "nodes" on this machine: both ranks have LOCAL_RANK 0, global ranks 0 and 1. Rank 0 (whichever
    node it lands on) assembles the shared output folder's checkpoints into the one-process file, byte for byte.
    The README's multi-node command is this one."""
    params = write_params(tmp_path / "params.yaml", backbone={"image_size": 32},
                          extract={"batch_size": 16, "workers": 0, "checkpoint_rows": 8})
    out = tmp_path / "nodes.h5"
    codes, logs = _two_nodes(tmp_path, params, digits60["index"], (out, out))
    assert codes == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    assert sum("x 2" in log for log in logs) == 1  # global rank 0 alone reports, a world of two
    assert sha256(out) == sha256(digits60["ref"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("node0", "node1", "feature_store")) == [
        "nodes.h5", "params.yaml"]  # no partial folder, no probe, no temporary file left


@pytest.mark.slow
def test_torchrun_nodes_without_a_shared_output_folder_stop_before_extracting(digits60, tmp_path: Path):
    """A node whose --out folder is not the others' (here: another path; on real hosts: a local disk) stops every
    rank before any image is read, naming the host, instead of rank 0 finding checkpoints missing at the end."""
    params = write_params(tmp_path / "params.yaml", backbone={"image_size": 32},
                          extract={"batch_size": 16, "workers": 0, "checkpoint_rows": 8})
    (tmp_path / "elsewhere").mkdir()
    codes, logs = _two_nodes(tmp_path, params, digits60["index"], (tmp_path / "f.h5", tmp_path / "elsewhere/f.h5"))
    assert codes[0] != 0 and codes[1] != 0, logs
    text = "\n".join(logs)
    assert "the ranks do not share their files. rank 1 on " in text, text[-3000:]
    assert "does not see the output folder rank 0 writes" in text
    assert not list(tmp_path.rglob("rows-*.h5")) and not list(tmp_path.rglob("f.h5"))  # nothing extracted


# --- the input path ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation,method", [
    (2, Image.Transpose.FLIP_LEFT_RIGHT), (3, Image.Transpose.ROTATE_180), (4, Image.Transpose.FLIP_TOP_BOTTOM),
    (5, Image.Transpose.TRANSPOSE), (6, Image.Transpose.ROTATE_270), (7, Image.Transpose.TRANSVERSE),
    (8, Image.Transpose.ROTATE_90)])
def test_tensor_orientation_matches_pil_exif_transpose(orientation: int, method):
    pixels = np.random.default_rng(orientation).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(pixels).transpose(method))
    got = apply_orientation(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, want)
    batch = torch.from_numpy(np.stack([pixels, pixels])).permute(0, 3, 1, 2)  # the batched form decode_jpegs uses
    np.testing.assert_array_equal(apply_orientation(batch, orientation).permute(0, 2, 3, 1).numpy()[1], want)


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_decoding_a_list_equals_decoding_one_at_a_time(tmp_path: Path, decoder: str):
    """Same-size images are resized together; each must come out exactly as if decoded alone."""
    paths = []
    for i, orientation in enumerate([1, 6, 1, 3, 6]):
        paths.append(_jpeg_with_orientation(tmp_path / f"{i}.jpg", orientation))
    Image.new("RGB", (50, 70), (10, 120, 200)).save(tmp_path / "other.jpg")
    paths.append(tmp_path / "other.jpg")
    _, pre, _ = build_backbone(BackboneConfig(image_size=32), load_weights=False)
    raw = [torch.frombuffer(strip_app1(p.read_bytes()), dtype=torch.uint8) for p in paths]
    turns = [jpeg_orientation(p.read_bytes()) for p in paths]
    cpu = torch.device("cpu")
    together = decode_jpegs(raw, turns, [str(p) for p in paths], pre, cpu, decoder)
    alone = [decode_jpegs([r], [t], [str(p)], pre, cpu, decoder)[0] for r, t, p in zip(raw, turns, paths)]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _jpeg_with_orientation(path: Path, orientation: int, xmp_first: bool = False) -> Path:
    """A smooth 90x60 picture (red grows to the right, green downwards) stored sideways with an EXIF tag.

    `xmp_first`: an XMP APP1 segment before the Exif one (photo editors write them), which TorchCodec's CPU decoder
    would take for the EXIF block, while PIL finds the Exif one.
    """
    y, x = np.mgrid[0:60, 0:90]
    im = Image.fromarray(np.stack([x * 255 // 89, y * 255 // 59, np.full_like(x, 128)], -1).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, quality=95, exif=exif)
    if xmp_first:
        xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'/>"
        data = path.read_bytes()
        assert data[2:4] == b"\xff\xe0" and data[4 + int.from_bytes(data[4:6], "big"):][:2] == b"\xff\xe1"
        at = 4 + int.from_bytes(data[4:6], "big")  # after JFIF's APP0, before the Exif APP1
        path.write_bytes(data[:at] + b"\xff\xe1" + (len(xmp) + 2).to_bytes(2, "big") + xmp + data[at:])
    return path


def _upright_pixels(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)


def test_strip_app1_removes_exif_and_xmp_and_keeps_the_pixels(tmp_path: Path):
    """TorchCodec turns a JPEG by its EXIF tag itself; without APP1 it decodes the stored pixels, which the route turns
    by the tag PIL reads. A header that is not a plain marker sequence gives None (the PIL path)."""
    from torchcodec.decoders import decode_jpeg

    plain = tmp_path / "plain.jpg"
    y, x = np.mgrid[0:60, 0:90]
    Image.fromarray(np.stack([x * 255 // 89, y * 255 // 59, np.full_like(x, 128)], -1).astype(np.uint8)).save(
        plain, quality=95)
    rot = _jpeg_with_orientation(tmp_path / "rot6.jpg", 6, xmp_first=True)
    data = rot.read_bytes()
    assert data.count(b"\xff\xe1") == 2 and jpeg_orientation(data) == 6  # XMP first, then Exif; PIL finds the tag
    stripped = strip_app1(data)
    assert b"\xff\xe1" not in stripped[:stripped.index(b"\xff\xda")]  # no APP1 left in the header
    assert stripped.endswith(data[data.index(b"\xff\xda"):])  # the scan data is untouched
    assert decode_jpeg(data).shape[-2:] == (60, 90)  # why: TorchCodec's CPU decoder read the XMP as EXIF, no turn
    stored = decode_jpeg(torch.frombuffer(stripped, dtype=torch.uint8))
    torch.testing.assert_close(stored, decode_jpeg(plain.read_bytes()), rtol=0, atol=0)  # the same stored pixels
    assert stored.shape[-2:] == (60, 90)
    torch.testing.assert_close(apply_orientation(stored, 6), _upright_pixels(rot), rtol=0, atol=0)
    assert strip_app1(plain.read_bytes()) == bytearray(plain.read_bytes())  # nothing to strip: the same bytes
    assert strip_app1(data[:40]) is None and strip_app1(b"\xff\xd8garbage") is None


@pytest.mark.parametrize("decode", ["torchcodec", "torchvision"])
def test_jpeg_route_is_upright_and_close_to_pil(tmp_path: Path, decode: str):
    """Rotated camera JPEGs (one with XMP before its EXIF), CMYK JPEG and PNG through the JPEG route with each
    decoder: the same geometry as PIL and close pixels, in the workers and in the main process (the GPU's code path,
    run on the CPU). The CMYK JPEG goes to PIL by its header, per image, whichever decoder."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    _jpeg_with_orientation(folder / "rot6.jpg", 6)
    _jpeg_with_orientation(folder / "rot8xmp.jpg", 8, xmp_first=True)
    Image.new("CMYK", (40, 30), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    Image.new("RGB", (40, 30), (200, 10, 30)).save(folder / "plain.png")
    assert jpeg_orientation((folder / "rot6.jpg").read_bytes()) == 6
    assert jpeg_orientation((folder / "cmyk.jpg").read_bytes()) is None  # CMYK: the PIL path
    _, pre, _ = build_backbone(BackboneConfig(image_size=48), load_weights=False)
    paths = ["rot6.jpg", "rot8xmp.jpg", "cmyk.jpg", "plain.png"]
    ids = list(range(len(paths)))
    cpu = torch.device("cpu")
    pil = DeviceInput(pre, cpu).pixels(collate([ExtractDataset(folder, paths, ids, pre, "pil")[i] for i in ids]))
    worker = ExtractDataset(folder, paths, ids, pre, decode)
    deferred = ExtractDataset(folder, paths, ids, pre, decode, defer_jpeg=True)
    in_worker = DeviceInput(pre, cpu).pixels(collate([worker[i] for i in ids]))
    batch = collate([deferred[i] for i in ids])
    assert batch.jpeg_pos.tolist() == [0, 1] and batch.pixel_pos.tolist() == [2, 3]
    in_main = DeviceInput(pre, cpu, decode).pixels(batch)
    torch.testing.assert_close(in_main, in_worker, rtol=0, atol=0)
    torch.testing.assert_close(in_worker[2:], pil[2:], rtol=0, atol=0)  # CMYK and PNG went through PIL
    for k in (0, 1):
        diff = (in_worker[k].float() - pil[k].float()).abs().mean().item()
        assert diff < 3, (paths[k], diff)  # another resize filter, but the same upright image (a wrong turn: > 40)


def _decoder_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("extract: JPEG decoder")]


def test_jpeg_chooses_torchcodec_where_it_works_and_logs_it_once(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert choose_jpeg_decoder("jpeg", torch.device("cpu")) == "torchcodec"
    import torchcodec

    assert _decoder_log(caplog) == [f"extract: JPEG decoder torchcodec {torchcodec.__version__} on cpu "
                                    "(extract.decode: jpeg)"]


def test_jpeg_falls_back_to_torchvision_when_torchcodec_does_not_import(monkeypatch, caplog):
    """As on a torch without a TorchCodec wheel (the H200's torch 2.11): `jpeg` decodes with torchvision and says
    why in its one line; `torchcodec` named explicitly stops with what to set instead."""
    import torchvision

    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # `from torchcodec.decoders import` -> ImportError
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert choose_jpeg_decoder("jpeg", torch.device("cpu")) == "torchvision"
        assert choose_jpeg_decoder("torchvision", torch.device("cpu")) == "torchvision"
    first, forced = _decoder_log(caplog)
    assert first.startswith(f"extract: JPEG decoder torchvision {torchvision.__version__} on cpu (extract.decode: "
                            "jpeg; torchcodec not usable: ModuleNotFoundError: import of torchcodec.decoders "
                            "halted"), first
    assert forced == f"extract: JPEG decoder torchvision {torchvision.__version__} on cpu (extract.decode: torchvision)"
    with pytest.raises(JpegDecoderError, match=r"extract.decode: torchcodec: no JPEG decoder works on cpu "
                                               r"\(torchcodec: ModuleNotFoundError.*set extract.decode: jpeg"):
        choose_jpeg_decoder("torchcodec", torch.device("cpu"))


def test_jpeg_with_no_working_decoder_says_to_use_pil(monkeypatch):
    def broken(raw, device):
        raise RuntimeError("no nvjpeg here")

    monkeypatch.setitem(loader_module.JPEG_DECODERS, "torchcodec", broken)
    monkeypatch.setitem(loader_module.JPEG_DECODERS, "torchvision", broken)
    with pytest.raises(JpegDecoderError, match=r"torchcodec: RuntimeError: no nvjpeg here; torchvision: RuntimeError: "
                                               r"no nvjpeg here\); set extract.decode: pil"):
        choose_jpeg_decoder("jpeg", torch.device("cpu"))


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_a_file_the_decoder_refuses_is_decoded_by_pil_alone(tmp_path: Path, decoder: str, caplog):
    """A non-JPEG file among JPEG bytes (as a misnamed or damaged file would be): the list call fails, each image is
    retried alone, and the refused one alone goes through PIL, with a warning naming it."""
    good = _jpeg_with_orientation(tmp_path / "good.jpg", 1)
    odd = tmp_path / "odd.jpg"
    Image.new("RGB", (40, 30), (200, 10, 30)).save(odd, "PNG")
    _, pre, _ = build_backbone(BackboneConfig(image_size=32), load_weights=False)
    raw = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in (good, odd)]
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        got = decode_jpegs(raw, [1, 1], [str(good), str(odd)], pre, torch.device("cpu"), decoder)
    torch.testing.assert_close(got[1], pil_pixels(odd, pre), rtol=0, atol=0)
    assert (got[0].float() - pil_pixels(good, pre).float()).abs().mean() < 3
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert line.startswith(f"the JPEG decoder on cpu refused {odd} (") and "decoding it with PIL instead" in line


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_jpeg_route_decodes_hymenoptera_to_the_pil_pixels(hymenoptera: Path, decoder: str):
    """Every hymenoptera JPEG, with each decoder: the full-size decode (APP1 stripped, turned by PIL's tag) is
    load_rgb's pixels byte for byte (so the two decoders agree byte for byte on a CPU); after the device resize and
    crop (224 px) the route's pixels are within 2 levels of the PIL path's (measured with TorchCodec: at most 2, mean
    at most 0.011 per file), against up to 255 for a wrong image or turn."""
    _, pre, _ = build_backbone(BackboneConfig(image_size=224), load_weights=False)
    cpu = torch.device("cpu")
    files = sorted(p for p in hymenoptera.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    assert len(files) >= 390
    worst_max, worst_mean = 0.0, 0.0
    for path in files:
        data = path.read_bytes()
        turn = jpeg_orientation(data)
        raw = torch.frombuffer(strip_app1(data), dtype=torch.uint8)
        full = apply_orientation(loader_module.JPEG_DECODERS[decoder](raw, cpu), turn)
        torch.testing.assert_close(full, _upright_pixels(path), rtol=0, atol=0, msg=str(path))
        route = decode_jpegs([raw], [turn], [str(path)], pre, cpu, decoder)[0]
        diff = (route.float() - pil_pixels(path, pre).float()).abs()
        worst_max, worst_mean = max(worst_max, diff.max().item()), max(worst_mean, diff.mean().item())
    assert worst_max <= 2 and worst_mean < 0.05, (worst_max, worst_mean)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA GPU; the CPU decoders are checked above")
def test_nvjpeg_route_on_the_gpu_is_close_to_pil_with_each_decoder(hymenoptera: Path, caplog):
    """On a GPU, `jpeg` chooses a decoder that works there, and the route through nvJPEG (both decoders, in batched
    lists as extraction calls them) stays within 1 level on average of the PIL path on every hymenoptera JPEG (nvJPEG's
    IDCT and chroma upsampling are not libjpeg-turbo's, so not byte for byte; a wrong image or turn is > 40)."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    with caplog.at_level(logging.INFO, logger="pipeline"):
        chosen = choose_jpeg_decoder("jpeg", cuda)
    assert _decoder_log(caplog) and chosen in ("torchcodec", "torchvision")
    _, pre, _ = build_backbone(BackboneConfig(image_size=224), load_weights=False)
    files = sorted(p for p in hymenoptera.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    data = [p.read_bytes() for p in files]
    turns = [jpeg_orientation(d) for d in data]
    raw = [torch.frombuffer(strip_app1(d), dtype=torch.uint8) for d in data]
    pil = torch.stack([pil_pixels(p, pre) for p in files]).float()
    for decoder in ("torchcodec", "torchvision"):
        if decoder == "torchcodec" and why_unusable(decoder, cuda):
            continue  # no TorchCodec for this torch: torchvision's nvJPEG alone
        got = torch.stack(decode_jpegs(raw, turns, [str(p) for p in files], pre, cuda, decoder)).float().cpu()
        per_file = (got - pil).abs().mean(dim=(1, 2, 3))
        assert per_file.max() < 1.0, (decoder, files[int(per_file.argmax())], per_file.max().item())


def test_pil_path_pixels_normalise_to_the_tutorial_transform_exactly(digits60):
    rows, meta = read_index(digits60["index"])
    net_pre = build_backbone(BB32, load_weights=False)[1]
    ds = ExtractDataset(meta["source"], [r["path"] for r in rows[:10]], list(range(10)), net_pre)
    x = DeviceInput(net_pre, torch.device("cpu"))(next(iter(make_loader(ds, 10, 0, torch.device("cpu")))))
    tf = eval_transform(net_pre)
    want = torch.stack([tf(load_rgb(Path(meta["source"]) / r["path"])) for r in rows[:10]])
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_torchcodec_decode_extracts_hymenoptera(hymenoptera: Path, tmp_path: Path):
    """Real photos through `decode: torchcodec`: recorded in the file with TorchCodec's version (the `pil` file
    records none), features close to the PIL path's."""
    src = copy_hymenoptera_slice(hymenoptera, tmp_path / "hym", per_class=2)
    _, index = prepare_folder(tmp_path, src)
    tc, pil = tmp_path / "tc.h5", tmp_path / "pil.h5"
    ex.extract_features(index, tc, BB32, ExtractConfig(decode="torchcodec", workers=0))
    ex.extract_features(index, pil, BB32, ExtractConfig(decode="pil", workers=0))
    with h5py.File(tc, "r") as f, h5py.File(pil, "r") as g:
        assert f.attrs["decode"] == "torchcodec" and "torchcodec" in json.loads(f.attrs["versions"])
        assert "torchcodec" not in json.loads(g.attrs["versions"])
    a = np.concatenate([v["avg"] for v in _features(tc).values()])
    b = np.concatenate([v["avg"] for v in _features(pil).values()])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9, cos


@pytest.mark.slow
def test_jpeg_decode_records_the_decoder_it_chose(hymenoptera: Path, tmp_path: Path, monkeypatch):
    """`decode: jpeg` writes `jpeg_decoder` (and TorchCodec's version only when TorchCodec decoded), so files,
    checkpoints and store rows from the two decoders are never mixed: the torchvision run reuses none of the TorchCodec run's
    rows. On a CPU the two decoders give the same features, byte for byte. `torchcodec` files keep their attributes."""
    src = copy_hymenoptera_slice(hymenoptera, tmp_path / "hym", per_class=2)
    _, index = prepare_folder(tmp_path, src)
    auto, forced, fallback = tmp_path / "auto.h5", tmp_path / "tc.h5", tmp_path / "tv.h5"
    ex.extract_features(index, auto, BB32, ExtractConfig(decode="jpeg", workers=0))
    ex.extract_features(index, forced, BB32, ExtractConfig(decode="torchcodec", workers=0, store=None))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torchcodec.decoders", None)  # as where TorchCodec has no wheel
        summary = ex.extract_features(index, fallback, BB32, ExtractConfig(decode="jpeg", workers=0))
    assert summary["rows_reused"] == 0 and summary["rows_extracted"] == 8
    with h5py.File(auto, "r") as a, h5py.File(forced, "r") as c, h5py.File(fallback, "r") as v:
        assert (a.attrs["decode"], a.attrs["jpeg_decoder"]) == ("jpeg", "torchcodec")
        assert (v.attrs["decode"], v.attrs["jpeg_decoder"]) == ("jpeg", "torchvision")
        assert "torchcodec" in json.loads(a.attrs["versions"]) and "torchcodec" not in json.loads(v.attrs["versions"])
        assert "jpeg_decoder" not in c.attrs and "torchcodec" in json.loads(c.attrs["versions"])
    feats = [_features(p) for p in (auto, forced, fallback)]
    for split in feats[0]:
        for other in feats[1:]:
            np.testing.assert_array_equal(other[split]["avg"], feats[0][split]["avg"])


# --- backbone.image_size: auto -------------------------------------------------------------------------------------

def _size_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("extract: image size")]


@pytest.mark.slow
def test_auto_image_size_on_digits_is_96_byte_identical_to_image_size_96(tmp_path: Path, caplog):
    """The default pipeline's features do not change with `auto`: 8x8 digits resolve to exactly 96 px. An explicit
    size still wins. The log says which size and why."""
    _, index = prepare_folder(tmp_path, write_digit_folder(tmp_path / "digits", classes=3, per_class=4))
    auto, fixed, other = tmp_path / "auto.h5", tmp_path / "96.h5", tmp_path / "64.h5"
    summary = ex.extract_features(index, auto, BackboneConfig(image_size="auto"), ExtractConfig(workers=0))
    ex.extract_features(index, fixed, BackboneConfig(image_size=96), ExtractConfig(workers=0))
    ex.extract_features(index, other, BackboneConfig(image_size=64), ExtractConfig(workers=0))
    assert sha256(auto) == sha256(fixed)
    assert summary["backbone_config"]["image_size"] == 96 and summary["preprocess"]["size"] == 96
    with h5py.File(other, "r") as f:
        assert json.loads(f.attrs["preprocess"])["size"] == 64
    assert _size_log(caplog) == [
        "extract: image size 96 px (backbone.image_size: auto; the 6 train images' median short side (8 px) is under "
        "half the weights' 224 px, so 2 x 8 px rounded up to a multiple of 32, at least 96)",
        "extract: image size 96 px (backbone.image_size: 96)",
        "extract: image size 64 px (backbone.image_size: 64)"]


def test_auto_image_size_on_hymenoptera_is_the_weights_own(hymenoptera: Path, tmp_path: Path, caplog):
    src = copy_hymenoptera_slice(hymenoptera, tmp_path / "hym", per_class=2)
    _, index = prepare_folder(tmp_path, src)
    summary = ex.extract_features(index, tmp_path / "f.h5", BackboneConfig(image_size="auto"),
                                  ExtractConfig(workers=0))
    assert summary["preprocess"]["size"] == 224 and summary["preprocess"]["resize"] == 256
    [line] = _size_log(caplog)
    assert line.startswith("extract: image size 224 px (backbone.image_size: auto; the weights' own, since the 4 "
                           "train images' median short side (") and line.endswith("px) is at least half of it)")


def test_auto_image_size_needs_an_index_with_image_sizes(digits60, tmp_path: Path):
    """An index prepared before sizes were recorded: a clear error, not a silent guess."""
    index = tmp_path / "old"
    shutil.copytree(digits60["index"], index)
    meta = json.loads((index / "classes.json").read_text())
    del meta["image_sizes"]
    (index / "classes.json").write_text(json.dumps(meta))
    with pytest.raises(ImageSizeError, match="no image sizes to decide from.*rerun prepare"):
        ex.extract_features(index, tmp_path / "f.h5", BackboneConfig(image_size="auto"), ExtractConfig(workers=0))
    assert not (tmp_path / "f.h5").exists()


# --- deprecations --------------------------------------------------------------------------------------------------

PACKAGE_DIR = REPO / "pipeline"


@contextmanager
def deprecations_from_the_package():
    """Collects every DeprecationWarning (and PendingDeprecationWarning) raised while code of the `pipeline` package is
    on the stack, whichever module it names: our own, or a library's about a call we make, even one that warns from
    its own module (torchvision's image decoding did, issue 11). Other warnings go on as usual."""
    found: list[str] = []
    shown = warnings.showwarning

    def hook(message, category, filename, lineno, file=None, line=None):
        ours = [f for f in traceback.extract_stack() if Path(f.filename).is_relative_to(PACKAGE_DIR)]
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning)) and ours:
            found.append(f"{category.__name__} at {filename}:{lineno}, called from {ours[-1].filename}:"
                         f"{ours[-1].lineno}: {message}")
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        yield found


def test_the_deprecation_check_sees_a_library_deprecation_called_from_the_package(monkeypatch):
    """The check can fail: torchvision's deprecated decoder, called from the loader, is caught (it warns from
    torchvision's own module, which a module-based filter for `pipeline` would miss)."""
    from torchvision.io import decode_jpeg as deprecated_decode_jpeg

    monkeypatch.setitem(loader_module.JPEG_DECODERS, "torchcodec",
                        lambda raw, device: deprecated_decode_jpeg(raw, device=device))
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buf, "JPEG")
    raw = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    _, pre, _ = build_backbone(BackboneConfig(image_size=16), load_weights=False)
    with deprecations_from_the_package() as found:
        decode_jpegs([raw], [1], ["x.jpg"], pre, torch.device("cpu"), "torchcodec")
    assert len(found) == 1 and "deprecated since torchvision 0.29" in found[0], found
    assert "torchvision/io/image.py" in found[0] and "pipeline/core/features/loader.py" in found[0]  # its module, our call


@pytest.mark.slow
def test_the_package_raises_no_deprecation_warning(digits60, hymenoptera: Path, tmp_path: Path):
    """Importing every module of the package (in a fresh interpreter) and extracting through both decode routes, the
    JPEG route with each decoder (torchvision's is deprecated, and chosen on purpose) both in the workers and in the
    main process (the GPU's code path), raises no deprecation warning."""
    probe = (
        "import importlib, json, sys, traceback, warnings\n"
        "from pathlib import Path\n"
        f"pkg = Path({str(PACKAGE_DIR)!r})\n"
        "found = []\n"
        "def hook(message, category, filename, lineno, file=None, line=None):\n"
        "    if any(Path(f.filename).is_relative_to(pkg) for f in traceback.extract_stack()):\n"
        "        found.append(f'{category.__name__} at {filename}:{lineno}: {message}')\n"
        "warnings.simplefilter('always')\n"
        "warnings.showwarning = hook\n"
        "for p in sorted(pkg.rglob('*.py')):\n"
        "    rel = p.relative_to(pkg.parent).with_suffix('')\n"
        "    importlib.import_module('.'.join(rel.parts[:-1] if rel.name == '__init__' else rel.parts))\n"
        "print(json.dumps(found))\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], proc.stdout

    src = copy_hymenoptera_slice(hymenoptera, tmp_path / "hym", per_class=1)
    _, index = prepare_folder(tmp_path, src)
    _, pre, _ = build_backbone(BackboneConfig(image_size=32), load_weights=False)
    rows, meta = read_index(index)
    paths = [r["path"] for r in rows]
    cpu = torch.device("cpu")
    with deprecations_from_the_package() as found:
        ex.extract_features(digits60["index"], tmp_path / "pil.h5", BB32, ExtractConfig(decode="pil", workers=0))
        ex.extract_features(index, tmp_path / "tc.h5", BB32, ExtractConfig(decode="torchcodec", workers=0))
        ex.extract_features(index, tmp_path / "tv.h5", BB32, ExtractConfig(decode="torchvision", workers=0))
        for decoder in ("torchcodec", "torchvision"):
            for defer in (False, True):
                ds = ExtractDataset(meta["source"], paths, list(range(len(paths))), pre, decoder, defer_jpeg=defer)
                DeviceInput(pre, cpu, decoder)(collate([ds[i] for i in range(len(ds))]))
    assert found == []
