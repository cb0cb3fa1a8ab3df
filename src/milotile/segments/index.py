"""The object index: per label id its bounding box, voxel count and centroid, in one pass.

Every block yields a small table (one row per id present: count, per-axis min/max and coordinate
sums) computed with ``numpy.unique`` + ``bincount`` + ``scipy.ndimage.find_objects`` on the
block's compact ids; the tables are concatenated and reduced with a pandas group-by (min/max/sum),
so the volume is read once and never per object (EManalysis re-read whole slices per object and
feature). Ids stay ``uint64`` throughout (no float/uint16 casts). When a class volume is given,
the class of an object is its majority class over its voxels (not one pixel's, as in EManalysis).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

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
    ids, inv = np.unique(flat, return_inverse=True)
    inv = inv.reshape(labels.shape)
    counts = np.bincount(inv.ravel(), minlength=len(ids))
    keep = ids != 0
    n = len(ids)
    # bounding boxes: find_objects on compact ids 1..n (inverse + 1)
    slices = ndimage.find_objects((inv + 1).astype(np.int32 if n < 2**31 else np.int64, copy=False))
    lo = np.array([[s.start for s in sl] for sl in slices], dtype=np.int64).reshape(n, 3) + np.asarray(offset)
    hi = np.array([[s.stop for s in sl] for sl in slices], dtype=np.int64).reshape(n, 3) + np.asarray(offset)
    sums = []
    for axis in range(3):
        # sum of coordinates along ``axis`` per id (weights broadcast from the axis coordinate)
        coord = np.arange(labels.shape[axis], dtype=np.float64) + offset[axis]
        shape = [1, 1, 1]
        shape[axis] = -1
        w = np.broadcast_to(coord.reshape(shape), labels.shape)
        sums.append(np.bincount(inv.ravel(), weights=w.ravel(), minlength=n))
    table = pd.DataFrame({
        "id": ids[keep].astype(np.uint64), "voxels": counts[keep].astype(np.int64),
        "z0": lo[keep, 0], "y0": lo[keep, 1], "x0": lo[keep, 2],
        "z1": hi[keep, 0], "y1": hi[keep, 1], "x1": hi[keep, 2],
        "sz": sums[0][keep], "sy": sums[1][keep], "sx": sums[2][keep],
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
