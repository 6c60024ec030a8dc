"""The wheels a lent GPU machine needs to run the real pipeline (`dvc repro`, then `pipeline.verify`) on its own torch.

Why: the lent GPU machines (the device tool's nvidia-h100-x1 / nvidia-h200) have their own Python 3.12 with a CUDA
torch and many packages, but no package registry, and one call carries at most 64 MiB of files, the tracked tree
included. The lock's torch alone is GBs, so the image's torch and torchvision are used as they are; everything else
the stages import, and `dvc` itself, must be there. This tool works out which of those the image lacks and downloads
exactly those wheels, at the versions of requirements.lock, for the image's Python (CPython 3.12, manylinux x86-64),
into an ignored folder that the device call carries (`carry: [".devsite/wheels"]`); bench/gpu_check.sh installs them
there with `pip install --no-index --no-deps --target /tmp/site` and puts /tmp/site on PYTHONPATH.

How the list is derived, so that it follows the lock and the code instead of a hand list:
- roots: the third-party imports of every dvc.yaml stage's module and of `pipeline.verify`, import closure included
  (tools/code_deps.py), mapped to their distributions; `dvc`, which runs them; the bundled weights package of
  params.yaml's backbone (imported by name in a string, pipeline/core/models/weights.py);
- closure: each carried distribution's Requires-Dist (extras it asks for included, optional extras of the roots not),
  as installed in this venv, which `make setup` syncs to the lock; markers evaluated for the target Python;
- a distribution the image already has (IMAGE_PACKAGES) is used there and not followed further: its own needs are the
  image's; except OVER_IMAGE (carried at the lock's version all the same, reasons given) and where the image's known
  version (IMAGE_VERSIONS) fails a carried package's requirement;
- IMAGE_BUILD (torch, torchvision, torchcodec and the CUDA wheels) are never carried.
Every carried distribution must be pinned in requirements.lock, one version each (two versions stop pip's install).

    python tools/gpu_wheels.py                    # download into .devsite/wheels and print sizes (`make gpu-wheels`)
    python tools/gpu_wheels.py --list             # the plan and why each package is carried; no network
    python tools/gpu_wheels.py --python-version 3.11 --dest /tmp/wh   # for a rehearsal on another Python
    python tools/gpu_wheels.py --image-pins       # lock pins of what the plan takes from the image (rehearsal venv)
    python tools/gpu_wheels.py --check-installed /tmp/site    # on the GPU machine: carried needs the image fails
"""
from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
DEST = REPO / ".devsite" / "wheels"
BUDGET_MIB = 40.0  # the call's 64 MiB also holds the tracked tree (~16 MB)

# The image's packages: /work/.library/device/KINDS.md, "Python packages already there", read on a machine running
# the image 'cuda' on 2026-11-17 (nvidia-h100-x1 and nvidia-h200 share it). Refresh from there when the image changes.
IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
# Versions seen there (KINDS.md, the nvidia-h200 'pip list' row, 2026-11; gpu_h200.md for scikit-learn and h5py).
IMAGE_VERSIONS = {"numpy": "2.5.2", "safetensors": "0.8.0", "torch": "2.11.0", "torchvision": "0.26.0",
                  "huggingface-hub": "1.33.0", "scikit-learn": "1.9.1", "h5py": "3.16.0"}
IMAGE_PYTHON = "3.12.3"

# The image's own CUDA build: never carried, never followed (the lock's torch and its CUDA wheels are GBs). torchcodec
# has no build for the image's torch 2.11; only the opt-in `extract.decode: torchcodec` route imports it.
IMAGE_BUILD = re.compile(r"^(torch|torchvision|torchcodec|triton|nvidia-(?!ml-py).*|cuda-.*)$")
# Carried at the lock's version although the image has the package.
OVER_IMAGE = {"timm": "the backbone's code: the committed results were made with the lock's timm, the features "
                      "record its version, and the image's is not recorded; pure Python"}
RUNNER = ("dvc",)  # runs the stages (`dvc repro`) and is imported by pipeline.verify (pipeline/infra/dvc_cache.py)
PLATFORMS = ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
             *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]  # pip matches N exactly; the image is glibc 2.39


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> dict[str, str]:
    """{normalised name: version} of a `name==version` lock."""
    pins = {}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("pipeline", "__future__")}


