"""Cheap heads fitted on cached features: the registry of head types (registry.py), the logistic regression
(logreg.py, softmax.py) and the MLP (mlp.py), fitting, saving and loading (fitting.py, spec.py), scores
(metrics.py), choosing one (selection.py) and searching a head's params (search.py).

Import from the submodules: this file imports nothing, so a stage's code deps are only the modules it uses.
"""
