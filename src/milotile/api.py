"""The chained Python API: a facade above the store and the stages (the store never imports a stage).

::

    import milotile as mt

    col = mt.ingest("tomograms.txt", "project.zarr")          # or mt.open("project.zarr")
    cands = col.preprocess(gauss=0.8).mine(dog=(3, 5))        # Candidates: .df, .params
    bank = col.patches(bbox=36, modes=("slab",))               # PatchBank
    encoder = mt.explore.train(col, bank, epochs=100)
    picker = mt.refine.train(col, labels, bbox=16, epochs=10)
    picks = picker.pick(col)

:func:`open` and :func:`ingest` return a :class:`Collection`, the store's collection with the stage
methods added; everything else accepts either.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from milotile.store import collection as _store
from milotile.store.ingest import ingest as _ingest

__all__ = ["Candidates", "Collection", "ingest", "open", "open_collection"]


class Collection(_store.Collection):
    """A collection store with the workflow's stage methods (see the module notes)."""

    def preprocess(self, **kwargs: Any) -> Collection:
        """Run :func:`milotile.stages.preprocess.preprocess` on this collection; returns ``self``."""
        from milotile.stages.preprocess import preprocess

        preprocess(self, **kwargs)
        return self

    def mine(self, **kwargs: Any) -> Candidates:
        """Run :func:`milotile.stages.mine.mine`; returns the :class:`Candidates`."""
        from milotile.stages.mine import mine

        table = kwargs.get("table", "candidates")
        df = mine(self, **kwargs)
        return Candidates(self, table, self.table_params(table), df)

    def patches(self, **kwargs: Any) -> Any:
        """Run :func:`milotile.stages.patches.extract_patches`; returns the :class:`~milotile.explore.PatchBank`."""
        from milotile.explore.data import open_bank
        from milotile.stages.patches import extract_patches

        return open_bank(self, extract_patches(self, **kwargs))


@dataclass
class Candidates:
    """A candidate table in the store: rows (``df``), the mining parameters and where it lives."""

    collection: Collection
    table: str
    params: dict = field(repr=False)
    df: pd.DataFrame = field(repr=False)

    def patches(self, **kwargs: Any) -> Any:
        """Cut a patch bank for these candidates (:meth:`Collection.patches` with ``table``)."""
        return self.collection.patches(table=self.table, **kwargs)

    def __len__(self) -> int:
        return len(self.df)


def open_collection(url: str | os.PathLike, mode: str = "r+", storage_options: dict | None = None) -> Collection:
    """Open an existing collection store (``mt.open``); see :func:`milotile.store.open_collection`."""
    base = _store.open_collection(url, mode=mode, storage_options=storage_options)
    return Collection(base.url, mode="r" if mode == "r" else "a", storage_options=storage_options)


open = open_collection  # noqa: A001  (``mt.open``)


def ingest(sources: Iterable[str | os.PathLike] | str | os.PathLike, store: str | os.PathLike | Any,
           **kwargs: Any) -> Collection:
    """Ingest tomograms into a store; see :func:`milotile.store.ingest`. Returns the :class:`Collection`."""
    col = _ingest(sources, store, **kwargs)
    return col if isinstance(col, Collection) else Collection(col.url, storage_options=col.storage_options)
