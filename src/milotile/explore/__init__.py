"""Exploration: SimSiam training on patch banks and embedding of every candidate.

>>> import milotile as mt                                            # doctest: +SKIP
>>> enc = mt.explore.train("project.zarr", mode="2d3d", epochs=20)   # doctest: +SKIP
>>> emb = enc.embed("project.zarr")                                  # doctest: +SKIP
>>> atl = mt.explore.atlas("project.zarr", emb.key)                   # doctest: +SKIP
>>> labels = mt.explore.select("project.zarr", clusters=[3, 7])      # doctest: +SKIP
"""

from milotile.explore import model as _model  # noqa: F401  (registers "simsiam-3d"/"simsiam-2d3d")
from milotile.explore.atlas import Atlas, atlas, load_atlas
from milotile.explore.augment import AugmentConfig, augment, default_config, make_views
from milotile.explore.data import PatchBank, PatchLoader, channel_stats, open_bank
from milotile.explore.embed import Embeddings, Encoder, embed, load_encoder
from milotile.explore.model import SimSiam, load_weights, output_std, simsiam_loss
from milotile.explore.select import select
from milotile.explore.train import train

__all__ = [
    "Atlas",
    "atlas",
    "load_atlas",
    "select",
    "AugmentConfig",
    "Embeddings",
    "Encoder",
    "PatchBank",
    "PatchLoader",
    "SimSiam",
    "augment",
    "channel_stats",
    "default_config",
    "embed",
    "load_encoder",
    "load_weights",
    "make_views",
    "open_bank",
    "output_std",
    "simsiam_loss",
    "train",
]
