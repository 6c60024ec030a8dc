"""Run by tests/finetune/test_distributed.py under torchrun (2 CPU processes, gloo): a few real fine-tuning steps through
`pipeline.finetune.finetune` with DDP and a DistributedSampler, then each rank saves its parameters."""
from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU numerics before numpy and torch load)

# isort: split
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.core.data.images import ImageDataset, eval_transform, train_transform
from pipeline.core.data.index import read_index
from pipeline.core.finetune.network import warm_started
from pipeline.core.finetune.training import finetune
from pipeline.core.heads.fitting import load_head
from pipeline.infra.config import load_section
from pipeline.infra.distributed import process_group
from pipeline.infra.runtime import seed_everything, set_deterministic


def main(params: Path, index: Path, head_dir: Path, out: Path) -> None:
    cfg = load_section("finetune", params)
    backbone = load_section("backbone", params)
    set_deterministic()
    device = torch.device("cpu")
    with process_group(device) as (rank, _):
        assert rank.world_size == 2, rank
        gen = seed_everything(cfg.seed + rank.rank)  # different seeds: DDP alone must keep the ranks in step
        head, spec = load_head(head_dir)
        net, pre = warm_started(backbone, head, spec)
        net = net.to(memory_format=torch.channels_last)
        rows, meta = read_index(index)
        train = [r for r in rows if r["split"] == "train"]
        val = [r for r in rows if r["split"] == "val"]
        augmented = train_transform(pre, cfg.augment, cfg.crop_scale, True)
        train_set = ImageDataset(meta["source"], train, augmented, seed=cfg.seed)
        sampler = DistributedSampler(train_set, 2, rank.rank, shuffle=True, seed=cfg.seed, drop_last=True)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, generator=gen)
        val_loader = DataLoader(ImageDataset(meta["source"], val, eval_transform(pre)), batch_size=32)
        labels = np.array([int(r["label"]) for r in val])
        start = np.zeros((len(val), spec.num_classes), dtype=np.float32)
        finetune(net, loader, val_loader, labels, start, cfg, device, None, ddp=True)
        ids = sorted({int(i) for _, _, batch_ids in loader for i in batch_ids})
        # parameters only: DDP re-broadcasts rank 0's buffers (BN statistics) at the start of every forward, so
        # after the last step each rank still holds its own batch statistics, by design
        state = {k: v.detach().contiguous() for k, v in net.named_parameters()}
        state["_seen_ids"] = torch.tensor(ids)
        save_file(state, str(out / f"rank{rank.rank}.safetensors"))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:5]))
