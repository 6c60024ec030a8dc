"""`prepare` on messy real folders: every unusable file is listed with its reason (never dropped silently), every odd
but valid image is indexed and loads, and class layouts a classifier cannot use stop the stage with one clear line.

All images derive from real files: hymenoptera photos (when present) and scikit-learn's digit scans."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HYMENOPTERA, REPO, write_digit_folder, write_params
from PIL import Image

from pipeline import prepare
from pipeline.core.data.images import ImageDataset, eval_transform
from pipeline.core.data.index import DataSourceError
from pipeline.core.data.preprocess import Preprocess

PRE = Preprocess(size=32, resize=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


def _photo(tmp_path: Path, size: tuple[int, int]) -> Image.Image:
    """A real photo (hymenoptera), or a real digit scan when the photos are absent, as RGB of `size`."""
    src = HYMENOPTERA / "train" / "bees" / "16838648_415acd9e3f.jpg"
    if not src.is_file():
        src = next((write_digit_folder(tmp_path / "photo_src", classes=1, per_class=1) / "0").iterdir())
    with Image.open(src) as im:
        return im.convert("RGB").resize(size, Image.BILINEAR)


def _run(tmp_path: Path, source: Path, **data) -> tuple[Path, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = write_params(tmp_path / "params.yaml", data={"source": str(source), **data})
    out = tmp_path / "prepared"
    prepare.main(["--params", str(params), "--out", str(out)])
    return out, json.loads((out / "classes.json").read_text())


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _build_messy(tmp_path: Path) -> Path:
    """Digits 0-2 (10 each) plus every kind of trouble a real folder holds."""
    root = write_digit_folder(tmp_path / "messy", classes=3, per_class=10)
    photo = _photo(tmp_path, (48, 32))
    jpg, png = io.BytesIO(), io.BytesIO()
    photo.save(jpg, "JPEG")
    photo.save(png, "PNG")
    corrupt = bytearray(jpg.getvalue())
    corrupt[2:40] = b"\xAA" * 38
    bad = {"truncated.jpg": jpg.getvalue()[: len(jpg.getvalue()) // 2],
           "truncated.png": png.getvalue()[: len(png.getvalue()) // 2], "corrupt.jpg": bytes(corrupt),
           "empty.png": b"", "text.jpg": b"a text file with an image extension\n",
           "notes.txt": b"a text file in a class folder\n", ".DS_Store": b"\x00\x00\x00\x01Bud1"}
    for name, data in bad.items():
        (root / "0" / name).write_bytes(data)
    (root / "0" / ".ipynb_checkpoints").mkdir()
    shutil.copy2(root / "0" / "0000.png", root / "0" / ".ipynb_checkpoints" / "0000-checkpoint.png")

    c1 = root / "1"
    photo.save(c1 / "anim.gif", save_all=True, append_images=[Image.eval(photo, lambda v: 255 - v)])
    photo.convert("P", palette=Image.ADAPTIVE).save(c1 / "palette.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(c1 / "alpha.png")
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(c1 / "gray16.png")
    photo.convert("L").save(c1 / "gray.jpg")
    photo.convert("CMYK").save(c1 / "cmyk.jpg")
    exif = Image.Exif()
    exif[274] = 6
    photo.save(c1 / "rotated.jpg", exif=exif.tobytes())
    Image.new("L", (1, 1), 200).save(c1 / "tiny.png")
    _photo(tmp_path, (96, 96)).save(c1 / "huge.png")  # 9,216 pixels: over the test's limit of 5,000
    nested = c1 / "sub folder" / "nested ñ"
    nested.mkdir(parents=True)
    photo.rotate(90).save(nested / "été photo 1.png")

    c2 = root / "2"
    outside = write_digit_folder(tmp_path / "elsewhere", classes=3, per_class=1)
    os.symlink(next((outside / "2").iterdir()), c2 / "link.png")
    os.symlink(tmp_path / "no-such-file.png", c2 / "broken.png")
    os.symlink("..", c2 / "up")  # a link loop back to the root
    os.symlink(".", c2 / "self")
    with open(os.fsencode(c2) + b"/latin1 \xe9t\xe9.png", "wb") as f:  # a name that is not UTF-8 (old Windows zips)
        f.write(png.getvalue())

    unicode_cls = root / "ünï cls"
    unicode_cls.mkdir()
    more = write_digit_folder(tmp_path / "more", classes=4, per_class=8)
    for f in sorted((more / "3").iterdir()):
        shutil.copy2(f, unicode_cls / f"ça {f.name}")
    (root / "empty_class").mkdir()
    (root / "README.txt").write_text("not in a class folder\n")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(png.getvalue())
    return root


def test_messy_folder(tmp_path, caplog):
    root = _build_messy(tmp_path)
    out, meta = _run(tmp_path, root, max_image_pixels=5000)
    skipped = {r["path"]: r["reason"] for r in _csv(out / "skipped.csv")}
    expected = {"0/truncated.jpg": "truncated", "0/truncated.png": "truncated", "0/corrupt.jpg": "not in any image",
                "0/empty.png": "empty file", "0/text.jpg": "not in any image", "0/notes.txt": "not an image file",
                "0/.DS_Store": "hidden file", "0/.ipynb_checkpoints/": "hidden folder",
                "1/huge.png": "over data.max_image_pixels = 5,000", "2/broken.png": "broken symlink",
                "2/link.png": "symlinked file leads outside data.source", "2/up/": "loops back", "2/self/": "loops back", "README.txt": "not in a class folder",
                "2/latin1 \\udce9t\\udce9.png": "not valid utf-8",
                ".cache/": "hidden folder"}
    assert set(skipped) == set(expected), skipped
    for path, reason in expected.items():
        assert reason in skipped[path].lower(), (path, skipped[path])
    assert meta["skipped"] == len(expected)

    rows = _csv(out / "index.csv")
    paths = {r["path"] for r in rows}
    odd = {"1/anim.gif", "1/palette.png", "1/alpha.png", "1/gray16.png", "1/gray.jpg", "1/cmyk.jpg",
           "1/rotated.jpg", "1/tiny.png", "1/sub folder/nested ñ/été photo 1.png"}
    assert odd <= paths and "2/link.png" not in paths
    assert meta["classes"] == ["0", "1", "2", "ünï cls"]
    assert len(rows) == 10 + 19 + 11 + 8 - 1  # digits + odd images + link + the non-ASCII class, less the file
    # link that leads outside the root (data.follow_links: inside)
    assert any("empty_class" in w for w in meta["warnings"])
    log_text = caplog.text
    assert f"{len(expected)} files skipped" in log_text
    assert "13 files cannot be used and were skipped" in log_text and "0/corrupt.jpg (" in log_text
    assert "class folders with no usable images, left out: empty_class" in log_text

    # every indexed file loads through the dataset extraction and fine-tuning use, from the index's own paths
    dataset = ImageDataset(meta["source"], rows, eval_transform(PRE))
    assert all(dataset[i][0].shape == (3, 32, 32) for i in range(len(rows)))
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries

    with pytest.raises(DataSourceError, match=r"13 files .* data.on_bad_file is 'error'.*0/corrupt.jpg"):
        _run(tmp_path / "strict", root, max_image_pixels=5000, on_bad_file="error")


def test_hidden_files_alone_never_fail_strict_mode(tmp_path):
    root = write_digit_folder(tmp_path / "d", classes=2, per_class=6)
    (root / "0" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    out, meta = _run(tmp_path, root, on_bad_file="error")
    assert meta["skipped"] == 1 and _csv(out / "skipped.csv")[0]["reason"] == "hidden file"


def _split_tree(tmp_path: Path, train: list[int], val: list[int], val_name: str = "val") -> Path:
    """train/ (5 digits per class) and a val folder named `val_name` (3 others per class) of real digit scans."""
    digits = write_digit_folder(tmp_path / "src", classes=max(train + val) + 1, per_class=8)
    root = tmp_path / "split"
    for split, classes, files in (("train", train, slice(0, 5)), (val_name, val, slice(5, 8))):
        for c in classes:
            (root / split / str(c)).mkdir(parents=True)
            for f in sorted((digits / str(c)).iterdir())[files]:
                shutil.copy2(f, root / split / str(c) / f.name)
    return root


def test_class_absent_from_val_is_a_warning(tmp_path, caplog):
    root = _split_tree(tmp_path, train=[0, 1, 2], val=[0, 1])
    _, meta = _run(tmp_path, root)
    assert meta["classes"] == ["0", "1", "2"] and meta["counts"]["val"]["2"] == 0
    assert "classes absent from val (their val accuracy is not measured): 2" in caplog.text
    assert any("absent from val" in w for w in meta["warnings"])


def test_class_absent_from_train_is_an_error(tmp_path):
    root = _split_tree(tmp_path, train=[0, 1], val=[0, 1, 2])
    with pytest.raises(DataSourceError, match=r"classes \['2'\] have images in val/test but none in train"):
        _run(tmp_path, root)


def test_single_class_is_an_error(tmp_path):
    root = write_digit_folder(tmp_path / "one", classes=1, per_class=10)
    (root / "empty").mkdir()  # an empty second folder is no second class
    with pytest.raises(DataSourceError, match="only '0'.*a classifier needs at least 2 classes"):
        _run(tmp_path, root)


def test_duplicates_across_splits_warn_with_count(tmp_path, caplog):
    root = _split_tree(tmp_path, train=[0, 1], val=[0, 1])
    train0 = sorted((root / "train" / "0").iterdir())
    shutil.copy2(train0[0], root / "val" / "0" / "copy a.png")
    shutil.copy2(train0[1], root / "val" / "0" / "copy b.png")
    shutil.copy2(train0[2], root / "val" / "1" / "copy c.png")  # same bytes, other class
    shutil.copy2(train0[3], root / "train" / "0" / "again.png")  # within train: no leakage
    out, meta = _run(tmp_path, root)
    log_text = caplog.text
    assert meta["duplicates"] == {"across_splits": 3, "within_split": 1, "label_conflicts": 1}
    assert "possible leakage: 3 val/test images are byte-identical to images in an earlier split" in log_text
    assert "1 groups of byte-identical images carry different classes" in log_text
    dups = _csv(out / "duplicates.csv")
    assert len(dups) == 8 and {d["path"] for d in dups} >= {"val/0/copy a.png", "val/1/copy c.png"}


# --- split folders as users name them ----------------------------------------------------------------------------

@pytest.mark.parametrize("val_name", ["valid", "validation"])
def test_valid_and_validation_folders_are_the_val_split(tmp_path, val_name):
    """fastai / Kaggle (valid/) and Keras (validation/) layouts: the folder is read as val; paths keep its name."""
    root = _split_tree(tmp_path, train=[0, 1], val=[0, 1], val_name=val_name)
    out, meta = _run(tmp_path, root)
    rows = _csv(out / "index.csv")
    val = [r for r in rows if r["split"] == "val"]
    assert meta["counts"] == {"train": {"0": 5, "1": 5}, "val": {"0": 3, "1": 3}}
    assert len(val) == 6 and all(r["path"].startswith(f"{val_name}/") for r in val)
    assert meta["skipped"] == 0


def test_two_val_folders_are_an_error_naming_both(tmp_path):
    root = _split_tree(tmp_path, train=[0, 1], val=[0, 1])
    shutil.copytree(root / "val", root / "valid")
    with pytest.raises(DataSourceError, match=r"has both val/ and valid/: both would be the val split; keep one"):
        _run(tmp_path, root)
    assert not (tmp_path / "prepared").exists()


def test_split_folders_without_val_name_the_folders_and_the_accepted_names(tmp_path):
    """With split folders the fractions do not apply, so the message must not send the user to data.val_fraction."""
    root = _split_tree(tmp_path, train=[0, 1], val=[0, 1], val_name="test")
    with pytest.raises(DataSourceError, match=r"no val images: data.source '.*' has split folders \(train/, test/\) "
                                              r"but no val folder; add one named any of val/, valid/, validation/ "
                                              r"\(with split folders, data.val_fraction is not used\)"):
        _run(tmp_path, root)


def test_no_val_without_split_folders_names_the_fraction(tmp_path):
    root = write_digit_folder(tmp_path / "few", classes=2, per_class=2)  # round(0.2 x 2) = 0 val images per class
    with pytest.raises(DataSourceError, match=r"no val images: data.val_fraction = 0.2 .*raise data.val_fraction"):
        _run(tmp_path, root)


def test_valid_without_train_is_a_class_folder(tmp_path):
    """A `valid` vs `invalid` classifier: without train/ beside it, valid/ is a class, not a split."""
    root = tmp_path / "docs"
    digits = write_digit_folder(tmp_path / "src", classes=2, per_class=10)
    shutil.copytree(digits / "0", root / "valid")
    shutil.copytree(digits / "1", root / "invalid")
    _, meta = _run(tmp_path, root)
    assert meta["classes"] == ["invalid", "valid"] and sum(meta["counts"]["val"].values()) == 4


# --- image sizes for backbone.image_size: auto --------------------------------------------------------------------

def test_classes_json_records_the_train_images_sizes(tmp_path):
    """Median, min and max of the short and long sides of the train split only (as loaded: EXIF rotation applied)."""
    root = _split_tree(tmp_path, train=[0, 1], val=[0, 1])
    _photo(tmp_path, (60, 40)).save(root / "val" / "0" / "big.png")  # val: not counted
    exif = Image.Exif()
    exif[274] = 6  # stored 48 wide x 32 high, shown rotated: 32 x 48; either way short 32, long 48
    _photo(tmp_path, (48, 32)).save(root / "train" / "1" / "rotated.jpg", exif=exif.tobytes())
    _, meta = _run(tmp_path, root)
    assert meta["image_sizes"] == {"split": "train", "images": 11,
                                   "short_side": {"min": 8, "median": 8.0, "max": 32},
                                   "long_side": {"min": 8, "median": 8.0, "max": 48}}


@pytest.mark.parametrize("kind", ["missing", "file", "no_class_folders", "empty"])
def test_bad_source_is_one_clear_error(tmp_path, kind):
    if kind == "missing":
        source, expected = tmp_path / "nowhere", "does not exist"
    elif kind == "file":
        source, expected = tmp_path / "a.png", "is a file"
        Image.new("L", (8, 8)).save(source)
    elif kind == "no_class_folders":
        source, expected = tmp_path / "flat", "its 3 image files lie directly in it"
        source.mkdir()
        for i in range(3):
            Image.new("L", (8, 8), i).save(source / f"{i}.png")
    else:
        source, expected = tmp_path / "empty", "it holds no folders"
        source.mkdir()
    with pytest.raises(DataSourceError, match=expected):
        _run(tmp_path, source)
    assert not (tmp_path / "prepared").exists()


def test_bad_source_from_the_command_line(tmp_path):
    params = write_params(tmp_path / "params.yaml", data={"source": str(tmp_path / "nowhere")})
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out",
                           str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"prepare: error: data.source '{tmp_path / 'nowhere'}' does not exist; point it at an "
                      "ImageFolder root (one subfolder per class, or train/ val/ [test/] folders of class subfolders)"]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_hymenoptera_as_it_is(hymenoptera, tmp_path):
    """The real set: its GIF and its .jpeg are indexed, nothing is skipped, the split folders are kept."""
    out, meta = _run(tmp_path, hymenoptera)
    rows = _csv(out / "index.csv")
    paths = {r["path"] for r in rows}
    assert len(rows) == 398 and meta["skipped"] == 0
    assert {"train/ants/imageNotFound.gif", "train/ants/formica.jpeg"} <= paths
    assert meta["counts"]["train"] == {"ants": 124, "bees": 121} and meta["counts"]["val"] == {"ants": 70, "bees": 83}
    assert meta["image_sizes"]["images"] == 245 and meta["image_sizes"]["short_side"]["median"] == 369.0


def test_extreme_aspect_ratio_is_skipped_from_the_header(tmp_path):
    """A 1 x 100,000 PNG (a few hundred bytes) passes the pixel guard, but the resize would scale its short side up
    (31 s and 6 GB at 96 px): it is skipped from its header, fast, with the reason; the limit is a param."""
    import time

    from PIL import Image

    from pipeline.core.data.images import BadImageError, load_rgb

    root = write_digit_folder(tmp_path / "digits", classes=2, per_class=6)
    strip = root / "0" / "strip.png"
    Image.new("L", (1, 100_000), 0).save(strip, optimize=True)
    assert strip.stat().st_size < 1000
    t0 = time.perf_counter()
    out, meta = _run(tmp_path / "a", root, val_fraction=0.25, test_fraction=0.25)
    assert time.perf_counter() - t0 < 20
    skipped = {r["path"]: r["reason"] for r in _csv(out / "skipped.csv")}
    assert skipped == {"0/strip.png": "extreme aspect ratio: 1x100000 is 100,000:1, over data.max_aspect_ratio = 20 "
                                      "(the resize would scale the short side up to a huge image); raise "
                                      "data.max_aspect_ratio to accept it"}
    assert meta["max_aspect_ratio"] == 20.0
    with pytest.raises(BadImageError, match="extreme aspect ratio"):  # predict and extract go through load_rgb too
        load_rgb(strip)
    wide = root / "1" / "wide.png"
    Image.new("L", (300, 20), 0).save(wide)  # 15:1 passes at the default
    out, _ = _run(tmp_path / "b", root, val_fraction=0.25, test_fraction=0.25, max_aspect_ratio=10.0)
    assert "1/wide.png" in {r["path"] for r in _csv(out / "skipped.csv")}


def _linked_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A digit folder whose class '0' holds a symlinked folder to images outside it, one to a sibling class inside
    the root, and one to /proc."""
    root = write_digit_folder(tmp_path / "digits", classes=2, per_class=6)
    foreign = write_digit_folder(tmp_path / "foreign", classes=1, per_class=4)
    os.symlink(foreign / "0", root / "0" / "outside")
    (root / "extra").mkdir()
    write_digit_folder(root / "extra", classes=1, per_class=2)
    os.symlink(root / "extra" / "0", root / "0" / "inside")
    os.symlink("/proc", root / "1" / "proc")
    return root, foreign


