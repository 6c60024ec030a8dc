"""The core library: dataset index, image loading, backbones, the feature cache, heads, training, metrics, report.

Stage modules (pipeline/<stage>.py) call into it; it never imports a stage module.
"""
