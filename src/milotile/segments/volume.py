"""A segmented volume in the collection store and the per-volume tables of the segments stages.

Layout (one OME-NGFF 0.5 image per volume, labels under it, chunked alike)::

    segments/<name>/0                      EM image (source dtype), zarr chunks (64, 256, 256)
    segments/<name>/labels/objects/0       instance ids, uint32 (uint64 for 64-bit sources)
    segments/<name>/labels/classes/0       optional class volume (evaluation only)
    segments/<name>/labels/clusters/0      cluster + 1 per object (written by ``cluster``)
    segments/<name>/crops, points          per-object shape cubes and surface points (features)
    tables/objects.parquet                 the object index (column ``volume_name`` = <name>)
    tables/segment-features.parquet        hand-crafted features
    tables/segment-<kind>.parquet          learned embeddings (simsiam, vae, pointae)
    tables/segment-clusters.parquet        id, features used, cluster

Every per-volume table holds the rows of all volumes with a ``volume_name`` column; a stage replaces
only the rows of its own volume (:func:`write_rows`), so stages never overwrite each other's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import zarr

from milotile.errors import InputError
from milotile.store import as_collection, missing_input

log = logging.getLogger(__name__)

__all__ = ["SEGMENTS", "SegmentVolume", "open_segments", "read_rows", "write_rows", "as_collection"]

SEGMENTS = "segments"
#: column naming the segment volume a row of a segments table belongs to
VOLUME_COL = "volume_name"


@dataclass
class SegmentVolume:
    """Accessor of ``segments/<name>`` in a collection store."""

    collection: Any
    name: str
    group: zarr.Group

    @property
    def meta(self) -> dict[str, Any]:
        """The ``milotile`` attributes (sources, voxel size, chunks, counts)."""
        return dict(self.group.attrs.get("milotile", {}))

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        """``(z, y, x)`` in Å, or ``(1, 1, 1)`` when unknown (then :attr:`unit` is ``"voxel"``)."""
        return tuple(float(v) for v in self.meta.get("voxel_size", (1.0, 1.0, 1.0)))  # type: ignore[return-value]

    @property
    def unit(self) -> str:
        """``"angstrom"`` when the voxel size is known, else ``"voxel"``."""
        return "angstrom" if self.meta.get("voxel_size_known") else "voxel"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.group["0"].shape)  # type: ignore[return-value]

    @property
    def chunks(self) -> tuple[int, int, int]:
        return tuple(int(c) for c in self.group["0"].chunks)  # type: ignore[return-value]

    def em(self) -> da.Array:
        """The EM image as a dask array (zarr chunks)."""
        return da.from_zarr(self.group["0"])

    def label_array(self, which: str = "objects") -> zarr.Array:
        """The zarr array of a label image (``objects``, ``classes``, ``clusters``)."""
        try:
            return self.group["labels"][which]["0"]
        except KeyError:
            raise InputError(f"segment volume {self.name!r} has no label image {which!r}.") from None

    def labels(self, which: str = "objects") -> da.Array:
        """A label image as a dask array (zarr chunks)."""
        return da.from_zarr(self.label_array(which))

    def has_labels(self, which: str) -> bool:
        return "labels" in self.group and which in self.group["labels"]

    def path(self, *parts: str) -> str:
        """Path of a node of this volume inside the store (for tasks that open zarr themselves)."""
        return "/".join([SEGMENTS, self.name, *parts])

    def objects(self) -> pd.DataFrame:
        """This volume's rows of ``tables/objects`` (sorted by id)."""
        return read_rows(self.collection, "objects", self.name)


def open_segments(col_or_store: Any, name: str | None = None) -> SegmentVolume:
    """Open the segment volume ``name`` (default: the only one) of a store."""
    col = as_collection(col_or_store)
    grp = col.group(SEGMENTS)
    names = [] if grp is None else sorted(
        n for n, node in grp.members()
        if not n.startswith(".") and isinstance(node, zarr.Group) and node.attrs.get("milotile", {}).get("complete")
    )
    if name is None:
        if len(names) != 1:
            raise InputError(
                f"{col.url} holds {len(names)} segment volumes ({', '.join(names) or 'none'}); "
                + ("ingest one with `milotile segments ingest`." if not names else "name one with --name.")
            )
        name = names[0]
    if name not in names:
        raise InputError(f"{col.url} has no segment volume {name!r} (known: {', '.join(names) or 'none'}).")
    return SegmentVolume(col, name, grp[name])


def read_rows(col: Any, table: str, volume: str) -> pd.DataFrame:
    """The rows of ``volume`` in ``tables/<table>`` (sorted by id, index reset)."""
    if not col.has_table(table):
        raise missing_input(col.url, table)
    df = col.read_table(table)
    if VOLUME_COL in df:
        df = df[df[VOLUME_COL].astype(str) == volume].drop(columns=[VOLUME_COL])
    if "id" in df:
        df = df.assign(id=df["id"].astype(np.uint64)).sort_values("id")
    return df.reset_index(drop=True)


def write_rows(col: Any, table: str, volume: str, df: pd.DataFrame, params: dict[str, Any] | None = None,
               sources: dict[str, str | None] | None = None) -> None:
    """Replace the rows of ``volume`` in ``tables/<table>`` by ``df`` (other volumes' rows are kept).

    ``sources`` default to the segment volume itself (its stage-output token), so a re-ingested
    volume makes the table stale (``col.output_status("tables/<table>")``).
    """
    df = df.copy()
    df.insert(0, VOLUME_COL, volume)
    if col.has_table(table):
        old = col.read_table(table)
        if VOLUME_COL in old:
            old = old[old[VOLUME_COL].astype(str) != volume]
            if len(old):
                df = pd.concat([old, df], ignore_index=True)
    if sources is None:
        sources = {f"{SEGMENTS}/{volume}": col.source_token(f"{SEGMENTS}/{volume}")}
    col.write_table(table, df, params=params, sources=sources)