def test_symlinked_files_follow_the_same_policy(tmp_path):
    """A symlinked image file pointing outside data.source was read whatever the policy; now `inside` (default) and
    `none` list it in skipped.csv, `all` reads it, and a link into a system folder (/dev/zero) is never read."""
    root = write_digit_folder(tmp_path / "digits", classes=2, per_class=6)
    foreign = write_digit_folder(tmp_path / "foreign", classes=1, per_class=1)
    outside = next((foreign / "0").iterdir())
    os.symlink(outside, root / "0" / "outside.png")
    os.symlink(next((root / "1").iterdir()), root / "0" / "inside.png")
    os.symlink("/dev/zero", root / "1" / "zero.png")
    runs = {}
    for policy in ("inside", "all", "none"):
        out, _ = _run(tmp_path / policy, root, val_fraction=0.25, test_fraction=0.25, follow_links=policy)
        runs[policy] = ({r["path"] for r in _csv(out / "index.csv")},
                        {r["path"]: r["reason"] for r in _csv(out / "skipped.csv")})
    paths, skipped = runs["inside"]
    assert "0/outside.png" not in paths and "0/inside.png" in paths
    assert skipped["0/outside.png"].startswith(f"symlinked file leads outside data.source (to {outside}); not followed")
    assert skipped["1/zero.png"] == "symlinked file to /dev/zero in the system folder /dev; never read"
    paths, skipped = runs["all"]
    assert {"0/outside.png", "0/inside.png"} <= paths and "1/zero.png" in skipped
    paths, skipped = runs["none"]
    assert not {"0/outside.png", "0/inside.png"} & paths
    assert skipped["0/inside.png"] == "symlinked file; not followed (data.follow_links: none)"


