"""Why does the fine-tune swing with its seed? Val and test after every epoch, for the raw weights and for averages.

One training run per seed (the fine-tune's own steps, optimizer, schedule, augmentation and data order, with params.yaml's
`finetune` section plus `--set` overrides); after each epoch it scores on val and test the raw weights, EMAs of
several decays and uniform tail averages (SWA) from several starts, all updated from the same steps. Then, per
averaging and per rule that picks the kept epoch (best val accuracy, lowest val loss, last), the test accuracy of
each seed, its spread and standard deviation. Scoring test every epoch is for this diagnosis only: the stage never
looks at test. A benchmark, not a test (one seed: ~4-5 min on a 2-core CPU):

    python bench/finetune_trajectory.py --seeds 0 1 2 3 4 5 --out bench/results/finetune_trajectory_cpu.json
    python bench/finetune_trajectory.py --summary bench/results/finetune_trajectory_cpu.json   # the table again
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from finetune_seeds import REPO, _parse_variant, prepare_work

sys.path.insert(0, str(REPO))  # the pipeline package of this checkout, as the stages' PYTHONPATH gives them

EMA_DECAYS = (0.99, 0.995, 0.998)
SWA_STARTS = (0.5, 0.625)  # the last half and the last 3 of 8 epochs


def _trajectory(work: Path, seed: int, overrides: dict) -> list[dict]:
    from pipeline.infra import numerics

    numerics.pin()  # the stages' own kernel pins, before numpy and torch load
    import numpy as np
    import torch
    import torch.nn as nn
    from torch.utils.data import DataLoader

    from pipeline.core.data.images import ImageDataset, eval_transform
    from pipeline.core.data.index import read_image_sizes, read_index
    from pipeline.core.features.staleness import verify_features
    from pipeline.core.finetune import training
    from pipeline.core.finetune.averaging import ExponentialAverage, TailAverage
    from pipeline.core.finetune.network import predict_logits
    from pipeline.core.finetune.optim import make_optimizer, make_scheduler
    from pipeline.core.heads.metrics import split_metrics
    from pipeline.core.models.preprocessing import resolve_image_size
    from pipeline.infra.config import load_section
    from pipeline.infra.runtime import dist_info, seed_everything, set_deterministic

    params, index, features = work / "params.yaml", work / "prepared", work / "features.h5"
    cfg = dataclasses.replace(load_section("finetune", params), seed=seed, **overrides)
    backbone, _ = resolve_image_size(load_section("backbone", params), read_image_sizes(index))
    attrs = verify_features(features, backbone, load_section("extract", params), index)
    set_deterministic()
    device = torch.device("cpu")
    gen = seed_everything(cfg.seed)
    choice = json.loads((work / "selected.json").read_text())
    net, pre, _, _ = training._start_network(backbone, cfg, work / "heads", choice, attrs, features)
    net = net.to(device, memory_format=torch.channels_last)
    loaders = training.make_loaders(index, pre, cfg, dist_info(), device, gen)
    rows, meta = read_index(index)
    test_rows = [r for r in rows if r["split"] == "test"]
    test = DataLoader(ImageDataset(Path(meta["source"]), test_rows, eval_transform(pre)), batch_size=64)
    test_labels = np.array([int(r["label"]) for r in test_rows])
    opt, steps = make_optimizer(net, cfg), cfg.epochs * len(loaders.train)
    sched = make_scheduler(opt, cfg, len(loaders.train))
    averages = {f"ema{d}": ExponentialAverage(net, d) for d in EMA_DECAYS}
    averages.update({f"swa{s}": TailAverage(net, int(s * steps)) for s in SWA_STARTS})

    def score(module: nn.Module) -> dict:
        val = split_metrics(predict_logits(module, loaders.val, device, "val"), loaders.val_labels)
        tst = split_metrics(predict_logits(module, test, device, "test"), test_labels)
        return {"val_acc": val["accuracy"], "val_loss": val["loss"], "test_acc": tst["accuracy"],
                "test_loss": tst["loss"]}

    start = score(net)
    history = [{"epoch": 0, "raw": start, **{k: start for k in averages}}]
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        training.train_epoch(net, net, loaders.train, opt, sched, cfg, device, epoch, list(averages.values()))
        history.append({"epoch": epoch, "raw": score(net), **{k: score(a.module) for k, a in averages.items()}})
        raw = history[-1]["raw"]
        print(f"  seed {seed} epoch {epoch}: raw val {raw['val_acc']:.4f} test {raw['test_acc']:.4f} | "
              + " | ".join(f"{k} {history[-1][k]['test_acc']:.4f}" for k in averages)
              + f" | {time.perf_counter() - t0:.0f} s", flush=True)
    return history


def _kept(history: list[dict], key: str, rule: str) -> dict:
    """The epoch the stage would keep under `rule` (epoch 0, the warm start, included as it is there)."""
    scored = [h[key] | {"epoch": h["epoch"]} for h in history]
    if rule == "accuracy":
        return max(scored, key=lambda s: (s["val_acc"], -s["val_loss"]))
    if rule == "loss":
        return min(scored, key=lambda s: s["val_loss"])
    last, start = scored[-1], scored[0]
    return start if (start["val_acc"], -start["val_loss"]) > (last["val_acc"], -last["val_loss"]) else last


def summary(runs: dict[str, list[dict]]) -> str:
    """One row per averaging x rule: test accuracy per seed, mean, spread (max - min) and standard deviation."""
    seeds = sorted(runs, key=int)
    keys = [k for k in runs[seeds[0]][0] if k != "epoch"]
    lines = [f"| weights | kept epoch | test accuracy, seeds {' / '.join(seeds)} | mean | spread | sd | largest test "
             "loss |", "|---|---|---|---|---|---|---|"]
    for key in keys:
        for rule in ("accuracy", "loss", "last"):
            kept = [_kept(runs[s], key, rule) for s in seeds]
            acc = [k["test_acc"] for k in kept]
            lines.append(f"| {key} | {rule} | {' / '.join(f'{a:.4f}' for a in acc)} | {statistics.mean(acc):.4f} | "
                         f"{100 * (max(acc) - min(acc)):.2f} pt | {100 * statistics.pstdev(acc):.2f} pt | "
                         f"{max(k['test_loss'] for k in kept):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "digits", help="ImageFolder root")
    parser.add_argument("--work", type=Path, default=Path("build/finetune_seeds"),
                        help="scratch folder (shared with bench/finetune_seeds.py)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", default="", help="finetune overrides, e.g. 'warmup_epochs=1,lr=0.0005'")
    parser.add_argument("--out", type=Path, help="JSON of every trajectory (added to, per seed)")
    parser.add_argument("--summary", type=Path, help="print the table of a JSON written before, and stop")
    args = parser.parse_args()
    if args.summary:
        print(summary(json.loads(args.summary.read_text())["runs"]))
        return
    work = args.work.resolve()
    prepare_work(work, args.data)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "data": args.data.name,
              "overrides": args.set, "runs": {}}
    if args.out and args.out.is_file():
        result = json.loads(args.out.read_text())
    for seed in args.seeds:
        result["runs"][str(seed)] = _trajectory(work, seed, _parse_variant(args.set))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))
    print(summary(result["runs"]))


if __name__ == "__main__":
    main()
