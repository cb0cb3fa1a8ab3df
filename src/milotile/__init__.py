"""milotile: map and pick macromolecules across whole collections of cryo-electron tomograms.

The Python API reads like the workflow::

    import milotile as mt

    with mt.cluster():
        col = mt.ingest("tomograms.txt", "project.zarr")   # or mt.open("project.zarr")
        cands = col.preprocess(gauss=0.8).mine(dog=(3, 5))
"""

from __future__ import annotations

import logging

from milotile.cluster import cluster
from milotile.errors import InputError, StoreError
from milotile.store import Collection, ingest
from milotile.store import open_collection as open

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["Collection", "InputError", "StoreError", "__version__", "cluster", "ingest", "open"]


def __getattr__(name: str):
    # heavy sub-packages (torch) load on first use: ``mt.explore``, ``mt.refine``, ``mt.synth``
    import importlib

    if name in {"explore", "refine", "synth", "formats", "metrics", "stages", "ops", "nn", "segments"}:
        return importlib.import_module(f"milotile.{name}")
    raise AttributeError(f"module 'milotile' has no attribute {name!r}")
