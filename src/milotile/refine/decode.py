"""Heatmap decoding: the one way picks come out of a heatmap, for ``pick`` and training validation alike.

Peaks come from :func:`milotile.ops.peaks.find_peaks` (local maxima per chunk with a halo and the
owner rule, so correct across chunk seams) on the model grid; their positions move to level-0
voxels through the heatmap's :class:`milotile.ops.grid.Grid` (``Grid.model_output(out_stride,
out_offset)`` of the picker's contract, shifted to the region's origin); the distance NMS then runs
in level-0 voxels with :func:`milotile.ops.peaks.greedy_nms` because the model grid is anisotropic
when only x and y are down-sampled. MiLoPYP added 0.25, multiplied by 2 and then floored, losing the
half voxel; here the centre is kept as a float. :func:`decode_options` holds the defaults (NMS
radius, border) that validation and ``pick`` share, so the validated threshold describes what
``pick`` returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import dask.array as da
import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.ops.grid import Grid
from milotile.ops.peaks import find_peaks, greedy_nms

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_THRESHOLD", "PICK_COLUMNS", "decode_heatmap", "decode_options", "empty_picks", "picker_grid"]

#: MiLoPYP's ``--out_thresh``; used when a checkpoint carries no validated threshold
DEFAULT_THRESHOLD = 0.25

PICK_COLUMNS = ["tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "score", "class"]


def picker_grid(contract: dict) -> Grid:
    """Model-output grid of a picker from its contract (``out_stride``/``out_offset``).

    Contracts without them: stride ``(2 if compress else 1, down_ratio, down_ratio)`` and the centre
    offset ``(stride - 1) / 2``.
    """
    if "out_stride" in contract:
        stride = tuple(int(s) for s in contract["out_stride"])
    else:
        dr = int(contract.get("down_ratio", 2))
        stride = (2 if contract.get("compress") else 1, dr, dr)
    return Grid.model_output(stride, contract.get("out_offset"))


def decode_options(contract: dict, *, nms_distance: float | None = None,
                   border: float | Sequence[float] | None = None) -> tuple[float, float | Sequence[float]]:
    """``(nms_distance, border)`` in level-0 voxels: the given values, else half and a quarter of the
    contract's ``bbox`` (MiLoPYP's particle box; 16 when absent)."""
    bbox = float(contract.get("bbox", 16))
    nms = float(nms_distance) if nms_distance is not None else bbox / 2.0
    return nms, (math.floor(bbox / 4.0) if border is None else border)


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
    grid: Grid | None = None,
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
    grid : Grid, optional
        Where heatmap voxels lie in level-0 voxels (:func:`picker_grid`, shifted to the region's
        origin); default ``Grid.model_output((1, 2, 2))``, MiLoPYP's ``down_ratio`` 2 without compression.
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
    grid = grid if grid is not None else Grid.model_output((1, 2, 2))
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
        p = grid.to_level0(k)
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
