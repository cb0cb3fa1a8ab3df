"""Validation of a picker during training, with exactly the tiler and decoder of ``pick``.

Held-out labelled regions are predicted with :func:`milotile.refine.predict.predict_heatmap` (the one
halo tiler) and decoded with :func:`milotile.refine.decode.decode_heatmap` using the NMS radius and
border of :func:`milotile.refine.decode.decode_options` — the defaults ``pick`` uses. The F1 that
selects ``best.pt`` and the threshold stored as ``suggested_threshold`` therefore describe what
``pick`` returns with that checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.metrics import average_precision, evaluate, pr_curve
from milotile.refine.debug import debug_png
from milotile.refine.decode import decode_heatmap, decode_options
from milotile.refine.predict import predict_heatmap, region_grid
from milotile.refine.shape import check_shapes

logger = logging.getLogger(__name__)

__all__ = ["MIN_SCORE", "regions_from_labels", "split_validation", "validate"]

#: lowest score decoded during validation (the PR curve chooses the threshold above it)
MIN_SCORE = 0.05


def regions_from_labels(df: pd.DataFrame, shapes: dict[str, tuple[int, int, int]], pad: float) -> list[dict]:
    """One region per tomogram: the bounding box of its labels, padded by ``pad`` level-0 voxels."""
    regions = []
    for name, g in df.groupby("tomogram", sort=True):
        zyx = g[["z", "y", "x"]].to_numpy(np.float64)
        shp = shapes[str(name)]
        lo = np.maximum(np.floor(zyx.min(0) - pad), 0).astype(int)
        hi = np.minimum(np.ceil(zyx.max(0) + pad) + 1, shp).astype(int)
        regions.append({"tomogram": str(name), "start": tuple(int(v) for v in lo), "stop": tuple(int(v) for v in hi)})
    return regions


def split_validation(train_df: pd.DataFrame, fraction: float, shapes: dict, pad: float) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Hold out the labelled particles with the largest x of the most-labelled tomogram (a region)."""
    counts = train_df["tomogram"].value_counts()
    name = str(counts.index[0])
    g = train_df[train_df["tomogram"] == name].sort_values("x")
    n_val = max(1, int(round(fraction * len(g))))
    if len(g) - n_val < 1:
        raise InputError(f"Too few labels in tomogram {name!r} ({len(g)}) to hold out a validation region.")
    x_cut = float(g["x"].iloc[len(g) - n_val])
    in_region = (train_df["tomogram"] == name) & (train_df["x"] >= x_cut)
    val = train_df[in_region]
    regions = regions_from_labels(val, shapes, pad)
    return train_df[~in_region].reset_index(drop=True), val.reset_index(drop=True), regions


def _inside(d: pd.DataFrame, lo: Sequence[int], hi: Sequence[int]) -> pd.DataFrame:
    zyx = d[["z", "y", "x"]].to_numpy()
    return d[(zyx >= np.asarray(lo)).all(1) & (zyx < np.asarray(hi)).all(1)]


def predict_region_picks(picker: Any, col: Any, reg: dict, stats: tuple[float, float]) -> tuple[pd.DataFrame, np.ndarray, Any]:
    """Picks (scores above :data:`MIN_SCORE`) of one region, its heatmap and the heatmap's grid."""
    name = reg["tomogram"]
    t = col[name]
    hm = predict_heatmap(col, name, picker, stats=stats, region=(reg["start"], reg["stop"]))
    prob = np.asarray(hm.compute(scheduler="synchronous"))  # the model lives in this process
    grid = region_grid(picker, reg["start"])
    nms, border = decode_options(picker.contract)
    pk = decode_heatmap(prob, tomogram=name, shape=t.shape, voxel_size=t.voxel_size, grid=grid, classes=picker.classes,
                        threshold=MIN_SCORE, nms_distance=nms, max_picks=None, border=border)
    pk = check_shapes(col, pk, picker.contract)
    pk = pk[pk["score"] > MIN_SCORE].reset_index(drop=True)
    return _inside(pk, reg["start"], reg["stop"]), prob, grid


def validate(picker: Any, col: Any, stats: dict[str, tuple[float, float]], regions: list[dict], val_df: pd.DataFrame,
             radius: float, *, debug_dir: Path | None = None, debug_slices: Sequence[int] | None = None,
             epoch: int = 0) -> dict[str, float]:
    """Predict every validation region, decode its picks and match them to the labels inside.

    Returns ``val_precision, val_recall, val_f1`` at the F1-optimal score threshold
    (``val_threshold``, in ``pick``'s ``score > threshold`` sense), ``val_ap`` (average precision)
    and ``val_f1_at_0.5``.
    """
    picks, truth = [], []
    for reg in regions:
        name = reg["tomogram"]
        pk, prob, grid = predict_region_picks(picker, col, reg, stats[name])
        tr = _inside(val_df[val_df["tomogram"] == name], reg["start"], reg["stop"])
        picks.append(pk)
        truth.append(tr)
        if debug_dir is not None and debug_slices:
            debug_png(debug_dir, epoch, col, name, stats[name], picker, prob, grid, reg, pk, tr, debug_slices)
    pred = pd.concat(picks, ignore_index=True)
    true = pd.concat(truth, ignore_index=True)
    key = "tomogram"
    if picker.n_classes > 1:  # matches must not cross classes
        pred = pred.assign(group=pred["tomogram"] + "/" + pred["class"].astype(str))
        true = true.assign(group=true["tomogram"] + "/" + true["class"].astype(str))
        key = "group"
    res = {"val_precision": 0.0, "val_recall": 0.0, "val_f1": 0.0, "val_ap": 0.0, "val_threshold": 0.5,
           "val_f1_at_0.5": 0.0, "val_n_true": int(len(true))}
    if len(pred) == 0 or len(true) == 0:
        return res
    curve = pr_curve(pred, true, radius, by=key)
    best = curve.iloc[int(np.argmax(curve["f1"].to_numpy()))]
    at05 = evaluate(pred, true, radius, by=key, threshold=0.5).iloc[-1]
    # the curve keeps scores >= threshold; pick keeps scores > threshold
    thr = float(np.nextafter(float(best["threshold"]), -np.inf))
    res.update(val_precision=float(best["precision"]), val_recall=float(best["recall"]), val_f1=float(best["f1"]),
               val_ap=average_precision(curve), val_threshold=thr, **{"val_f1_at_0.5": float(at05["f1"])})
    return res
