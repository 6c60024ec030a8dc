"""Stage `finetune`: trains the whole network, warm-started from the selected head (LP-FT).

Before any step it checks on val that backbone + head reproduce the head's own predictions from the cached features
(logits within `finetune.parity_atol`, argmax flips at most `finetune.parity_max_flips`), and stops loudly otherwise:
a mismatch means the features, the preprocessing or the head conversion are not what the head was fitted on.
Training (pipeline/core/finetune/optim.py): AdamW with discriminative learning rates, warm-up + cosine (or one-cycle), a BatchNorm
policy, an optional head-first phase, light augmentation, gradient clipping, bf16 autocast on request, early stopping
weight averaging (SWA or EMA), and the weights of the last (or the best-on-val) epoch. The warm start itself is
epoch 0 and is kept when that epoch does not beat it on val, so the saved model is never worse on val than the head.
Per-epoch curves go to DVCLive (`dvclive/finetune`), for `dvc plots show` and `dvc exp show`.

    python -m pipeline.finetune                                   # one process (GPU if there is one)
    torchrun --nproc_per_node=4 -m pipeline.finetune              # DDP on 4 GPUs; rank 0 alone logs and saves
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.finetune.training import run_finetune
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.finetune", __doc__, ("finetune", "backbone"),
                          epilog="Outputs: the model folder (model.safetensors + model.json), the metrics JSON, "
                                 "and DVCLive curves.")
    parser.add_argument("--index", type=Path, default=Path("data/prepared"), help="prepare's output folder")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="extract's features file")
    parser.add_argument("--heads-dir", type=Path, default=Path("models/heads"), help="folder of fitted heads")
    parser.add_argument("--selected", type=Path, default=Path("models/selected.json"), help="select's choice")
    parser.add_argument("--out", type=Path, default=Path("models/finetune"), help="fine-tuned model folder to write")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/finetune.json"), help="metrics JSON to write")
    parser.add_argument("--live", type=Path, default=Path("dvclive/finetune"),
                        help="DVCLive folder for per-epoch curves; 'none' to disable (default: %(default)s)")
    args = parser.parse_args(argv)
    live = None if str(args.live) == "none" else args.live
    run_finetune(load_section("finetune", args.params), load_section("backbone", args.params),
                 load_section("extract", args.params), args.index, args.features, args.heads_dir, args.selected,
                 args.out, args.metrics, live)


if __name__ == "__main__":
    run_main(main, "finetune")
