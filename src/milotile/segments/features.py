"""``segments features``: hand-crafted features, shape cubes and surface points of every object.

Objects are grouped by the storage chunk their bounding box starts in; one task per group reads
the union of its objects' bounding boxes once (about one chunk plus the largest object) and
measures each object from its crop (:func:`milotile.segments.shape.measure`). The driver adds the
nearest-neighbour distance (KD-tree on physical centroids) and writes
``tables/segment-features.parquet`` and, for the learned features, ``segments/<name>/crops``
(N × S³ uint8 shape cubes) and ``segments/<name>/points`` (N × P × 3 float32 surface points),
row ``i`` of both belonging to row ``i`` of the table (column ``row``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import zarr
from scipy.spatial import cKDTree

from milotile.errors import InputError
from milotile.segments.index import BBOX
from milotile.segments.shape import FEATURE_UNITS, measure, shape_cube, surface_points
from milotile.segments.volume import SegmentVolume, open_segments, write_rows

log = logging.getLogger(__name__)

__all__ = ["compute_features", "feature_units", "group_by_chunk", "features_of_region", "FEATURES_TABLE"]

FEATURES_TABLE = "segment-features"


def feature_units(unit: str) -> dict[str, str]:
    """Unit of every feature column for a volume measured in ``unit`` (``angstrom`` or ``voxel``)."""
    base = "Å" if unit == "angstrom" else "voxel"
    out = {k: ("1" if p == 0 else f"{base}" + ("" if p == 1 else f"^{p}")) for k, p in FEATURE_UNITS.items()}
    out.update({"nn_distance": base, "crop_scale": base, "points_scale": base})
    return out


def group_by_chunk(objects: pd.DataFrame, chunks: Sequence[int]) -> list[np.ndarray]:
    """Row indices of ``objects`` grouped by the chunk their bounding box starts in."""
    start = objects[["z0", "y0", "x0"]].to_numpy() // np.asarray(chunks)
    keys = pd.Series(list(map(tuple, start)))
    return [np.asarray(v, dtype=np.int64) for v in keys.groupby(keys).indices.values()]


def features_of_region(
    labels: np.ndarray, lo: Sequence[int], ids: np.ndarray, bboxes: np.ndarray, spacing: Sequence[float],
    crop_size: int = 0, n_points: int = 0, seed: int = 0,
) -> tuple[list[dict[str, Any]], np.ndarray | None, np.ndarray | None]:
    """Features of the objects ``ids`` whose bounding boxes ``(n, 6)`` lie in ``labels`` (placed at ``lo``).

    Returns
    -------
    rows : list of dict
        One feature dict per object (plus ``crop_scale`` / ``points_scale``).
    cubes : numpy.ndarray or None
        ``(n, S, S, S)`` uint8 when ``crop_size``.
    points : numpy.ndarray or None
        ``(n, P, 3)`` float32 when ``n_points``.
    """
    rows = []
    cubes = np.zeros((len(ids), crop_size, crop_size, crop_size), np.uint8) if crop_size else None
    pts = np.zeros((len(ids), n_points, 3), np.float32) if n_points else None
    lo = np.asarray(lo)
    for i, (oid, bb) in enumerate(zip(ids, bboxes, strict=True)):
        a, b = bb[:3] - lo, bb[3:] - lo
        mask = labels[a[0]:b[0], a[1]:b[1], a[2]:b[2]] == oid
        f = measure(mask, spacing)
        verts, centre = f.pop("_verts"), f.pop("_centre")
        if cubes is not None:
            cubes[i], f["crop_scale"] = shape_cube(mask, spacing, crop_size)
        if pts is not None:
            pts[i], f["points_scale"] = surface_points(verts, centre, n_points, seed=(int(seed) * 1_000_003 + int(oid)) % 2**63)
        f["id"] = oid
        rows.append(f)
    return rows, cubes, pts


def _region_task(url: str, so: dict | None, lab_path: str, ids: np.ndarray, bboxes: np.ndarray,
                 spacing: Sequence[float], crop_size: int, n_points: int, seed: int) -> Any:
    lo = bboxes[:, :3].min(axis=0)
    hi = bboxes[:, 3:].max(axis=0)
    arr = zarr.open_array(url, path=lab_path, mode="r", storage_options=so or None)
    labels = arr[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))]
    return features_of_region(labels, lo, ids, bboxes, spacing, crop_size, n_points, seed)


def compute_features(
    store: Any,
    name: str | None = None,
    *,
    crop_size: int = 32,
    n_points: int = 256,
    seed: int = 0,
) -> pd.DataFrame:
    """Measure every object of a segment volume (one task per chunk group) and store the results.

    Parameters
    ----------
    store : Collection or path
    name : str, optional
        Segment volume (default: the only one).
    crop_size : int
        Side of the shape cubes for the learned features (0: no cubes).
    n_points : int
        Surface points per object for the point-cloud auto-encoder (0: none).
    seed : int
        Seed of the surface-point sampling.

    Returns
    -------
    pandas.DataFrame
        ``tables/segment-features`` rows of this volume: ``id``, ``row``, the features of
        :mod:`milotile.segments.shape`, ``nn_distance``, ``crop_scale``, ``points_scale``.
    """
    import dask

    from milotile.runtime import compute_with_progress

    vol = open_segments(store, name)
    objects = vol.objects()
    if not len(objects):
        raise InputError(f"segment volume {vol.name!r} has no objects; run `milotile segments index` first.")
    if crop_size < 0 or n_points < 0:
        raise InputError(f"crop size and point count must not be negative, got {crop_size} and {n_points}.")
    groups = group_by_chunk(objects, vol.chunks)
    ids = objects["id"].to_numpy(np.uint64)
    bb = objects[list(BBOX)].to_numpy(np.int64)
    so = dict(vol.collection.storage_options or {}) or None
    task = dask.delayed(_region_task, pure=False)
    t0 = time.perf_counter()
    res = compute_with_progress(
        [task(vol.collection.url, so, vol.path("labels", "objects", "0"), ids[g], bb[g], vol.voxel_size,
              crop_size, n_points, seed) for g in groups],
        desc="segments features",
    )
    dt = time.perf_counter() - t0
    order = np.concatenate(groups)
    rows = [r for part in res for r in part[0]]
    feats = pd.DataFrame(rows)
    feats["id"] = feats["id"].astype(np.uint64)
    # restore id order: rows came group by group
    pos = np.empty(len(order), np.int64)
    pos[order] = np.arange(len(order))
    feats = feats.iloc[pos].reset_index(drop=True)
    feats["row"] = np.arange(len(feats), dtype=np.int64)
    cent = objects[["z", "y", "x"]].to_numpy() * np.asarray(vol.voxel_size)
    if len(cent) > 1:
        d, _ = cKDTree(cent).query(cent, k=2)
        feats["nn_distance"] = d[:, 1]
    else:
        feats["nn_distance"] = np.nan
    _write_arrays(vol, res, pos, crop_size, n_points, seed)
    params = {"stage": "segments-features", "crop_size": crop_size, "n_points": n_points, "seed": seed,
              "unit": vol.unit, "units": feature_units(vol.unit), "voxel_size": list(vol.voxel_size)}
    write_rows(vol.collection, FEATURES_TABLE, vol.name, feats, params=params)
    log.info("features of %d objects in %d tasks: %.1f s (%.0f objects/s)", len(feats), len(groups), dt,
             len(feats) / max(dt, 1e-9))
    return feats


def _write_arrays(vol: SegmentVolume, res: list, pos: np.ndarray, crop_size: int, n_points: int, seed: int) -> None:
    """``crops`` / ``points`` of the volume, each a stage output with the volume as its source."""
    from milotile.store.arrays import create_array

    n = len(pos)
    col = vol.collection
    src = {vol.path(): col.source_token(vol.path())}
    if crop_size:
        cubes = np.concatenate([r[1] for r in res])[pos]
        out = col.stage_output(vol.path("crops"), {"crop_size": crop_size}, src)
        with out:
            arr = out.begin(create_array(vol.group, "crops", (n, crop_size, crop_size, crop_size),
                                         chunks=(min(256, n), crop_size, crop_size, crop_size), dtype=np.uint8))
            arr[:] = cubes
            out.finish(layout="row i = tables/segment-features row i",
                       scaling="isotropic fit of the bbox, centred; scale in crop_scale")
    if n_points:
        pts = np.concatenate([r[2] for r in res])[pos]
        out = col.stage_output(vol.path("points"), {"n_points": n_points, "seed": seed}, src)
        with out:
            arr = out.begin(create_array(vol.group, "points", (n, n_points, 3), chunks=(min(1024, n), n_points, 3),
                                         dtype=np.float32))
            arr[:] = pts
            out.finish(normalisation="centred, divided by RMS radius (points_scale)")
