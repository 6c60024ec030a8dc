"""Cheap heads fitted on cached features: the registry of head types, fitting, and saved heads."""
from pipeline.core.heads.registry import HEADS, HeadType, head_type
from pipeline.core.heads.store import (
                                       HeadFileError,
                                       build_head,
                                       check_class_binding,
                                       check_head_features,
                                       fit_head,
                                       head_logits,
                                       load_head,
                                       save_head,
)

__all__ = ["HEADS", "HeadType", "head_type", "HeadFileError", "build_head", "check_class_binding", "check_head_features", "fit_head",
           "head_logits", "load_head", "save_head"]
