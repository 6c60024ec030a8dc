"""Every probe on hymenoptera at 224 px with the bundled Lite0: one table, with intervals (issue 26).

Data: hymenoptera (ants vs bees, `train/` and `val/` folders). With split folders, prepare keeps them as they are
(pipeline/core/data/scan.py: `data.val_fraction` / `test_fraction` apply only to a root of bare class folders), so
there is a train and a val split and no test split: everything below is scored on val. Features: bundled
tf_efficientnet_lite0 at its own 224 px (`backbone.image_size: null`), extracted once into `--work` by prepare +
extract through the stages' own entry points (as bench/samplers.py does, `--store none`) and reused afterwards; a
features file made by bench/samplers.py (build/bench_samplers/hymenoptera/) can be copied there instead.

Rows, all from the pipeline's own code with params.yaml's defaults:

- on all train images: the heads `logreg`, `mlp` and `knn` (`heads.*`), each fitted by
  :func:`pipeline.core.heads.fitting.fit_head`, the function behind `heads@<head>`, so the figures are those that
  stage would write; and the nearest class mean (pipeline/core/heads/fewshot.py's `ncm_similarities`, on the
  `fewshot.pooling` features). Val accuracy and balanced accuracy, each with its 95 % Wilson interval
  (pipeline/core/heads/intervals.py): the sampling error of the val set;
- the few-shot curve: `run_fewshot` with params.yaml's `fewshot` section (k = 1..16 train images per class, 10 nested
  episodes, probes logreg with a fixed C, kNN and nearest class mean); mean val accuracy and the 95 % t-interval over
  episodes: the spread due to which images were drawn, val held fixed.

Writes `--out`.md (the table, printed too), .json (every figure, the configs, the machine) and .png (the few-shot
curve with its interval bands; the all-train results as dashed lines). When the data set is absent and no features
were extracted before, it says so and exits 0 (nothing to measure).

    python bench/probes.py                                        # seconds on cached features; extraction once
    python bench/probes.py --data ../shared/data/hymenoptera_data --work build/bench_probes
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.features.cache import read_attrs, read_inputs, read_labels  # noqa: E402
from pipeline.core.features.staleness import verify_features  # noqa: E402
from pipeline.core.heads.fewshot import PROBES, ncm_similarities, run_fewshot  # noqa: E402
from pipeline.core.heads.fitting import fit_head  # noqa: E402
from pipeline.core.heads.metrics import split_metrics  # noqa: E402
from pipeline.core.models.feature_sets import auto_pooling  # noqa: E402
from pipeline.infra.config import load_section, to_dict  # noqa: E402
from pipeline.infra.runtime import pin_torch_threads, setup_logging  # noqa: E402

log = logging.getLogger("bench.probes")

HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
HEADS = ("logreg", "mlp", "knn")
COLUMNS = {"logreg": "logreg", "mlp": "MLP", "knn": "kNN", "ncm": "nearest class mean"}
KEYS = ("accuracy", "accuracy_ci95", "balanced_accuracy", "balanced_accuracy_ci95")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def features_224(data: Path, work: Path) -> Path | None:
    """The features of `data` at the bundled Lite0's own 224 px: from `work` when there, else prepare + extract once.

    Returns None when they must be extracted and `data` is absent (the caller skips). The params file written
    beside them is params.yaml with only `data.source` and `backbone.image_size: null` changed, so the features are
    exactly what the pipeline would extract for this data set at 224 px.
    """
    import yaml

    features = work / "features.h5"
    if features.exists():
        return features
    if not data.is_dir():
        return None
    from pipeline import extract, prepare  # the stages' own entry points (imported only when extracting)

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(data.resolve())
    params["backbone"]["image_size"] = None  # the weights' own 224 px
    path = work / "params.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    log.info("probes: extracting %s once into %s (minutes on a CPU)", data, work)
    prepare.main(["--params", str(path), "--out", str(work / "prepared")])
    extract.main(["--params", str(path), "--index", str(work / "prepared"), "--out", str(features),
                  "--store", "none"])
    return features


def val_figures(metrics: dict) -> dict:
    """The four figures of the table from a split's metrics (pipeline/core/heads/metrics.py keys)."""
    return {k: metrics[k] for k in KEYS}


