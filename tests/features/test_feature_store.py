"""The feature store (extract.store): a grown or shrunk image folder sends only new images through the backbone, and
the features file is byte-identical to a from-scratch extraction of the new index; a damaged, truncated or foreign
store is reported in one line and never trusted."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import TINY, write_digit_folder, write_params

from pipeline import extract, prepare
from pipeline.infra.artifacts import sha256_file

_REUSE = "extract: (\\d+) rows reused from the feature store .*, (\\d+) run through the backbone"


def _params(tmp: Path, source: Path, **extract_keys) -> Path:
    return write_params(tmp / "params.yaml", **{**TINY, "data": {**TINY["data"], "source": str(source)},
                                                 "extract": {**TINY["extract"], "checkpoint_rows": 8,
                                                             **extract_keys}})


def _extract(tmp: Path, params: Path, name: str, caplog) -> tuple[Path, tuple[int, int] | None]:
    """prepare + extract into tmp/name; returns the features file and (reused, computed) from the stage's log."""
    import re

    caplog.clear()
    prepare.main(["--params", str(params), "--out", str(tmp / f"{name}-prepared")])
    out = tmp / "out" / f"{name}.h5"
    extract.main(["--params", str(params), "--index", str(tmp / f"{name}-prepared"), "--out", str(out)])
    found = re.search(_REUSE, caplog.text)
    return out, (int(found.group(1)), int(found.group(2))) if found else None


def _fresh(tmp: Path, source: Path, name: str, caplog) -> Path:
    """The same index extracted from scratch (no store)."""
    (tmp / "fresh").mkdir(exist_ok=True)
    out, counts = _extract(tmp / "fresh", _params(tmp / "fresh", source, store=None), name, caplog)
    assert counts is None
    return out


@pytest.fixture
def grown(tmp_path):
    src = write_digit_folder(tmp_path / "digits", classes=3, per_class=10)
    extra = write_digit_folder(tmp_path / "extra", classes=3, per_class=12)
    return src, extra


