"""Stages: wire the pure ``ops`` to the collection store (read inputs, write results with parameters)."""

from milotile.stages.mine import mine
from milotile.stages.patches import extract_patches
from milotile.stages.preprocess import preprocess, preprocessed_volume

__all__ = ["extract_patches", "mine", "preprocess", "preprocessed_volume"]