def stage_imports(root: Path = REPO) -> dict[str, set[str]]:
    """{top-level module: the files importing it} over the import closure of every dvc.yaml stage and of
    pipeline.verify (what bench/gpu_check.sh runs)."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    import code_deps

    modules = set(code_deps.stage_modules(root / "dvc.yaml").values()) | {"pipeline.verify"}
    found: dict[str, set[str]] = {}
    for module in sorted(modules):
        for rel in code_deps.closure_files(module, root):
            for name in _third_party_imports(root / rel):
                found.setdefault(name, set()).add(rel)
    return found


def bundled_weights(root: Path = REPO) -> list[str]:
    """The distribution holding the bundled weights of params.yaml's backbone (and of `sweep.backbones`), read
    from pipeline/core/models/weights.py's BUNDLED without importing it (that would import torch)."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    names = [params["backbone"]["name"], *((params.get("sweep") or {}).get("backbones") or [])]
    tree = ast.parse((root / "pipeline/core/models/weights.py").read_text())
    bundled = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "BUNDLED" for t in n.targets))
    return [canonical(bundled[n][0]) for n in names if n in bundled]


@dataclass
class Plan:
    carried: dict[str, str] = field(default_factory=dict)   # name -> lock version
    why: dict[str, str] = field(default_factory=dict)       # name -> who needs it
    from_image: dict[str, str] = field(default_factory=dict)  # name -> who needs it
    problems: list[str] = field(default_factory=list)


def _requires(dist_name: str, extras: set[str], env: dict[str, str]):
    from importlib import metadata

    from packaging.requirements import Requirement

    out = []
    for text in metadata.distribution(dist_name).requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ({""} | extras)):
            out.append(req)
    return out


