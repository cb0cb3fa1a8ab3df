"""Refinement: a positive-unlabeled particle picker trained from sparse labels (MiLoPYP §6).

Public API::

    picker = milotile.refine.train(col, labels, bbox=16, epochs=10, arch="unet4", out="run")
    picker = milotile.refine.Picker.load("run/best.pt")
    prob = picker.predict_block(raw_block, stats)      # (C, Z', Y/2, X/2) probabilities
"""

from milotile.refine import model as _model  # noqa: F401  (registers unet4 / unet5 / ressmall)
from milotile.refine.picker import Picker
from milotile.refine.preprocess import preprocess_block, tomogram_stats
from milotile.refine.train import train

__all__ = ["Picker", "preprocess_block", "tomogram_stats", "train"]
