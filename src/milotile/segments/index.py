"""The object index: per label id its bounding box, voxel count and centroid, in one pass.

Every block yields a small table (one row per id present: count, per-axis min/max and coordinate
sums) computed on the block's object voxels only (``flatnonzero``, ``numpy.unique``, ``bincount``,
``minimum/maximum.reduceat``: labels are mostly background); the tables are concatenated and reduced with a pandas group-by (min/max/sum),
so the volume is read once and never per object (EManalysis re-read whole slices per object and
feature). Ids stay ``uint64`` throughout (no float/uint16 casts). When a class volume is given,
the class of an object is its majority class over its voxels (not one pixel's, as in EManalysis).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["block_index", "reduce_index", "BBOX", "INDEX_COLUMNS"]

BBOX = ("z0", "y0", "x0", "z1", "y1", "x1")
INDEX_COLUMNS = ("id", "voxels", *BBOX, "sz", "sy", "sx")


def block_index(
    labels: np.ndarray, offset: Sequence[int] = (0, 0, 0), classes: np.ndarray | None = None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Per-id statistics of one block of an instance-label volume.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer block ``(z, y, x)``; 0 is background.
    offset : (z, y, x)
        Position of the block in the volume (bounding boxes and sums are global).
    classes : numpy.ndarray, optional
        Class block of the same shape; votes per (id, class) are returned.

    Returns
    -------
    table : pandas.DataFrame
        Columns :data:`INDEX_COLUMNS` (``z1`` etc. exclusive ends; ``sz`` etc. coordinate sums).
    votes : pandas.DataFrame or None
        ``id, class, n`` voxel counts, when ``classes`` is given.
    """
    flat = labels.ravel()
    fg = np.flatnonzero(flat)  # only object voxels are sorted and counted (labels are mostly background)
    vals = flat[fg]
    ids, inv = np.unique(vals, return_inverse=True)
    n = len(ids)
    counts = np.bincount(inv, minlength=n)
    coords = np.unravel_index(fg, labels.shape)
    order = np.argsort(inv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, np.int64)
    lo, hi, sums = [], [], []
    for axis in range(3):
        c = coords[axis].astype(np.int64)
        cs = c[order]
        lo.append(np.minimum.reduceat(cs, starts) + offset[axis] if n else cs[:0])
        hi.append(np.maximum.reduceat(cs, starts) + offset[axis] + 1 if n else cs[:0])
        sums.append(np.bincount(inv, weights=c.astype(np.float64), minlength=n) + counts * float(offset[axis]))
    table = pd.DataFrame({
        "id": ids.astype(np.uint64), "voxels": counts.astype(np.int64),
        "z0": lo[0], "y0": lo[1], "x0": lo[2], "z1": hi[0], "y1": hi[1], "x1": hi[2],
        "sz": sums[0], "sy": sums[1], "sx": sums[2],
    })
    votes = None
    if classes is not None:
        fg = flat != 0
        pair = pd.DataFrame({"id": flat[fg].astype(np.uint64), "class": classes.ravel()[fg].astype(np.int64)})
        votes = pair.value_counts().rename("n").reset_index()
    return table, votes


def reduce_index(
    tables: Sequence[pd.DataFrame], votes: Sequence[pd.DataFrame | None] = (), voxel_size: Sequence[float] = (1, 1, 1)
) -> pd.DataFrame:
    """Merge per-block tables into one row per object, sorted by id.

    Returns
    -------
    pandas.DataFrame
        ``id, voxels, z0..x1, z, y, x`` (centroid in voxels), ``x_A, y_A, z_A`` (centroid times the
        voxel size) and ``class`` when votes were given (majority class; ties: the smaller code).
    """
    tables = [t for t in tables if len(t)]
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=np.uint64 if c == "id" else np.int64) for c in ("id", "voxels", *BBOX)})
    allt = pd.concat(tables, ignore_index=True)
    g = allt.groupby("id", sort=True)
    agg = g.agg(voxels=("voxels", "sum"), z0=("z0", "min"), y0=("y0", "min"), x0=("x0", "min"),
                z1=("z1", "max"), y1=("y1", "max"), x1=("x1", "max"), sz=("sz", "sum"), sy=("sy", "sum"),
                sx=("sx", "sum")).reset_index()
    out = agg[["id", "voxels", *BBOX]].copy()
    out["id"] = out["id"].astype(np.uint64)
    for c, s in zip("zyx", ("sz", "sy", "sx"), strict=True):
        out[c] = agg[s] / agg["voxels"]
    vz, vy, vx = (float(v) for v in voxel_size)
    out["x_A"], out["y_A"], out["z_A"] = out["x"] * vx, out["y"] * vy, out["z"] * vz
    vv = [v for v in votes if v is not None and len(v)]
    if vv:
        allv = pd.concat(vv, ignore_index=True).groupby(["id", "class"], sort=True)["n"].sum().reset_index()
        best = allv.sort_values(["id", "n", "class"], ascending=[True, False, True]).drop_duplicates("id")
        out = out.merge(best[["id", "class"]].astype({"id": np.uint64}), on="id", how="left")
        out["class"] = out["class"].fillna(-1).astype(np.int64)
    return out
