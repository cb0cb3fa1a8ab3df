"""milotile: map and pick macromolecules across whole collections of cryo-electron tomograms.

The Python API reads like the workflow::

    import milotile as mt

    with mt.cluster():
        col = mt.ingest("tomograms.txt", "project.zarr")   # or mt.open("project.zarr")
        cands = col.preprocess(gauss=0.8).mine(dog=(3, 5))
        bank = col.patches(bbox=36)
        encoder = mt.explore.train(col, bank, epochs=20)
"""

from __future__ import annotations

import importlib
import logging

from milotile.cluster import cluster  # light: dask loads when a cluster starts
from milotile.errors import InputError, StoreError

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: sub-packages loaded on first use (``mt.explore``, ``mt.refine`` import torch)
SUBPACKAGES = ("explore", "formats", "metrics", "nn", "ops", "refine", "segments", "stages", "store", "synth")

__all__ = ["Candidates", "Collection", "InputError", "StoreError", "__version__", "cluster", "ingest", "open",
           *SUBPACKAGES]


#: the workflow API (milotile.api loads the store: dask, zarr, pandas), imported on first use
_API = ("Candidates", "Collection", "ingest", "open")


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("milotile.api"), name)
    if name in SUBPACKAGES:
        return importlib.import_module(f"milotile.{name}")
    raise AttributeError(f"module 'milotile' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBPACKAGES) | set(_API))