def nearest_class_mean(features: Path, pooling: str, num_classes: int) -> dict:
    """Nearest class mean on all train rows, scored on val.

    Its scores are cosine similarities, not logits, so only the argmax-based figures are kept (the metrics code
    would also compute a cross-entropy of them, which means nothing here).
    """
    x_train, x_val = read_inputs(features, "train", pooling), read_inputs(features, "val", pooling)
    y_train = read_labels(features, "train").astype(np.int64)
    y_val = read_labels(features, "val").astype(np.int64)
    similarities = ncm_similarities(x_train, y_train, x_val, num_classes).astype(np.float32)
    return val_figures(split_metrics(similarities, y_val, num_classes))


def measure(features: Path, params: Path) -> dict:
    """Every row of the table: the three heads and the nearest class mean on all train rows, then the episodes."""
    heads_cfg, fewshot_cfg = load_section("heads", params), load_section("fewshot", params)
    attrs = read_attrs(features)
    classes = list(attrs["classes"])
    train, val = read_labels(features, "train"), read_labels(features, "val")
    out: dict = {"classes": classes,
                 "splits": {s: {"images": int(len(y)), "per_class": np.bincount(y, minlength=len(classes)).tolist()}
                            for s, y in (("train", train), ("val", val))},
                 "preprocess": json.loads(attrs["preprocess"]) if isinstance(attrs.get("preprocess"), str)
                 else attrs.get("preprocess"),
                 "backbone": attrs.get("backbone"), "weights": attrs.get("weights"),
                 "params": {"heads": {h: to_dict(getattr(heads_cfg, h)) for h in HEADS},
                            "fewshot": to_dict(fewshot_cfg)},
                 "all_train": {}, "seconds": {}}
    for head in HEADS:
        t0 = time.perf_counter()
        _, spec, metrics = fit_head(head, features, getattr(heads_cfg, head))
        out["seconds"][head] = round(time.perf_counter() - t0, 2)
        # what the fit chose on val (logreg's C, kNN's k; the MLP's epoch), for the record
        chosen = {k: v for k, v in spec.fit.items() if k in ("C", "k", "T", "best_epoch", "epochs_run")}
        out["all_train"][head] = {**val_figures(metrics["val"]), "train_accuracy": metrics["train"]["accuracy"],
                                  "pooling": spec.pooling, "chosen": chosen}
    pooling = (auto_pooling("logreg", attrs.get("feature_layout", "NCHW")) if fewshot_cfg.pooling == "auto"
               else fewshot_cfg.pooling)
    t0 = time.perf_counter()
    out["all_train"]["ncm"] = {**nearest_class_mean(features, pooling, len(classes)), "pooling": pooling}
    out["seconds"]["ncm"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    out["fewshot"] = run_fewshot(features, fewshot_cfg)
    out["seconds"]["fewshot"] = round(time.perf_counter() - t0, 2)
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def _cell(value: float, interval: list[float]) -> str:
    return f"{_pct(value)} % [{_pct(interval[0])}, {_pct(interval[1])}]"


def table(results: dict) -> list[str]:
    """The one table: few-shot rows (mean over episodes [t-interval]), then all-train rows ([Wilson interval])."""
    r = results["measured"]
    fs = r["fewshot"]
    n_val = r["splits"]["val"]["images"]
    lines = [f"| train images | {' | '.join(COLUMNS.values())} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for k in fs["protocol"]["shots"]:
        cells = [_cell(fs["results"][str(k)][p]["val"]["accuracy"], fs["results"][str(k)][p]["val"]["accuracy_ci95"])
                 if p in PROBES else "-" for p in COLUMNS]
        lines.append(f"| {k} per class, accuracy | {' | '.join(cells)} |")
    n_train = r["splits"]["train"]["images"]
    for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")):
        cells = [_cell(r["all_train"][p][key], r["all_train"][p][f"{key}_ci95"]) for p in COLUMNS]
        lines.append(f"| all {n_train}, {label} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Val: {n_val} images, so one image is {100 / n_val:.2f} pt.")
    return lines


def report(results: dict) -> str:
    r = results["measured"]
    fs, sp = r["fewshot"], r["splits"]
    per_class = lambda s: " / ".join(f"{n} {c}" for c, n in zip(r["classes"], sp[s]["per_class"]))  # noqa: E731
    chosen = ", ".join(f"{h} {r['all_train'][h]['chosen']}" for h in HEADS)
    overlap = all_overlap(r["all_train"])
    lines = [
        "# Probes on hymenoptera, 224 px, bundled Lite0",
        "",
        f"Machine: {results['machine']}, {results['date']}. Command: `python bench/probes.py`. "
        f"Features: {r['backbone']} ({r['weights']}), {r['preprocess'].get('size')} px "
        f"(resize {r['preprocess'].get('resize')}, centre crop). Splits as prepare makes them from the train/ and val/ "
        f"folders (no test split): train {sp['train']['images']} ({per_class('train')}), val {sp['val']['images']} "
        f"({per_class('val')}).",
        "",
        "Val accuracy. Rows `k per class`: the `fewshot` probes (logreg with a fixed C = "
        f"{fs['protocol']['probes']['logreg']['C']}, kNN with min({fs['protocol']['probes']['knn']['k']}, 2k) "
        f"neighbours, nearest class mean), mean over {fs['protocol']['episodes']} nested episodes [95 % t-interval "
        "over episodes: which images were drawn]. Rows `all`: the heads as `heads@<head>` fits them with params.yaml's "
        "defaults (logreg picks C on val, kNN its k) and the nearest class mean of all train images "
        "[95 % Wilson interval: the val set's sampling error].",
        "",
        *table(results),
        "",
        f"Chosen on val: {chosen}. All-train intervals {'all overlap' if overlap else 'do not all overlap'}. "
        f"Skipped shots: {fs['skipped'] or 'none'}.",
        "",
        "Time (s): " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()),
        "",
    ]
    return "\n".join(lines)


def all_overlap(rows: dict) -> bool:
    """Whether every pair of all-train accuracy intervals shares a point (then no head is shown better than another)."""
    ivs = [v["accuracy_ci95"] for v in rows.values()]
    return all(a[0] <= b[1] and b[0] <= a[1] for a in ivs for b in ivs)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["measured"]
    fs = r["fewshot"]
    shots = fs["protocol"]["shots"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"logreg": "C0", "knn": "C2", "ncm": "C3", "mlp": "C1"}
    for probe in PROBES:
        mean = [100 * fs["results"][str(k)][probe]["val"]["accuracy"] for k in shots]
        lo, hi = zip(*[[100 * b for b in fs["results"][str(k)][probe]["val"]["accuracy_ci95"]] for k in shots])
        ax.plot(shots, mean, marker="o", color=colours[probe], label=f"{COLUMNS[probe]} (k per class)")
        ax.fill_between(shots, lo, hi, color=colours[probe], alpha=0.15)
    for head, row in r["all_train"].items():
        ax.axhline(100 * row["accuracy"], color=colours[head], linestyle="--", linewidth=1,
                   label=f"{COLUMNS[head]}, all {r['splits']['train']['images']} train: {_pct(row['accuracy'])} %")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set(xlabel="train images per class (k)", ylabel=f"val accuracy, % ({r['splits']['val']['images']} images)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.suptitle(f"hymenoptera, 224 px, bundled Lite0: few-shot mean and 95 % t-interval over "
                 f"{fs['protocol']['episodes']} episodes\n{results['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HYMENOPTERA,
                        help="hymenoptera's ImageFolder root, read only when extracting (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_probes",
                        help="where the features are kept between runs, in <work>/hymenoptera/ (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "probes_cpu",
                        help="results prefix: .md, .json, .png (default: %(default)s)")
    args = parser.parse_args()
    setup_logging(logging.INFO)
    pin_torch_threads()  # as run_main does for the stages: the thread count is part of the numerics
    work = args.work / "hymenoptera"
    features = features_224(args.data, work)
    if features is None:
        print(f"bench/probes.py: skipped: {args.data} is absent and {work} holds no features; get hymenoptera "
              "(train/ and val/ folders of ants and bees) or pass --data")
        return
    # The features must be what the params beside them describe (backbone, 224 px, index): a stale or foreign file
    # would give a table of something else.
    wparams = work / "params.yaml"
    verify_features(features, load_section("backbone", wparams), load_section("extract", wparams), work / "prepared")
    t0 = time.perf_counter()
    # the heads' and fewshot's params are this checkout's params.yaml, read once (it may change during a run)
    measured = measure(features, REPO / "params.yaml")
    results = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
               "features": str(features.resolve().relative_to(REPO)) if features.resolve().is_relative_to(REPO)
               else str(features), "seconds": round(time.perf_counter() - t0, 1), "measured": measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = report(results)
    args.out.with_suffix(".md").write_text(text)
    plot(results, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
