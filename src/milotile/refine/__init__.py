"""Refinement: a positive-unlabeled picker trained from sparse labels (MiLoPYP §6).

Public API::

    picker = milotile.refine.train(col, labels, bbox=16, epochs=10, arch="unet4", out="run")
    picker = milotile.refine.Picker.load("run/best.pt")
    picks = picker.pick(col)                            # threshold: the validated one by default
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__all__ = ["Picker", "pick", "train"]

if TYPE_CHECKING:
    from milotile.refine.picker import Picker
    from milotile.refine.predict import pick
    from milotile.refine.train import train

#: imported on first use, so ``milotile.refine.recipe`` (the CLI's options) loads without torch
_LAZY = {"Picker": "milotile.refine.picker", "pick": "milotile.refine.predict", "train": "milotile.refine.train"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'milotile.refine' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps ``milotile.refine.train`` the function: importing the submodule of the same name would
    otherwise bind the module over it (the import system sets the parent's attribute)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
