"""Pretrained backbones by name: preprocessing resolution, weights (bundled, hub, files), the feature network
and its pooling.
"""
