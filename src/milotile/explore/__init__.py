"""Exploration: SimSiam training on patch banks and embedding of every candidate.

>>> import milotile as mt                                            # doctest: +SKIP
>>> enc = mt.explore.train("project.zarr", mode="2d3d", epochs=20)   # doctest: +SKIP
>>> emb = enc.embed("project.zarr")                                  # doctest: +SKIP
>>> atl = mt.explore.atlas("project.zarr", emb.key)                   # doctest: +SKIP
>>> labels = mt.explore.select("project.zarr", clusters=[3, 7])      # doctest: +SKIP

The training hyper-parameters are one object, :class:`milotile.explore.recipe.ExploreRecipe`.
The names below load on first use, so ``milotile.explore.recipe`` (the CLI's options) loads without torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from milotile.explore.atlas import Atlas, atlas, load_atlas
    from milotile.explore.augment import AugmentConfig, augment, default_config, make_views
    from milotile.explore.data import PatchBank, PatchLoader, channel_stats, open_bank
    from milotile.explore.embed import Embeddings, Encoder, embed, load_encoder
    from milotile.explore.model import (
        SimSiam,
        load_weights,
        ntxent_loss,
        output_std,
        pair_loss,
        simsiam_loss,
    )
    from milotile.explore.recipe import ExploreRecipe
    from milotile.explore.select import select
    from milotile.explore.train import train

#: public name -> the module defining it, imported on first use (the model module registers
#: "simsiam-3d"/"simsiam-2d3d" when it loads; train and embed import it)
_LAZY = {
    **dict.fromkeys(("Atlas", "atlas", "load_atlas"), "milotile.explore.atlas"),
    **dict.fromkeys(("AugmentConfig", "augment", "default_config", "make_views"), "milotile.explore.augment"),
    **dict.fromkeys(("PatchBank", "PatchLoader", "channel_stats", "open_bank"), "milotile.explore.data"),
    **dict.fromkeys(("Embeddings", "Encoder", "embed", "load_encoder"), "milotile.explore.embed"),
    **dict.fromkeys(("SimSiam", "load_weights", "ntxent_loss", "output_std", "pair_loss", "simsiam_loss"),
                    "milotile.explore.model"),
    "ExploreRecipe": "milotile.explore.recipe",
    "select": "milotile.explore.select",
    "train": "milotile.explore.train",
}

__all__ = [
    "Atlas", "AugmentConfig", "Embeddings", "Encoder", "ExploreRecipe", "PatchBank", "PatchLoader", "SimSiam",
    "atlas", "augment", "channel_stats", "default_config", "embed", "load_atlas", "load_encoder", "load_weights",
    "make_views", "ntxent_loss", "open_bank", "output_std", "pair_loss", "select", "simsiam_loss", "train",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'milotile.explore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``milotile.explore.train`` (``atlas``, ``embed``, ``select``) the function: importing the
    submodule of the same name would otherwise bind the module over it."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
