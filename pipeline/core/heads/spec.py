"""What a fitted head is: the typed record behind head.json (and model.json's `head`).

Every stage that loads a head (finetune, evaluate, predict) reads the same fields by name, instead of passing an
untyped dict around; the file keeps its flat JSON layout (keys sorted), so head.json's bytes do not change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Key of a fit's details holding the model whose train and val scores the metrics report, when that is not the saved
# model (logreg's `refit: true`: the saved model has seen val, the train-only fit at the chosen C is what was
# selected). fit_head pops it before the details go into head.json.
SELECTION_MODULE = "selection_module"


@dataclass(frozen=True)
class HeadSpec:
    """A fitted head's description.

    Attributes:
        head: the head type (a key of pipeline.core.heads.registry.HEADS).
        pooling: the cached pooling it reads (`avg`, `catavgmax`, `pre_logits`).
        in_features, num_classes: its input width and output size.
        classes: class names in output order (positional: output i is classes[i]).
        config: the params section it was fitted with.
        fit: what the fit chose and measured (e.g. logreg's C and its search).
        features: the fingerprint of the features it was fitted on (backbone, weights, preprocessing, index...).
        classes_binding: SHA-256 tying `classes` to `features` (pipeline.core.heads.fitting.class_binding).
        architecture: what building the module needs beyond its sizes (the MLP: hidden, dropout); stored flat.
    """

    head: str
    pooling: str
    in_features: int
    num_classes: int
    classes: list[str]
    config: dict[str, Any]
    fit: dict[str, Any]
    features: dict[str, Any]
    classes_binding: str
    architecture: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The head.json layout: every field at the top level, the architecture's entries among them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "architecture"}
        return {**out, **self.architecture}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeadSpec":
        """Inverse of :meth:`to_dict`; keys that are not fields are the architecture's."""
        names = {f.name for f in dataclasses.fields(cls)} - {"architecture"}
        return cls(**{k: d[k] for k in names}, architecture={k: v for k, v in d.items() if k not in names})
