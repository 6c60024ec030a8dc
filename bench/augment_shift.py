"""How far does each fine-tune augmentation move the warm-started network from the cached features its head was fitted
on? The head's accuracy and loss on the train split under each transform (forward only, no training).

Needs a folder with `prepared/` and `heads/logreg/` as the stages write them (e.g. bench/finetune_seeds.py's work
folder, or the repository after `dvc repro`: pass `--index data/prepared --head models/heads/logreg`):

    python bench/augment_shift.py --index data/prepared --head models/heads/logreg --image-size 96
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script
import pipeline  # noqa: E402, F401  (before numpy and torch: portable numerics)

# isort: split
import argparse
import platform

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.core.data.images import ImageDataset, eval_transform, train_transform
from pipeline.core.data.index import read_index
from pipeline.core.finetune.network import predict_logits, warm_started
from pipeline.core.heads.fitting import load_head
from pipeline.core.heads.metrics import split_metrics
from pipeline.infra.config import BackboneConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--index", type=Path, required=True, help="prepare's output folder")
    parser.add_argument("--head", type=Path, required=True, help="a fitted head folder (head.json + safetensors)")
    parser.add_argument("--image-size", type=int, default=96, help="the size the features were extracted at")
    parser.add_argument("--crop-scale", type=float, default=0.7)
    args = parser.parse_args()
    rows, meta = read_index(args.index)
    train = [r for r in rows if r["split"] == "train"]
    head, spec = load_head(args.head)
    net, pre = warm_started(BackboneConfig(image_size=args.image_size), head, spec)
    net = net.to(memory_format=torch.channels_last).eval()
    labels = np.array([int(r["label"]) for r in train])
    print(f"# head {spec.head} on {len(train)} train images, {pre.size} px, {platform.machine()} CPU")
    for name, transform in [("eval view (centre crop: the cached features)", eval_transform(pre)),
                            ("augment: shift", train_transform(pre, "shift", args.crop_scale, False)),
                            (f"augment: resized_crop (scale {args.crop_scale})",
                             train_transform(pre, "resized_crop", args.crop_scale, False))]:
        loader = DataLoader(ImageDataset(meta["source"], train, transform, seed=0), batch_size=64)
        m = split_metrics(predict_logits(net, loader, torch.device("cpu")), labels)
        print(f"{name:48s} accuracy {m['accuracy']:.4f}  loss {m['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
