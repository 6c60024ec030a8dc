"""Benchmark (not a test): the textbook feature-extraction loop against the pipeline's extraction, same images.

Both loops run in fresh subprocesses, one after the other, on the same files with the same batch size, DataLoader
worker count and torch thread count; each reports its images per second and its peak resident memory (main process
and DataLoader workers). The pipeline also runs a second, larger N to show that its memory does not grow with N,
and its parts are timed alone (input path, input + device preprocessing, model) to say which one bounds it.

- textbook: torchvision ImageFolder + PIL transforms (Resize, CenterCrop, ToTensor, Normalize) + DataLoader +
  the network in NCHW fp32 under torch.no_grad + `Z = torch.cat((Z, feats))` accumulation, as in the tutorials;
- pipeline: `pipeline.extract.extract_features` writing the HDF5 file (checkpoints, assembly and rename included).

Model build time is excluded from both. A second table splits each pipeline run's whole wall time (model build
included): to the first batch, the steady rate after it, and after the last batch (the fixed cost, issue 27). Files are read once beforehand so both find them in the page cache.

`--decode` takes several values (`--decode pil,torchcodec,torchvision`): the textbook loop, then the pipeline once
per route, side by side in one table (the parts and the larger-N RSS check for the first value only).

`--compare-decoders` times the two JPEG decoders of the JPEG route side by side instead, through the very same
route (`decode: torchcodec` and `decode: torchvision`): TorchCodec's and torchvision.io.decode_jpeg (deprecated since
torchvision 0.29, yet the one that exists for every torch >= 2.4): the decoder alone, the route's per-image work, the
input path with its DataLoader workers, and the pipeline end to end; img/s of each and the ratio, and whether the two
features files are identical.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT = "BENCH_RESULT "
# The JPEG decoders --compare-decoders times through the JPEG route (`extract.decode` forcing each), TorchCodec last.
JPEG_DECODERS = {"torchvision": "torchvision.io.decode_jpeg (deprecated)", "torchcodec": "torchcodec.decoders.decode_jpeg"}
DECODES = ("pil", "jpeg", "torchcodec", "torchvision")
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
GPU_COMMAND = ("python bench/extract.py --generate 10000 --device cuda --precision bf16 --decode pil,jpeg "
               "--batch-size 256 --workers 15 --rss-n 40000")
GPU_DECODERS_COMMAND = ("python bench/extract.py --generate 10000 --device cuda --precision bf16 --batch-size 256 "
                        "--workers 15 --repeat 2 --compare-decoders")
EPILOG = f"""
examples:
  CPU (2 cores, 224 px, fp32):  python bench/extract.py --generate 256 --batch-size 32 --workers 2
  real photos:                  python bench/extract.py --images ../shared/data/hymenoptera_data
  GPU (H100/H200, bf16, nvjpeg): {GPU_COMMAND}
  decoders side by side (CPU):  python bench/extract.py --generate 256 --batch-size 16 --workers 2 --compare-decoders
  decoders side by side (GPU):  {GPU_DECODERS_COMMAND}

The GPU command generates 10,000 JPEGs of 500x375, times both loops on them with 15 workers and batch 256, times
the pipeline again on 40,000 rows (the same files cycled) for peak RSS, and times the parts alone.
"""


# ----------------------------------------------------------------------------------------------------------------
# Images


def _make_jpeg(args: tuple[Path, int, int, int]) -> int:
    """One photo-like JPEG: smooth colour field, a few shapes, sensor-like noise (compresses like a real photo)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    path, seed, width, height = args
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(field).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, size=(height, width, 3)).astype(np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def generate_images(root: Path, n: int, width: int, height: int, procs: int) -> Path:
    """Writes n JPEGs in two class folders (ImageFolder layout); reuses them when already there."""
    files = [root / f"class{i % 2}" / f"img_{i:06d}.jpg" for i in range(n)]
    if all(f.is_file() for f in files):
        return root
    for d in {f.parent for f in files}:
        d.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=procs) as pool:
        list(pool.map(_make_jpeg, [(f, i, width, height) for i, f in enumerate(files)], chunksize=32))
    return root


def image_list(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes and (path, class index) exactly as torchvision's ImageFolder lists them."""
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root))
    return ds.classes, [(str(Path(p).relative_to(root)), c) for p, c in ds.samples]


