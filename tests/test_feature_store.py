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


def test_grown_and_shrunk_folders_reuse_rows_and_give_the_from_scratch_bytes(tmp_path, grown, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, extra = grown
    params = _params(tmp_path, src)
    first, counts = _extract(tmp_path, params, "first", caplog)
    assert counts == (0, 30)  # an empty store: every image through the backbone
    store = tmp_path / "out" / "feature_store"
    assert len(list(store.glob("*/shard-*.h5"))) >= 1
    for c in range(3):  # grow: two more images per class (the 11th and 12th digit of each class)
        for f in sorted((extra / str(c)).iterdir())[10:]:
            shutil.copy2(f, src / str(c) / f"new-{f.name}")
    second, counts = _extract(tmp_path, params, "second", caplog)
    assert counts == (30, 6)  # only the 6 new images ran
    assert sha256_file(second) == sha256_file(_fresh(tmp_path, src, "second", caplog))
    for c in range(3):  # shrink: remove 3 images in all
        sorted((src / str(c)).iterdir())[0].unlink()
    third, counts = _extract(tmp_path, params, "third", caplog)
    assert counts == (33, 0)  # no backbone at all
    assert sha256_file(third) == sha256_file(_fresh(tmp_path, src, "third", caplog))


def test_damaged_truncated_or_foreign_store_is_reported_and_not_trusted(tmp_path, grown, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, _ = grown
    params = _params(tmp_path, src, batch_size=8)
    first, _ = _extract(tmp_path, params, "first", caplog)
    expected = sha256_file(first)
    shards = sorted((tmp_path / "out" / "feature_store").glob("*/shard-*.h5"), key=lambda p: p.stat().st_mtime_ns)
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


def test_store_null_and_other_settings_use_no_store(tmp_path, grown, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    src, _ = grown
    _extract(tmp_path, _params(tmp_path, src), "first", caplog)
    _, counts = _extract(tmp_path, _params(tmp_path, src, dtype="float16"), "half", caplog)
    assert counts == (0, 30)  # float16 rows are another fingerprint: nothing reused
    assert len(list((tmp_path / "out" / "feature_store").iterdir())) == 2
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