def plan(lock_text: str | None = None, root: Path = REPO, python_version: str = IMAGE_PYTHON) -> Plan:
    """What to carry, from the lock, the stages' imports and the installed metadata; `problems` says what cannot
    be carried (a needed package the lock does not pin, or an import no distribution provides)."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.version import Version

    pins = lock_pins(LOCK.read_text() if lock_text is None else lock_text)
    env = {**default_environment(), "python_version": ".".join(python_version.split(".")[:2]),
           "python_full_version": python_version, "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64"}
    provides = metadata.packages_distributions()
    p = Plan()
    todo: list[tuple[str, set[str], str, object]] = []  # (name, extras, needed by, requirement)
    for module, files in sorted(stage_imports(root).items()):
        dists = provides.get(module)
        if not dists:
            p.problems.append(f"no installed distribution provides `{module}` (imported by {sorted(files)[0]})")
            continue
        todo += [(canonical(d), set(), f"imports `{module}` ({sorted(files)[0]})", None) for d in dists]
    todo += [(name, set(), "runs the stages (`dvc repro`)", None) for name in RUNNER]
    todo += [(name, set(), "the bundled weights of params.yaml's backbone", None) for name in bundled_weights(root)]
    done: dict[str, set[str]] = {}
    while todo:
        name, extras, needed_by, req = todo.pop(0)
        if IMAGE_BUILD.match(name):
            p.from_image.setdefault(name, needed_by + " (the image's own build)")
            continue
        known = IMAGE_VERSIONS.get(name)
        clash = req is not None and known is not None and Version(known) not in req.specifier
        if name in IMAGE_PACKAGES and name not in OVER_IMAGE and not clash:
            p.from_image.setdefault(name, needed_by)
            continue
        if name in done and extras <= done[name]:
            continue
        if name not in pins:
            p.problems.append(f"{name} is needed ({needed_by}) but requirements.lock does not pin it")
            continue
        p.carried[name] = pins[name]
        reason = OVER_IMAGE.get(name) or (f"the image's {known} fails {req}" if clash else None)
        p.why.setdefault(name, needed_by + (f"; {reason}" if reason else ""))
        done[name] = done.get(name, set()) | extras
        try:
            reqs = _requires(name, extras, env)
        except metadata.PackageNotFoundError:
            p.problems.append(f"{name} is not installed here, so its needs are unknown (run `make setup`)")
            continue
        installed = metadata.version(name)
        if canonical(installed) != canonical(pins[name]) and installed != pins[name]:
            p.problems.append(f"{name}: {installed} installed here but the lock pins {pins[name]} (run `make setup`)")
        todo += [(canonical(r.name), set(r.extras), name, r) for r in reqs]
    p.from_image = {k: v for k, v in p.from_image.items() if k not in p.carried}
    return p


def wheel_name_version(filename: str) -> tuple[str, str]:
    parts = filename[:-len(".whl")].split("-")
    return canonical(parts[0]), parts[1]


def _pure(filename: str) -> bool:
    return filename.endswith("-none-any.whl")


def download(p: Plan, dest: Path, python_version: str) -> list[Path]:
    """The plan's wheels in `dest`, one file each: kept when already there at the right version, others removed.
    Distributions published as source only (antlr4-python3-runtime 4.9.3) are built here, and kept only when the
    result is pure Python."""
    dest.mkdir(parents=True, exist_ok=True)
    have = {wheel_name_version(f.name): f for f in dest.glob("*.whl")}
    for (name, version), f in have.items():
        if p.carried.get(name) != version and canonical(p.carried.get(name, "")) != canonical(version):
            f.unlink()
    have = {wheel_name_version(f.name)[0] for f in dest.glob("*.whl")}
    wanted = [f"{n}=={v}" for n, v in sorted(p.carried.items()) if n not in have]
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    base += [a for plat in PLATFORMS for a in ("--platform", plat)]
    if wanted and subprocess.run(base + wanted, capture_output=True).returncode != 0:
        for spec in wanted:  # one at a time, to find the ones with no binary wheel
            if subprocess.run(base + [spec], capture_output=True).returncode == 0:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary",
                                        ":all:", "-w", tmp, spec], capture_output=True, text=True)
                if built.returncode != 0:
                    raise SystemExit(f"gpu_wheels: {spec}: no wheel to download, and building one failed:\n"
                                     + built.stderr[-2000:])
                built = list(Path(tmp).glob("*.whl"))
                if len(built) != 1 or not _pure(built[0].name):
                    raise SystemExit(f"gpu_wheels: {spec} has no wheel for CPython {python_version} manylinux "
                                     f"x86-64 and does not build as pure Python: {[b.name for b in built]}")
                shutil.move(str(built[0]), dest / built[0].name)
    files = sorted(dest.glob("*.whl"))
    got = {wheel_name_version(f.name)[0] for f in files}
    if got != set(p.carried):
        raise SystemExit(f"gpu_wheels: {dest} has {sorted(got ^ set(p.carried))} extra or missing")
    return files


def travelling_tree_bytes(root: Path = REPO) -> int | None:
    """Bytes of what a device call sends besides the carried wheels: tracked files and untracked ones git does not
    ignore (/work/.library/device/README.md); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = [root / p.decode() for p in out.split(b"\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def unmet_needs(site: Path) -> list[str]:
    """Requirements of the distributions installed in `site` (pip --target) that what is importable now fails:
    the image's version of a package outside the plan (IMAGE_VERSIONS holds only the versions known here)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for info in sorted(site.glob("*.dist-info")):
        dist = metadata.Distribution.at(info)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{dist.metadata['Name']} needs {req}: {have} here")
    return unmet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/gpu_wheels.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=DEST, help="wheel folder (default: %(default)s)")
    parser.add_argument("--python-version", default=IMAGE_PYTHON, help="target CPython (default: %(default)s)")
    parser.add_argument("--budget-mib", type=float, default=BUDGET_MIB,
                        help="exit 1 when the wheels exceed this (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the plan only (no network)")
    mode.add_argument("--image-pins", action="store_true",
                      help="print the lock's pins of the packages the plan takes from the image (not torch's build)")
    mode.add_argument("--check-installed", type=Path, metavar="SITE",
                      help="print the carried packages' needs that this Python fails; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check_installed:
        unmet = unmet_needs(args.check_installed)
        print("\n".join(unmet) if unmet else f"all needs of the packages in {args.check_installed} are met")
        return 1 if unmet else 0
    p = plan(python_version=args.python_version)
    if p.problems:
        print("gpu_wheels: cannot make the list:", *p.problems, sep="\n  ")
        return 1
    if args.image_pins:
        pins = lock_pins(LOCK.read_text())
        print("\n".join(f"{n}=={pins[n]}" for n in sorted(p.from_image) if n in pins and not IMAGE_BUILD.match(n)))
        return 0
    if args.list:
        for name, version in sorted(p.carried.items()):
            print(f"{name}=={version}  # {p.why[name]}")
        print(f"# from the image: {', '.join(sorted(p.from_image))}")
        return 0
    files = download(p, args.dest, args.python_version)
    total = sum(f.stat().st_size for f in files)
    for f in files:
        print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
    print(f"{len(files)} wheels, {total / 2**20:.1f} MiB in {args.dest} (budget {args.budget_mib:g} MiB); "
          f"from the image: {len(p.from_image)} packages")
    tree = travelling_tree_bytes()
    if tree is not None:
        print(f"with the working tree that travels too ({tree / 2**20:.1f} MiB): {(tree + total) / 2**20:.1f} MiB "
              f"of a device call's 64 MiB")
    return 1 if total > args.budget_mib * 2**20 else 0


if __name__ == "__main__":
    sys.exit(main())