def test_symlinked_folders_follow_the_policy_and_are_listed(tmp_path):
    """A link to a foreign folder used to put its images into the class, exit 0; /proc or / was walked."""
    root, foreign = _linked_tree(tmp_path)
    out, meta = _run(tmp_path / "a", root, val_fraction=0.25, test_fraction=0.25)
    skipped = {r["path"]: r["reason"] for r in _csv(out / "skipped.csv")}
    paths = {r["path"] for r in _csv(out / "index.csv")}
    assert skipped["0/outside/"].startswith(f"symlinked folder leads outside data.source (to {foreign / '0'}); not "
                                            "followed") and "data.follow_links: all" in skipped["0/outside/"]
    assert skipped["1/proc/"] == "symlinked folder to the system folder /proc; never scanned"
    assert not any(p.startswith("0/outside/") for p in paths)
    assert any(p.startswith("0/inside/") for p in paths)  # inside the root: DVC sees it, so it is followed

    out, _ = _run(tmp_path / "b", root, val_fraction=0.25, test_fraction=0.25, follow_links="all")
    paths = {r["path"] for r in _csv(out / "index.csv")}
    skipped = {r["path"]: r["reason"] for r in _csv(out / "skipped.csv")}
    assert sum(p.startswith("0/outside/") for p in paths) == 4 and "1/proc/" in skipped  # /proc: never

    out, _ = _run(tmp_path / "c", root, val_fraction=0.25, test_fraction=0.25, follow_links="none")
    skipped = {r["path"]: r["reason"] for r in _csv(out / "skipped.csv")}
    assert skipped["0/inside/"] == "symlinked folder; not followed (data.follow_links: none)"


