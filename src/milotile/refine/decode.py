"""Heatmap decoding: peaks on the model grid -> picks in level-0 voxels.

Grid convention
---------------
The picker's output voxel ``k`` (per axis, ``z, y, x``) summarises input voxels
``k * stride ... k * stride + stride - 1`` (x and y are down-sampled by ``down_ratio`` = 2, z by 2
only with compression). Its centre, and the position a peak is reported at, is::

    level0 = k * stride + offset,   offset = (stride - 1) / 2      (e.g. 2k + 0.5 for stride 2)

A picker's contract may set ``out_offset`` explicitly (the trained U-Net's stride-2 stem is
centred on input voxel ``2k``, so its contract says 0); :func:`milotile.refine.predict.pick` passes
the contract's values and falls back to ``(stride - 1) / 2`` only when it has none.
This is the only place coordinates move from the model grid to level-0 voxels. MiLoPYP added
0.25 and multiplied by 2 (``2k + 0.5``) and then floored, losing the half voxel; here the centre is
kept as a float.

Peaks come from :func:`milotile.ops.peaks.find_peaks` (local maxima per chunk with a halo and the
owner rule, so correct across chunk seams); the distance NMS then runs in level-0 voxels with
:func:`milotile.ops.peaks.greedy_nms` because the model grid is anisotropic when only x and y are
down-sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import dask.array as da
import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.ops.peaks import find_peaks, greedy_nms

log = logging.getLogger(__name__)

__all__ = ["PICK_COLUMNS", "decode_heatmap", "model_to_level0", "default_offset"]

PICK_COLUMNS = ["tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "score", "class"]


def default_offset(stride: Sequence[int]) -> tuple[float, ...]:
    """Centre offset ``(stride - 1) / 2`` of a model voxel in level-0 voxels, per axis."""
    return tuple((float(s) - 1.0) / 2.0 for s in stride)


def model_to_level0(k_zyx: np.ndarray, stride: Sequence[int], offset: Sequence[float] | None = None) -> np.ndarray:
    """Level-0 ``(z, y, x)`` positions of model-grid indices ``k_zyx`` (shape ``(N, 3)``)."""
    k = np.asarray(k_zyx, dtype=np.float64).reshape(-1, 3)
    off = default_offset(stride) if offset is None else offset
    return k * np.asarray(stride, np.float64) + np.asarray(off, np.float64)


def _as_triple(v: float | Sequence[float], name: str) -> tuple[float, float, float]:
    if np.isscalar(v):
        return (float(v),) * 3  # type: ignore[arg-type]
    t = tuple(float(a) for a in v)  # type: ignore[union-attr]
    if len(t) != 3:
        raise InputError(f"{name} must be one number or three (z, y, x), got {v!r}")
    return t  # type: ignore[return-value]


def empty_picks() -> pd.DataFrame:
    """A picks table with no rows and the standard columns."""
    return pd.DataFrame({c: pd.Series(dtype=object if c in ("tomogram", "class") else np.float64) for c in PICK_COLUMNS})


def decode_heatmap(
    heatmap: da.Array | np.ndarray,
    *,
    tomogram: str,
    shape: Sequence[int],
    voxel_size: float,
    stride: Sequence[int] = (1, 2, 2),
    offset: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    threshold: float = 0.25,
    nms_distance: float = 0.0,
    max_picks: int | None = 900,
    border: float | Sequence[float] = 0,
    footprint: int | Sequence[int] = 3,
) -> pd.DataFrame:
    """Decode a ``(C, Z', Y', X')`` (or ``(Z', Y', X')``) probability heatmap into picks.

    Parameters
    ----------
    heatmap : dask or numpy array
        Probabilities on the model grid; one channel per class.
    tomogram : str
        Tomogram name written into the table.
    shape : sequence of int
        Level-0 shape ``(Z, Y, X)`` of the tomogram (for the border test).
    voxel_size : float
        Å per level-0 voxel.
    stride, offset : sequence
        Model grid geometry (see the module notes); ``offset`` defaults to ``(stride - 1) / 2``.
    classes : sequence of str, optional
        Class name per channel (default ``particle`` / ``class<i>``).
    threshold : float
        Keep peaks with ``score > threshold``.
    nms_distance : float
        Distance NMS radius in level-0 voxels (``<=`` suppresses); 0 keeps all local maxima.
    max_picks : int, optional
        Top-K per tomogram and class after NMS.
    border : float or (z, y, x)
        Drop picks closer than this many level-0 voxels to a face of the volume.
    footprint : int or sequence
        Local-maximum window on the model grid (MiLoPYP: 3).

    Returns
    -------
    pandas.DataFrame
        ``tomogram, x, y, z, x_A, y_A, z_A, score, class`` sorted by class then descending score.
    """
    hm = heatmap if isinstance(heatmap, da.Array) else da.from_array(np.asarray(heatmap), chunks=-1)
    if hm.ndim == 3:
        hm = hm[None]
    if hm.ndim != 4:
        raise InputError(f"heatmap must be (C, Z, Y, X) or (Z, Y, X), got shape {hm.shape}")
    n_classes = hm.shape[0]
    if classes is None:
        classes = ["particle"] if n_classes == 1 else [f"class{i}" for i in range(n_classes)]
    if len(classes) != n_classes:
        raise InputError(f"{len(classes)} class names for a heatmap with {n_classes} channels")
    if max_picks is not None and max_picks < 1:
        raise InputError(f"max_picks must be a positive integer, got {max_picks}")
    bz, by, bx = _as_triple(border, "border")
    Z, Y, X = (int(s) for s in shape)
    tables = []
    for c, cls in enumerate(classes):
        peaks = find_peaks(hm[c], 0.0, threshold=float(threshold), footprint=footprint)
        if peaks.empty:
            continue
        k = peaks[["z", "y", "x"]].to_numpy(dtype=np.float64)
        p = model_to_level0(k, stride, offset)
        z, y, x = p[:, 0], p[:, 1], p[:, 2]
        inside = (
            (z >= bz) & (z <= Z - 1 - bz) & (y >= by) & (y <= Y - 1 - by) & (x >= bx) & (x <= X - 1 - bx)
        )
        p = p[inside]
        score = peaks["score"].to_numpy(dtype=np.float64)[inside]
        order = np.lexsort((p[:, 2], p[:, 1], p[:, 0], -score))
        keep = greedy_nms(p, score, float(nms_distance), order=order)
        if max_picks is not None:
            keep = keep[: int(max_picks)]
        p, score = p[keep], score[keep]
        tables.append(
            pd.DataFrame(
                {
                    "tomogram": str(tomogram),
                    "x": p[:, 2],
                    "y": p[:, 1],
                    "z": p[:, 0],
                    "x_A": p[:, 2] * voxel_size,
                    "y_A": p[:, 1] * voxel_size,
                    "z_A": p[:, 0] * voxel_size,
                    "score": score,
                    "class": str(cls),
                }
            )
        )
        log.debug("%s/%s: %d local maxima above %.3g, %d picks", tomogram, cls, len(peaks), threshold, len(keep))
    if not tables:
        return empty_picks()
    return pd.concat(tables, ignore_index=True)[PICK_COLUMNS]