@pytest.mark.slow
def test_grown_and_shrunk_folders_reuse_rows_and_give_the_from_scratch_bytes(tmp_path, grown, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, extra = grown
    params = _params(tmp_path, src)
    first, counts = _extract(tmp_path, params, "first", caplog)
    assert counts == (0, 30)  # an empty store: every image through the backbone
    store = tmp_path / "feature_store"
    assert len(list(store.glob("*/shard-*.h5"))) >= 1
    _grow(src, extra)  # two more images per class (the 11th and 12th digit of each class)
    second, counts = _extract(tmp_path, params, "second", caplog)
    assert counts == (30, 6)  # only the 6 new images ran
    assert sha256_file(second) == sha256_file(_fresh(tmp_path, src, "second", caplog))
    for c in range(3):  # shrink: remove 3 images in all
        sorted((src / str(c)).iterdir())[0].unlink()
    third, counts = _extract(tmp_path, params, "third", caplog)
    assert counts == (33, 0)  # no backbone at all
    assert sha256_file(third) == sha256_file(_fresh(tmp_path, src, "third", caplog))


@pytest.mark.slow
def test_damaged_truncated_or_foreign_store_is_reported_and_not_trusted(tmp_path, grown, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, _ = grown
    params = _params(tmp_path, src, batch_size=8)
    first, _ = _extract(tmp_path, params, "first", caplog)
    expected = sha256_file(first)
    shards = sorted((tmp_path / "feature_store").glob("*/shard-*.h5"), key=lambda p: p.stat().st_mtime_ns)
    assert len(shards) == 4  # 30 rows in shards of 8 (extract.checkpoint_rows)

    with h5py.File(shards[0], "r+") as f:  # damaged values: same shape and hashes, other numbers
        f["avg"][2] = f["avg"][2] * 2 + 1
    with h5py.File(shards[1], "r+") as f:  # another fingerprint
        f.attrs["fingerprint"] = '{"backbone": "other"}'
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[: len(data) // 2])  # truncated
    again, counts = _extract(tmp_path, params, "again", caplog)
    assert sha256_file(again) == expected
    log = caplog.text
    assert f"feature store: 1 rows of {shards[0]} do not match their digest (damaged on disk); recomputing" in log
    assert f"feature store: {shards[1]} was made with another fingerprint; ignored" in log
    assert f"feature store: {shards[2]} cannot be read (" in log and "removed" in log
    # 8 rows of the foreign shard, 8 of the truncated one (their rows are not in the store) and the damaged row
    assert counts == (30 - 16 - 1, 16 + 1)
    assert not shards[2].exists()


@pytest.mark.slow
def test_store_null_and_other_settings_use_no_store(tmp_path, grown, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, _ = grown
    _extract(tmp_path, _params(tmp_path, src), "first", caplog)
    _, counts = _extract(tmp_path, _params(tmp_path, src, dtype="float16"), "half", caplog)
    assert counts == (0, 30)  # float16 rows are another fingerprint: nothing reused
    assert len(list((tmp_path / "feature_store").iterdir())) == 2
    _, counts = _extract(tmp_path, _params(tmp_path, src, store=None), "none", caplog)
    assert counts is None


@pytest.mark.slow
def test_dvc_repro_after_adding_images_embeds_only_the_new_ones(tmp_path):
    """Through real DVC: add images, `dvc repro extract` reruns prepare and extract, and the stage's own log says only
    the new images went through the backbone. Switching `extract.dtype` away and back is restored from DVC's run
    cache without running the stage (README, "A growing data set": keep .dvc/cache for that)."""
    from conftest import dvc, make_dvc_repo

    repo = tmp_path / "repo"
    write_digit_folder(repo / "tiny", classes=3, per_class=10)
    make_dvc_repo(repo, **{**TINY, "data": {**TINY["data"], "source": "tiny"}})
    first = dvc(repo, "repro", "extract")
    assert "0 rows reused from the feature store" in first.stderr and "30 run through the backbone" in first.stderr
    extra = write_digit_folder(tmp_path / "extra", classes=3, per_class=12)
    for c in range(3):
        for f in sorted((extra / str(c)).iterdir())[10:]:
            shutil.copy2(f, repo / "tiny" / str(c) / f"new-{f.name}")
    second = dvc(repo, "repro", "extract")
    assert "Running stage 'prepare'" in second.stdout and "Running stage 'extract'" in second.stdout
    assert "30 rows reused from the feature store" in second.stderr and "6 run through the backbone" in second.stderr
    grown = sha256_file(repo / "data" / "features.h5")

    dvc(repo, "exp", "run", "-S", "extract.dtype=float16", "extract")
    back = dvc(repo, "exp", "run", "-S", "extract.dtype=float32", "extract")
    assert "Stage 'extract' is cached - skipping run, checking out outputs" in back.stdout + back.stderr, back.stdout
    assert sha256_file(repo / "data" / "features.h5") == grown


# --- duplicate contents ---------------------------------------------------------------------------------------------

# Byte-identical copies of the first image of class 0 (A) and of class 1 (B), in the same class, other classes and
# (as the split key falls) other splits; prepare sorts by split, then path, so no two copies of A are neighbours.
_COPIES = {"A": ["0/zz-copy-a.png", "1/copy-a.png", "2/copy-a.png", "2/dup-a.png"], "B": ["2/copy-b.png"]}


def _grow(src: Path, extra: Path) -> None:
    """The folder grows by two images per class: the 11th and 12th digit of each of the three classes."""
    for c in range(3):
        for f in sorted((extra / str(c)).iterdir())[10:]:
            shutil.copy2(f, src / str(c) / f"new-{f.name}")


def _with_copies(src: Path) -> Path:
    originals = {"A": sorted((src / "0").iterdir())[0], "B": sorted((src / "1").iterdir())[0]}
    for which, names in _COPIES.items():
        for name in names:
            shutil.copy2(originals[which], src / name)
    return src


def _index(prepared: Path) -> list[dict]:
    import csv

    with open(prepared / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _copies_apart(rows: list[dict]) -> dict[str, list[int]]:
    """{sha256: ids} of the contents listed more than once; checks that no two copies of one are neighbours."""
    groups: dict[str, list[int]] = {}
    for r in rows:
        groups.setdefault(r["sha256"], []).append(int(r["id"]))
    groups = {h: ids for h, ids in groups.items() if len(ids) > 1}
    for ids in groups.values():
        assert all(b - a > 1 for a, b in zip(ids, ids[1:])), ids
    return groups


def _rows_by_id(path: Path) -> dict[int, tuple[bytes, ...]]:
    with h5py.File(path, "r") as f:
        return {int(i): tuple(f[s][k][j].tobytes() for k in ("avg", "max", "pre_logits"))
                for s in f for j, i in enumerate(f[s]["ids"][...])}


def _same_features_per_content(path: Path, groups: dict[str, list[int]]) -> None:
    rows = _rows_by_id(path)
    for ids in groups.values():
        assert len({rows[i] for i in ids}) == 1, ids


@pytest.mark.slow
def test_duplicate_images_first_run_and_grown_rerun(tmp_path, grown, caplog):
    """Copies of one image anywhere in the index: the first run, and a rerun after growing the folder (which read the
    same store row twice and stopped with h5py's 'Indexing elements must be in increasing order') give one set of
    features per content and the from-scratch bytes."""
    caplog.set_level(logging.INFO, logger="pipeline")
    src, extra = grown
    _with_copies(src)
    params = _params(tmp_path, src, checkpoint_rows=16)  # a checkpoint's stored rows are read in one call
    first, counts = _extract(tmp_path, params, "first", caplog)
    groups = _copies_apart(_index(tmp_path / "first-prepared"))
    splits = {r["split"] for r in _index(tmp_path / "first-prepared") if int(r["id"]) in max(groups.values(), key=len)}
    assert len(groups) == 2 and len(max(groups.values(), key=len)) == 5 and len(splits) == 3
    assert counts == (0, 35)
    _same_features_per_content(first, groups)
    with h5py.File(next((tmp_path / "feature_store").glob("*/shard-*.h5")), "r") as f:
        assert len(f["sha256"]) == len(set(f["sha256"][...].tolist()))  # each content stored once

    _grow(src, extra)  # two new images per class; below, one more copy of A and a new image in two places
    shutil.copy2(src / "1" / "copy-a.png", src / "1" / "zz-more-a.png")
    new = sorted((extra / "0").iterdir())[11]
    shutil.copy2(new, src / "2" / "c-new.png")
    shutil.copy2(new, src / "1" / "c-new.png")
    second, counts = _extract(tmp_path, params, "second", caplog)
    assert "Traceback" not in caplog.text and "cannot be read" not in caplog.text
    assert counts == (36, 6 + 2)  # every copy of A and B from the store; the new images and both copies of C run
    groups = _copies_apart(_index(tmp_path / "second-prepared"))
    _same_features_per_content(second, groups)
    assert sha256_file(second) == sha256_file(_fresh(tmp_path, src, "second", caplog))
    third, counts = _extract(tmp_path, params, "third", caplog)  # and again: everything from the store
    assert counts == (44, 0) and sha256_file(third) == sha256_file(second)


@pytest.mark.slow
def test_duplicate_images_resume_after_an_interruption(tmp_path, grown, monkeypatch, caplog):
    """A grown folder with copies, interrupted after its checkpoints were written: the rerun resumes, reads the
    checkpoints it lost from the store (copies asking for the same row in one read) and writes the from-scratch
    bytes."""
    from pipeline.core.features import extraction as ex

    caplog.set_level(logging.INFO, logger="pipeline")
    src, extra = grown
    params = _params(tmp_path, _with_copies(src), checkpoint_rows=16)
    _extract(tmp_path, params, "first", caplog)
    _grow(src, extra)

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ex, "assemble", die)
        _extract(tmp_path, params, "second", caplog)
    partial = tmp_path / "out" / "second.h5.partial"
    checkpoints = sorted(partial.glob("rows-*.h5"))
    assert len(checkpoints) == 3
    checkpoints[1].unlink()  # rows 16-31: four copies of A and both of B
    second, counts = _extract(tmp_path, params, "second", caplog)
    assert "resuming from" in caplog.text and counts == (16, 0)
    _same_features_per_content(second, _copies_apart(_index(tmp_path / "second-prepared")))
    assert sha256_file(second) == sha256_file(_fresh(tmp_path, src, "second", caplog))


# --- failures inside the store --------------------------------------------------------------------------------------


def _fail_on_shards(monkeypatch, cls, method: str, when, exc: Exception) -> list[str]:
    """Makes h5py's `cls.method` raise `exc` on the store's shards when `when(self, *args)` holds; the files hit."""
    real = getattr(cls, method)
    hit: list[str] = []

    def failing(self, *args, **kwargs):
        if "shard-" in Path(self.file.filename).name and when(self, *args):
            hit.append(self.file.filename)
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, failing)
    return hit


@pytest.mark.parametrize("exc", [TypeError("Indexing elements must be in increasing order"),
                                 RuntimeError("Can't read data (inflate() failed)")])
def test_an_error_inside_h5py_reading_the_store_is_one_line_and_the_rows_are_recomputed(tmp_path, grown, caplog,
                                                                                          monkeypatch, exc):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, _ = grown
    params = _params(tmp_path, src)
    first, _ = _extract(tmp_path, params, "first", caplog)
    hit = _fail_on_shards(monkeypatch, h5py.Dataset, "__getitem__", lambda ds, *a: ds.name == "/max", exc)
    again, counts = _extract(tmp_path, params, "again", caplog)
    assert hit and counts == (0, 30)  # no row could be read: all recomputed
    assert sha256_file(again) == sha256_file(first)
    lines = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(lines) == 4 and all("\n" not in line for line in lines)  # one per shard
    assert f"feature store: {hit[0]} cannot be read ({type(exc).__name__}: {exc}); recomputing its 8 rows" in lines


def test_an_error_writing_the_store_leaves_the_output_unchanged(tmp_path, grown, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, _ = grown
    hit = _fail_on_shards(monkeypatch, h5py.Group, "create_dataset", lambda g, name, *a: name == "digest",
                          OSError("Unable to synchronously create dataset (file write failed)"))
    out, counts = _extract(tmp_path, _params(tmp_path, src), "first", caplog)
    assert len(hit) == 1 and counts == (0, 30)  # the first shard failed; the run added nothing more to the store
    assert "this run adds no more rows to the store (the features file is not affected)" in caplog.text
    assert not list((tmp_path / "feature_store").glob("*/shard-*.h5"))
    assert sha256_file(out) == sha256_file(_fresh(tmp_path, src, "first", caplog))


@pytest.mark.slow
def test_bench_extract_with_its_cycled_larger_n_runs(tmp_path):
    """bench/extract.py times the pipeline on N rows and again on a larger N that cycles the files (the same images
    on many rows); the second run stopped in the store's read. Each timed run now sends every row through the
    backbone (no store), and its index carries the files' real content hashes."""
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "bench" / "extract.py"), "--generate", "6", "--size", "64x48",
                           "--n", "6", "--rss-n", "15", "--image-size", "32", "--batch-size", "4", "--workers", "0",
                           "--threads", "1", "--device", "cpu", "--workdir", str(tmp_path / "work")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| pipeline, larger N (peak RSS check, decode pil) | 15 |" in proc.stdout
    assert "pipeline parts alone: input path " in proc.stdout  # the parts' model timing unpacked two feature sets
    assert not (tmp_path / "work" / "feature_store").exists()
    import csv

    with open(tmp_path / "work" / "index-15" / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({r["sha256"] for r in rows}) == 6 and all(len(r["sha256"]) == 64 for r in rows)


def _stage_env(tmp: Path) -> dict[str, str]:
    import os

    from conftest import REPO

    return {**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp / "runs"), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_duplicate_images_under_torchrun_read_the_store_on_every_rank(tmp_path, grown, caplog):
    """Two ranks, each reading its checkpoints' stored rows (copies of A and B among them) from one store: the file is
    the from-scratch one."""
    import subprocess
    import sys

    caplog.set_level(logging.INFO, logger="pipeline")
    src, extra = grown
    params = _params(tmp_path, _with_copies(src), checkpoint_rows=16)
    _extract(tmp_path, params, "first", caplog)
    _grow(src, extra)
    prepare.main(["--params", str(params), "--out", str(tmp_path / "second-prepared")])
    out = tmp_path / "out" / "second.h5"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "pipeline.extract", "--params", str(params), "--index", str(tmp_path / "second-prepared"),
                           "--out", str(out)], cwd=tmp_path, env=_stage_env(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    per_rank = re.findall(r"(\d+) rows reused from the feature store .*, (\d+) run through the backbone \(rank \d\)",
                          proc.stderr)
    assert per_rank and int(per_rank[0][0]) > 0  # rank 0's share came from the store (the other rank logs warnings only)
    _same_features_per_content(out, _copies_apart(_index(tmp_path / "second-prepared")))
    assert sha256_file(out) == sha256_file(_fresh(tmp_path, src, "second", caplog))


@pytest.mark.slow
def test_two_clones_share_one_store_through_dvc_repro_at_once(tmp_path):
    """Two clones, one `extract.store` path, `dvc repro extract` in both at the same time, first on a folder with
    copies of images and then after it grew: both runs succeed and write the from-scratch file."""
    import subprocess
    import sys

    from conftest import dvc, dvc_env, make_dvc_repo

    store = tmp_path / "shared_store"
    images = _with_copies(write_digit_folder(tmp_path / "images", classes=3, per_class=10))
    extra = write_digit_folder(tmp_path / "extra", classes=3, per_class=12)
    clones = [make_dvc_repo(tmp_path / name, **{**TINY, "data": {**TINY["data"], "source": str(images)},
                                                 "extract": {**TINY["extract"], "checkpoint_rows": 16,
                                                             "store": str(store)}})
              for name in ("one", "two")]

    def repro_both() -> list[str]:
        procs = [subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", "extract"], cwd=c,
                                  env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in clones]
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (o, e) in zip(procs, outs):
            assert p.returncode == 0, e[-3000:]
        return [e for _, e in outs]

    repro_both()
    first = {sha256_file(c / "data" / "features.h5") for c in clones}
    assert len(first) == 1
    for c in range(3):
        for f in sorted((extra / str(c)).iterdir())[10:]:
            shutil.copy2(f, images / str(c) / f"new-{f.name}")
    logs = repro_both()
    assert all("6 run through the backbone" in e or "rows reused" in e for e in logs)
    grown = {sha256_file(c / "data" / "features.h5") for c in clones}
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    params = write_params(fresh / "params.yaml", **{**TINY, "data": {**TINY["data"], "source": str(images)},
                                                     "extract": {**TINY["extract"], "store": None}})
    prepare.main(["--params", str(params), "--out", str(fresh / "prepared")])
    extract.main(["--params", str(params), "--index", str(fresh / "prepared"), "--out", str(fresh / "f.h5")])
    assert grown == {sha256_file(fresh / "f.h5")}
    dvc(clones[0], "status")