def cycled(samples: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    return [samples[i % len(samples)] for i in range(n)]


def write_index(folder: Path, root: Path, classes: list[str], samples: list[tuple[str, int]]) -> Path:
    """The two files `pipeline.prepare.read_index` reads, for exactly these samples (all in split 'train'), with
    each file's content hash as prepare writes it (a cycled list repeats files: the same hash on several rows)."""
    from pipeline.core.data.index import INDEX_FIELDS

    folder.mkdir(parents=True, exist_ok=True)
    digests = {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in {p for p, _ in samples}}
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(INDEX_FIELDS)
        for i, (path, c) in enumerate(samples):
            w.writerow((i, path, classes[c], c, "train", digests[path]))
    (folder / "classes.json").write_text(json.dumps({"classes": classes, "source": str(root)}))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Children (one measurement per fresh process)


def _peak_rss_mb() -> dict[str, float]:
    """Peak RSS of this process and of its largest finished child (a DataLoader worker), in MB (Linux: KB units)."""
    return {"rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_textbook(a: argparse.Namespace) -> dict:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from pipeline.core.models.backbone import build_backbone
    from pipeline.core.models.pooling import pool_avg_max
    from pipeline.infra.config import BackboneConfig

    device = torch.device(a.device)
    net, pre, _ = build_backbone(BackboneConfig(name=a.model, weights="bundled", image_size=a.image_size))
    model = net.to(device).eval()  # NCHW, fp32: the tutorial's model
    tf = transforms.Compose([
        transforms.Resize(pre.resize, interpolation=transforms.InterpolationMode(pre.interpolation)),
        transforms.CenterCrop(pre.size), transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    ds = datasets.ImageFolder(a.root, tf)
    ds.samples = cycled(ds.samples, a.n)  # the same rows the pipeline's index lists
    loader = DataLoader(ds, batch_size=a.batch_size, shuffle=False, num_workers=a.workers)
    t0 = time.perf_counter()
    Z = torch.empty((0, 2 * net.num_features), device=device)
    with torch.no_grad():
        for X, _ in loader:
            X = X.to(device)
            Z = torch.cat((Z, torch.cat(pool_avg_max(model(X)), dim=1)))
    Z = Z.cpu()
    seconds = time.perf_counter() - t0
    return {"rows": len(Z), "seconds": seconds, **_peak_rss_mb()}


def child_pipeline(a: argparse.Namespace) -> dict:
    from pipeline.core.features.extraction import extract_features
    from pipeline.infra.config import BackboneConfig, ExtractConfig

    out = Path(a.out)
    # store=None: a timed run must send every row through the backbone (the feature store would serve the repeated
    # runs, and the cycled rows of the larger N, from disk)
    summary = extract_features(Path(a.index), out, BackboneConfig(name=a.model, weights="bundled",
                                                                  image_size=a.image_size),
                               ExtractConfig(precision=a.precision, dtype="float32", decode=a.decode,
                                             batch_size=a.batch_size, workers=a.workers, device=a.device,
                                             store=None))
    size = out.stat().st_size
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    features = _features_sha256(out)
    out.unlink()
    split = {k: summary[k] for k in ("wall_s", "first_batch_s", "steady_s", "steady_rows", "steady_img_per_s",
                                     "after_last_batch_s")}
    return {"rows": summary["rows"], "seconds": summary["seconds"], "file_mb": size / 2**20, "sha256": digest,
            "features_sha256": features, **split, **_peak_rss_mb()}


def _features_sha256(path: Path) -> str:
    """SHA-256 of a features file's arrays alone (not its attributes, which name the decoder and its version)."""
    import h5py

    digest = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for split in sorted(f):
            for name in sorted(f[split]):
                digest.update(f[split][name][...].tobytes())
    return digest.hexdigest()


def child_parts(a: argparse.Namespace) -> dict:
    """The pipeline's parts alone: input path (workers), input + device preprocessing, model on ready tensors."""
    import torch

    from pipeline.infra.runtime import retained_heap

    with retained_heap(enabled=torch.device(a.device).type == "cpu"):  # as extract_features runs them
        return _parts(a)


def _parts(a: argparse.Namespace) -> dict:
    import torch

    from pipeline.core.data.index import read_index
    from pipeline.core.features.extraction import forward_pooled
    from pipeline.core.features.loader import DeviceInput, ExtractDataset, make_loader
    from pipeline.core.models.backbone import build_backbone
    from pipeline.infra.config import BackboneConfig
    from pipeline.infra.runtime import set_deterministic

    set_deterministic()
    device = torch.device(a.device)
    net, pre, _ = build_backbone(BackboneConfig(name=a.model, weights="bundled", image_size=a.image_size))
    net = net.to(device, memory_format=torch.channels_last).eval()
    rows, meta = read_index(Path(a.index))

    def loader():
        ds = ExtractDataset(meta["source"], [r["path"] for r in rows], [int(r["id"]) for r in rows], pre,
                            a.decode, defer_jpeg=device.type == "cuda", jpeg_decoder=jpeg_decoder)
        return make_loader(ds, a.batch_size, a.workers, device)

    jpeg_decoder = _jpeg_decoder(a.decode, device)

    out = {}
    t0 = time.perf_counter()
    for _ in loader():
        pass
    out["input_img_s"] = len(rows) / (time.perf_counter() - t0)
    to_input = DeviceInput(pre, device, jpeg_decoder)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in loader():
            x = to_input(batch)
        _sync(device)
    out["input_device_img_s"] = len(rows) / (time.perf_counter() - t0)
    x = torch.randn(a.batch_size, 3, pre.size, pre.size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernel selection, allocator
            forward_pooled(net, x, a.precision == "bf16")
        _sync(device)
        steps = max(3, len(rows) // a.batch_size)
        t0 = time.perf_counter()
        for _ in range(steps):
            feats = forward_pooled(net, x, a.precision == "bf16")  # the three feature sets, as extraction gets them
        feats["avg"].cpu()
        _sync(device)
    out["model_img_s"] = steps * a.batch_size / (time.perf_counter() - t0)
    return out


def _jpeg_decoder(decode: str, device) -> str | None:
    """The decoder the pipeline would use for `decode` on `device` (None for `pil`), as extraction chooses it."""
    from pipeline.core.features.jpeg_decoders import JPEG_ROUTES, choose_jpeg_decoder

    return choose_jpeg_decoder(decode, device) if decode in JPEG_ROUTES else None


def child_decode(a: argparse.Namespace) -> dict:
    """One JPEG decoder through the route: alone (full size), the route's per-image work, the input path."""
    import torch

    from pipeline.core.data.index import read_index
    from pipeline.core.features import loader
    from pipeline.core.models.backbone import build_backbone
    from pipeline.infra.config import BackboneConfig

    device = torch.device(a.device)
    _, pre, _ = build_backbone(BackboneConfig(name=a.model, weights="bundled", image_size=a.image_size))
    rows, meta = read_index(Path(a.index))
    paths = [str(Path(meta["source"]) / r["path"]) for r in rows]
    raw = []
    for p in paths:
        data = Path(p).read_bytes()
        stripped = loader.strip_app1(data) if loader.jpeg_orientation(data) is not None else None
        if stripped is None:
            raise SystemExit(f"bench: {p} does not take the JPEG route")
        raw.append(torch.frombuffer(stripped, dtype=torch.uint8))
    def best_rate(work, passes: int = 3) -> float:  # short loops: the best of a few passes, against load spikes
        seconds = []
        for _ in range(passes):
            t0 = time.perf_counter()
            work()
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        return len(raw) / min(seconds)

    decode = loader.JPEG_DECODERS[a.jpeg_decoder]

    def decode_all():
        if device.type == "cuda":  # as the route does on a GPU: lists of DECODE_GROUP in one call
            for g in range(0, len(raw), loader.DECODE_GROUP):
                decode(raw[g:g + loader.DECODE_GROUP], device)
        else:
            for r in raw:
                decode(r, device)

    # the route's own work per image, as a worker (CPU) or the main process (GPU) does it, without a DataLoader
    ids = list(range(len(rows)))
    ds = loader.ExtractDataset(meta["source"], [r["path"] for r in rows], ids, pre, a.jpeg_decoder,
                               defer_jpeg=device.type == "cuda")
    to_input = loader.DeviceInput(pre, device, a.jpeg_decoder)

    def route_all():
        with torch.inference_mode():
            for b in range(0, len(ds), a.batch_size):
                to_input.pixels(loader.collate([ds[i] for i in ids[b:b + a.batch_size]]))

    decode(raw[:2], device)  # warm-up (nvjpeg handles, CUDA context)
    out = {"decode_img_s": best_rate(decode_all), "route_img_s": best_rate(route_all)}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in loader.make_loader(ds, a.batch_size, a.workers, device):
            to_input.pixels(batch)
    _sync(device)
    out["input_img_s"] = len(ds) / (time.perf_counter() - t0)
    return out


def run_child(kind: str, a: argparse.Namespace, env_extra: dict[str, str] | None = None, **extra) -> dict:
    """Runs one measurement in a fresh Python process with the thread budget in its environment."""
    # this checkout first, then whatever PYTHONPATH already held (bench/gpu_check.sh's carried packages)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PIPELINE_RUN_DIR": str(Path(a.workdir) / "runs"), "PYTHONPATH": path, **(env_extra or {})}
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--root", str(a.root),
            "--n", str(extra.get("n", a.n)), "--index", str(extra.get("index", "")),
            "--out", str(extra.get("out", "")), "--batch-size", str(a.batch_size), "--workers", str(a.workers),
            "--threads", str(a.threads), "--image-size", str(a.image_size), "--device", a.device,
            "--precision", a.precision, "--decode", extra.get("decode", a.decode), "--model", a.model,
            "--jpeg-decoder", extra.get("jpeg_decoder", "torchcodec")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"bench: the {kind} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT):])


# ----------------------------------------------------------------------------------------------------------------
# Driver


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/extract.py", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", type=Path, help="an ImageFolder root (class subfolders, at any depth below it)")
    src.add_argument("--generate", type=int, metavar="N", help="generate N photo-like JPEGs (default: 256)")
    p.add_argument("--size", default="500x375", help="WxH of generated JPEGs (default: %(default)s)")
    p.add_argument("--n", type=int, help="images per timed run (default: all; cycles the files when larger)")
    p.add_argument("--rss-n", type=int, help="second N for the pipeline's peak RSS (default: 4 x n)")
    p.add_argument("--batch-size", type=int, default=32, help="both loops (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both loops (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads, both loops (default: CPU count, %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="crop size (default: %(default)s)")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="backbone, bundled weights (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="pipeline only (default: %(default)s)")
    p.add_argument("--decode", default="pil",
                   help=f"pipeline only: extract.decode, one or several comma-separated ({', '.join(DECODES)}); "
                        "jpeg = nvJPEG on a GPU through TorchCodec, else torchvision (default: %(default)s)")
    p.add_argument("--compare-decoders", action="store_true",
                   help="instead of the two loops: the JPEG route with TorchCodec's JPEG decoder and with "
                        "torchvision.io.decode_jpeg (deprecated), side by side (alone, route, input path, end to end)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each loop this many times, alternating, and keep the best (default: %(default)s)")
    p.add_argument("--no-parts", action="store_true", help="skip timing the pipeline's parts alone")
    p.add_argument("--workdir", type=Path, help="keep generated images and indexes here (default: a temp folder)")
    p.add_argument("--json", type=Path, help="also write the img/s of each loop here (bench/gpu_table.py reads it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--jpeg-decoder", default="torchcodec", choices=tuple(JPEG_DECODERS), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--index", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        fn = {"textbook": child_textbook, "pipeline": child_pipeline, "parts": child_parts,
              "decode": child_decode}[a.child]
        print(RESULT + json.dumps(fn(a)), flush=True)
        return
    import torch

    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    own_tmp = a.workdir is None
    a.workdir = Path(tempfile.mkdtemp(prefix="bench-extract-")) if own_tmp else a.workdir
    try:
        _drive(a)
    finally:
        if own_tmp:
            shutil.rmtree(a.workdir, ignore_errors=True)


def _drive(a: argparse.Namespace) -> None:
    if a.images:
        a.root = a.images.resolve()
        what = f"photos in {a.images}"
    else:
        n_gen = a.generate or 256
        width, height = (int(v) for v in a.size.lower().split("x"))
        a.root = generate_images(a.workdir / f"jpeg-{width}x{height}-{n_gen}", n_gen, width, height,
                                 os.cpu_count() or 1)
        what = f"generated JPEGs of {width}x{height}"
    classes, samples = image_list(a.root)
    a.n = a.n or len(samples)
    rss_n = a.rss_n or 4 * a.n
    total = sum((a.root / p).stat().st_size for p, _ in samples)
    for p, _ in samples:  # page cache: neither loop pays for the disk
        (a.root / p).read_bytes()
    index = write_index(a.workdir / f"index-{a.n}", a.root, classes, cycled(samples, a.n))

    print(f"machine: {machine(a.device)}")
    print(f"images:  {a.n} rows from {len(samples)} {what} (mean {total / len(samples) / 1024:.0f} KB), "
          f"{a.image_size} px, {a.model}")
    if a.compare_decoders:
        print(f"budget:  batch {a.batch_size}, {a.workers} DataLoader workers, {a.threads} torch threads, "
              f"device {a.device}; pipeline precision {a.precision}, the JPEG route with each JPEG decoder",
              flush=True)
        compare_decoders(a, index)
        return
    decodes = a.decode.split(",")
    if not decodes or any(d not in DECODES for d in decodes):
        raise SystemExit(f"bench: --decode {a.decode!r}: give one or more of {', '.join(DECODES)}, comma-separated")
    first = decodes[0]  # the route the larger-N run and the parts are timed with
    index2 = write_index(a.workdir / f"index-{rss_n}", a.root, classes, cycled(samples, rss_n))
    print(f"budget:  batch {a.batch_size}, {a.workers} DataLoader workers, {a.threads} torch threads, "
          f"device {a.device}; pipeline precision {a.precision}, decode {', '.join(decodes)}", flush=True)
    textbooks, pipelines = [], {d: [] for d in decodes}
    for _ in range(a.repeat):  # alternated, so that load from other processes hits every loop alike
        textbooks.append(run_child("textbook", a, decode=first))
        for d in decodes:
            pipelines[d].append(run_child("pipeline", a, index=index, out=a.workdir / f"features-{d}.h5", decode=d))
    pipeline2 = run_child("pipeline", a, n=rss_n, index=index2, out=a.workdir / "features2.h5", decode=first)
    # The textbook loop again with the heap setting the pipeline applies on CPUs (see retained_heap), through glibc's
    # own environment switch: how much of the gap is the allocator, and how much the pipeline's own work.
    tuned = (run_child("textbook", a, env_extra={"GLIBC_TUNABLES": GLIBC_TUNABLES}, decode=first)
             if a.device == "cpu" else None)
    parts = None if a.no_parts else run_child("parts", a, index=index, decode=first)
    if a.repeat > 1:
        print("runs (img/s): textbook " + ", ".join(f"{r['rows'] / r['seconds']:.1f}" for r in textbooks)
              + "".join(f"; pipeline {d} " + ", ".join(f"{r['rows'] / r['seconds']:.1f}" for r in rs)
                        for d, rs in pipelines.items()) + " (best kept)")
    textbook = max(textbooks, key=lambda r: r["rows"] / r["seconds"])
    best = {d: max(rs, key=lambda r: r["rows"] / r["seconds"]) for d, rs in pipelines.items()}
    pipeline = best[first]

    rate = {k: r["rows"] / r["seconds"] for k, r in (("t", textbook), ("p2", pipeline2), ("tt", tuned),
                                                      *((f"p:{d}", r) for d, r in best.items())) if r}
    rate["p"] = rate[f"p:{first}"]
    print()
    print("| loop | rows | seconds | img/s | peak RSS main | peak RSS worker |")
    print("|---|---|---|---|---|---|")
    for name, r, k in (("textbook (ImageFolder + PIL + DataLoader + torch.cat, NCHW fp32)", textbook, "t"),
                       *((f"pipeline (extract_features -> HDF5, {a.precision}, decode {d})", r, f"p:{d}")
                         for d, r in best.items()),
                       (f"pipeline, larger N (peak RSS check, decode {first})", pipeline2, "p2"),
                       (f"textbook + GLIBC_TUNABLES={GLIBC_TUNABLES}", tuned, "tt")):
        if not r:
            continue
        print(f"| {name} | {r['rows']} | {r['seconds']:.2f} | {rate[k]:.1f} | {r['rss_main_mb']:.0f} MB "
              f"| {r['rss_worker_mb']:.0f} MB |")
    if a.json:
        a.json.write_text(json.dumps({"device": a.device, "precision": a.precision, "rows": a.n,
                                      "textbook_img_s": rate["t"],
                                      "pipeline_img_s": {d: rate[f"p:{d}"] for d in decodes}}, indent=1) + "\n")
    print()
    _print_time_split([*((f"decode {d}", r) for d, r in best.items()), (f"larger N, decode {first}", pipeline2)])
    print()
    for d in decodes:
        print(f"speed-up pipeline (decode {d}) / textbook: {rate[f'p:{d}'] / rate['t']:.2f}x")
    if tuned:
        print(f"speed-up pipeline / textbook with the same heap setting: {rate['p'] / rate['tt']:.2f}x")
    print(f"pipeline peak RSS: N={pipeline['rows']}: {pipeline['rss_main_mb']:.0f} MB main, "
          f"{pipeline['rss_worker_mb']:.0f} MB per worker; N={pipeline2['rows']}: {pipeline2['rss_main_mb']:.0f} MB "
          f"main, {pipeline2['rss_worker_mb']:.0f} MB per worker")
    if parts:
        print(f"pipeline parts alone: input path {parts['input_img_s']:.0f} img/s, input + device preprocessing "
              f"{parts['input_device_img_s']:.0f} img/s, model {parts['model_img_s']:.0f} img/s "
              f"(end to end {rate['p']:.0f} img/s)")
        bound = min(("input path (file read + CPU decode/resize in workers)", parts["input_img_s"]),
                    ("device preprocessing (decode/transfer/normalise)", parts["input_device_img_s"]),
                    ("model forward", parts["model_img_s"]), key=lambda kv: kv[1])
        print(f"slowest part alone: {bound[0]} at {bound[1]:.0f} img/s; end to end reaches "
              f"{100 * rate['p'] / bound[1]:.0f}% of it")
        if a.device == "cpu":
            # On a CPU the parts take turns on the same cores, so their times add up rather than overlap.
            shared = 1 / (1 / parts["input_device_img_s"] + 1 / parts["model_img_s"])
            print(f"CPU: parts share the cores, so the bound is 1/(1/input+preprocessing + 1/model) = {shared:.0f} "
                  f"img/s; end to end reaches {100 * rate['p'] / shared:.0f}% of it")


def _print_time_split(runs: list[tuple[str, dict]]) -> None:
    """The pipeline's time split (issue 27), one row per run: wall time of extract_features (model build included,
    unlike the table above) = time to the first batch's features on the host + the batches after it + the time after
    the last batch (store write-back, HDF5 assembly, rename). The first and last parts are the fixed cost; the steady
    img/s is the rate a larger N approaches."""
    print("| pipeline run | wall s | to first batch s | steady s | steady img/s (rows) | after last batch s |")
    print("|---|---|---|---|---|---|")
    for name, r in runs:
        if r["first_batch_s"] is None:
            continue
        steady = "-" if r["steady_img_per_s"] is None else f"{r['steady_img_per_s']:.1f} ({r['steady_rows']})"
        print(f"| {name} | {r['wall_s']:.2f} | {r['first_batch_s']:.2f} | {r['steady_s']:.2f} | {steady} "
              f"| {r['after_last_batch_s']:.2f} |")


def compare_decoders(a: argparse.Namespace, index: Path) -> None:
    """Both JPEG decoders through the JPEG route, alternated `--repeat` times (best kept), and their ratio."""
    runs: dict[str, list[dict]] = {name: [] for name in JPEG_DECODERS}
    for _ in range(a.repeat):  # alternated, so that load from other processes hits both decoders alike
        for name in JPEG_DECODERS:
            parts = run_child("decode", a, index=index, jpeg_decoder=name)
            end = run_child("pipeline", a, index=index, out=a.workdir / f"features-{name}.h5", decode=name)
            runs[name].append({**parts, "pipeline_img_s": end["rows"] / end["seconds"],
                               "features_sha256": end["features_sha256"]})
    columns = (("decode_img_s", "decoder alone (full size)"), ("route_img_s", "route per image (no DataLoader)"),
               ("input_img_s", f"input path ({a.workers} workers)"), ("pipeline_img_s", "pipeline end to end"))
    if a.repeat > 1:
        for name, rs in runs.items():
            print(f"runs (img/s), {name}: " + "; ".join(
                label.split(" (")[0] + " " + ", ".join(f"{r[key]:.1f}" for r in rs) for key, label in columns)
                + " (best kept)")
    best = {name: {key: max(r[key] for r in rs) for key, _ in columns} for name, rs in runs.items()}
    print()
    print("| JPEG decoder | " + " | ".join(f"{label} img/s" for _, label in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, label in JPEG_DECODERS.items():
        print(f"| {label} | " + " | ".join(f"{best[name][key]:.1f}" for key, _ in columns) + " |")
    old, new = best["torchvision"], best["torchcodec"]
    print("| ratio torchcodec / torchvision | " + " | ".join(f"{new[key] / old[key]:.2f}x" for key, _ in columns)
          + " |")
    digests = {r["features_sha256"] for rs in runs.values() for r in rs}
    print()
    print("features of every run byte-identical (the arrays; the attributes name the decoder): "
          + ("yes" if len(digests) == 1 else f"no ({len(digests)} different)"))


if __name__ == "__main__":
    main()
