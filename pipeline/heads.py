"""Stage `heads@<name>`: fits one cheap head on the cached features only (never images, never the backbone).

Heads: `logreg` (standardised L2 logistic regression: scikit-learn for small data, a torch L-BFGS solver for large
data), `mlp` (BN-Dropout-Linear-ReLU) and `knn` (DINOv2's weighted kNN vote on L2-normalised features, k chosen on
val), all on the GPU when present; `pooling: auto` gives them avg (concat [avg, max] for the MLP) on CNN feature maps,
the model's own `pre_logits` on ViT-like backbones. Only the pooling a head needs is read; features over
`in_memory_gb` stay in the file and are streamed (kNN keeps its train rows in memory). With `heads.<head>.views: n` a
head also trains on the first n cached augmented views of each train image (`--views`, data/views.h5 from the
`extract_views` stage; pipeline/core/heads/views.py); val and test stay the plain view. Each is stored as a torch
module: `head.safetensors` (weights; for kNN the normalised train rows and labels) + `head.json` (what to build,
which pooling, which features it was fitted on), so later stages load every head the same way, without pickle.

    python -m pipeline.heads logreg --features data/features.h5 --views data/views.h5 --out models/heads/logreg \\
        --metrics metrics/heads/logreg.json
    # the backbone sweep (dvc.yaml `sweep_heads`): features of another backbone than params.yaml's
    python -m pipeline.heads mlp --backbone tf_efficientnet_lite1 --features data/sweep/tf_efficientnet_lite1/features.h5 \\
        --out models/sweep/tf_efficientnet_lite1/mlp --metrics metrics/heads/sweep/tf_efficientnet_lite1/mlp.json
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.core.features.staleness import verify_features
from pipeline.core.heads.fitting import fit_head, save_head
from pipeline.core.heads.registry import HEADS
from pipeline.infra import runlog
from pipeline.infra.artifacts import write_json
from pipeline.infra.config import load_section
from pipeline.infra.runner import run_main, stage_parser
from pipeline.infra.runtime import resolve_device


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser("python -m pipeline.heads", __doc__, tuple(f"heads.{h}" for h in HEADS))
    parser.add_argument("head", choices=list(HEADS), help="which head to fit")
    parser.add_argument("--features", type=Path, default=Path("data/features.h5"), help="features file from extract")
    parser.add_argument("--out", type=Path, help="head folder (default: models/heads/<head>)")
    parser.add_argument("--metrics", type=Path, help="metrics JSON (default: metrics/heads/<head>.json)")
    parser.add_argument("--views", type=Path,
                        help="augmented views file (dvc.yaml's extract_views: data/views.h5) for heads.<head>.views")
    parser.add_argument("--index", type=Path, default=Path("data/prepared"),
                        help="prepare's output folder; when it exists, the features must come from its index.csv "
                             "(default: %(default)s)")
    parser.add_argument("--backbone", help="backbone.name the features come from, instead of params.yaml's (sweep)")
    parser.add_argument("--weights", help="backbone.weights the features come from, instead of params.yaml's")
    args = parser.parse_args(argv)
    cfg = getattr(load_section("heads", args.params), args.head)
    backbone = load_section("backbone", args.params)
    backbone = dataclasses.replace(backbone, name=args.backbone or backbone.name,
                                   weights=args.weights or backbone.weights)
    # Refuse stale features (another backbone, preprocessing, precision, dtype or index) before fitting anything.
    verify_features(args.features, backbone, load_section("extract", args.params),
                    args.index if (args.index / "index.csv").is_file() else None)
    runlog.note(head=args.head, device=str(resolve_device(cfg.device)), precision="fp32")
    module, spec, metrics = fit_head(args.head, args.features, cfg, args.views)
    save_head(args.out or Path("models/heads") / args.head, module, spec)
    write_json(args.metrics or Path("metrics/heads") / f"{args.head}.json", metrics)


if __name__ == "__main__":
    run_main(main, "heads")
