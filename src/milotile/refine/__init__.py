"""Refinement: a positive-unlabeled picker trained from sparse labels (MiLoPYP §6).

Public API::

    picker = milotile.refine.train(col, labels, bbox=16, epochs=10, arch="unet4", out="run")
    picker = milotile.refine.Picker.load("run/best.pt")
    picks = picker.pick(col)                            # threshold: the validated one by default
"""

from milotile.refine.picker import Picker
from milotile.refine.predict import pick
from milotile.refine.train import train

__all__ = ["Picker", "pick", "train"]
