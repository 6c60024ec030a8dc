"""What a backbone's cached features are called, and how a head combines them.

A leaf: the feature network (pipeline/core/models/pooling.py) computes these sets, the cache
(pipeline/core/features/cache.py) stores them, and the heads read them, without any of those importing another.
"""
from __future__ import annotations

FEATURE_SETS = ("avg", "max", "pre_logits")  # the cached datasets per split, in this order everywhere


# What a head reads: one feature set, or `catavgmax` = [avg, max] (timm's order, not fastai's max-first).
POOLINGS = ("avg", "catavgmax", "pre_logits")


def pooling_datasets(pooling: str) -> tuple[str, ...]:
    """The cached feature sets a pooling is made of, in concat order."""
    if pooling in ("avg", "pre_logits"):
        return (pooling,)
    if pooling == "catavgmax":
        return ("avg", "max")
    raise ValueError(f"unknown pooling '{pooling}'; choose one of {POOLINGS}")


def auto_pooling(head: str, layout: str) -> str:
    """`heads.<head>.pooling: auto` for a backbone whose last map has `layout`.

    Token models (ViT, DINOv2, CLIP, SigLIP, EVA: NLC) -> `pre_logits`, the representation they were trained to
    expose (class token or their own pooling, after the final norm); averaging their patch tokens is weaker for a
    linear probe. Feature-map models (CNNs, Swin) -> `avg` for logistic regression and kNN, `catavgmax` for the MLP:
    for most of them `pre_logits` *is* the average (ResNet, EfficientNet, Swin), and the MLP gains from the max map.
    """
    if layout == "NLC":
        return "pre_logits"
    return "catavgmax" if head == "mlp" else "avg"