@pytest.mark.parametrize("source", ["/", "/proc"])
def test_system_folder_as_source_is_refused_in_one_line(tmp_path, source):
    import subprocess
    import sys

    params = write_params(tmp_path / "params.yaml", data={"source": source})
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out",
                           str(tmp_path / "prepared")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PIPELINE_RUN_DIR": str(tmp_path / "runs")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"prepare: error: data.source '{source}' is the system folder {source}; it is never scanned" in proc.stderr


def test_scan_cache_rereads_only_new_or_modified_files(tmp_path, caplog):
    """Grow a folder: prepare decodes only the new files (size and mtime unchanged: not opened; a renamed copy:
    hashed but not decoded; a modified file: decoded again), and the index equals one made without the cache. A
    cache that cannot be read is reported in one line and ignored."""
    import re

    root = write_digit_folder(tmp_path / "digits", classes=2, per_class=10)
    more = write_digit_folder(tmp_path / "more", classes=3, per_class=12)

    def counts() -> tuple[int, int, int]:
        found = re.findall(r"prepare: (\d+) files unchanged since the last scan \(size, mtime, ctime, "
                           r"inode\), (\d+) with content seen before, (\d+) decoded", caplog.text)
        caplog.clear()
        return tuple(int(x) for x in found[-1])

    _run(tmp_path / "a", root, val_fraction=0.25, test_fraction=0.25)
    assert counts() == (0, 0, 20)
    for f in sorted((more / "0").iterdir())[10:]:  # two new images
        shutil.copy2(f, root / "0" / f"new-{f.name}")
    shutil.copy2(root / "1" / sorted(os.listdir(root / "1"))[0], root / "1" / "renamed-copy.png")
    changed = root / "0" / sorted(os.listdir(root / "0"))[0]
    shutil.copy2(more / "2" / sorted(os.listdir(more / "2"))[0], changed)  # other content, same name
    out, _ = _run(tmp_path / "a", root, val_fraction=0.25, test_fraction=0.25)
    assert counts() == (19, 1, 3)  # 19 untouched; the renamed copy; 2 new + the modified file decoded
    fresh, _ = _run(tmp_path / "b", root, val_fraction=0.25, test_fraction=0.25, scan_cache=None)
    assert (out / "index.csv").read_bytes() == (fresh / "index.csv").read_bytes()

    (tmp_path / "a" / "scan_cache.json").write_text("{not json")
    _run(tmp_path / "a", root, val_fraction=0.25, test_fraction=0.25)
    assert "scan cache " in caplog.text and "cannot be read (JSONDecodeError); ignored" in caplog.text
    unchanged, known, decoded = counts()
    assert unchanged == 0 and known + decoded == 23 and decoded >= 22  # (the copy may find its twin decoded)


@pytest.mark.parametrize("how", ["cp -p", "rsync -t", "touch -r"])
def test_scan_cache_sees_a_same_size_replacement_with_its_mtime_kept(tmp_path, how):
    """Another image of the same size put in place with the old modification time: `cp -p` (overwrites in place, same
    inode), `rsync -t` (a temporary renamed over it: new inode) and `touch -r` (written, then its mtime set back).
    Size and mtime match the cache, so its old content hash was reused; ctime and inode tell it apart."""
    import hashlib

    root = write_digit_folder(tmp_path / "digits", classes=2, per_class=10)
    target = root / "0" / sorted(os.listdir(root / "0"))[0]
    pixels = np.asarray(Image.open(target))
    Image.fromarray(pixels).save(target, compress_level=0)  # stored, not deflated: the size depends on the pixel count
    replacement = tmp_path / "replacement.png"
    Image.fromarray(255 - pixels).save(replacement, compress_level=0)
    assert replacement.stat().st_size == target.stat().st_size
    assert replacement.read_bytes() != target.read_bytes()
    out, _ = _run(tmp_path / "a", root, val_fraction=0.25, test_fraction=0.25)
    old = os.stat(target)
    time.sleep(0.05)
    if how == "cp -p":
        os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))  # as a backup made at the same moment
        subprocess.run(["cp", "-p", str(replacement), str(target)], check=True)
    elif how == "rsync -t":  # what rsync does: a temporary beside it, mtime set from the source, renamed into place
        tmp = target.with_name(f".{target.name}.XyZ123")
        shutil.copyfile(replacement, tmp)
        os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(tmp, target)
    else:
        reference = tmp_path / "reference"
        reference.touch()
        os.utime(reference, ns=(old.st_atime_ns, old.st_mtime_ns))
        shutil.copyfile(replacement, target)
        subprocess.run(["touch", "-r", str(reference), str(target)], check=True)
    new = os.stat(target)
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    out, _ = _run(tmp_path / "a", root, val_fraction=0.25, test_fraction=0.25)
    rows = {r["path"]: r["sha256"] for r in _csv(out / "index.csv")}
    assert rows[f"0/{target.name}"] == hashlib.sha256(replacement.read_bytes()).hexdigest()
