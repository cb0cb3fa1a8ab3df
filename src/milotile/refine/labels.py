"""Training labels of the picker: read, validate against the collection, map classes to channels."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats import read_labels, validate_labels

logger = logging.getLogger(__name__)

__all__ = ["class_index", "is_atlas_selection", "load_label_table", "recentre_labels", "selection_recentred"]


def load_label_table(labels: pd.DataFrame | str | os.PathLike[str], col: Any, what: str = "labels") -> pd.DataFrame:
    """Read (if a path) and validate a label table against the collection.

    Returns a table ``tomogram, x, y, z, class`` (level-0 voxels). A ``species`` column is used as the
    class when there is no ``class`` column. Raises :class:`InputError` for unknown tomograms, points
    outside the volume, a probable axis-order mix-up or an empty table.
    """

    if isinstance(labels, (str, os.PathLike)):
        df = read_labels(labels, col)
    elif isinstance(labels, pd.DataFrame):
        df = labels.copy()
    else:
        raise InputError(f"{what} must be a DataFrame or a path, got {type(labels).__name__}.")
    if "class" not in df.columns and "species" in df.columns:
        df = df.rename(columns={"species": "class"})
    if len(df) == 0:
        raise InputError(f"The {what} table holds no particles; there are zero positives to train from.")
    df = validate_labels(df, col)
    df["tomogram"] = df["tomogram"].astype(str)
    df["class"] = df["class"].astype(str)
    out = df.reset_index(drop=True)
    # where the labels came from outlives the columns the reader keeps (`refine train --recentre auto` asks)
    out.attrs["atlas_selection"] = is_atlas_selection(labels)
    out.attrs["candidates_recentred"] = selection_recentred(labels)
    return out

def class_index(df: pd.DataFrame, classes: Sequence[str] | bool | None) -> tuple[pd.DataFrame, list[str]]:
    """Add the output channel ``cls`` of every label; returns the table and the channel names.

    ``None``/``False``: one channel for all labels; ``True``/``"all"``: one per ``class`` value; or a
    list of class names (labels of other classes are dropped with a warning).
    """
    if classes is None or classes is False:
        out = df.copy()
        out["cls"] = 0
        names = sorted(set(df["class"]))
        return out, ["+".join(names) if len(names) <= 3 else "particle"]
    if classes is True or classes == "all":
        names = sorted(set(df["class"]))
    else:
        names = [str(c) for c in classes]
        missing = [c for c in names if c not in set(df["class"])]
        if missing:
            raise InputError(f"Class(es) {missing} have no labelled particles (labels have {sorted(set(df['class']))}).")
    out = df[df["class"].isin(names)].copy()
    dropped = len(df) - len(out)
    if dropped:
        logger.warning("ignoring %d labels of classes not in %s", dropped, names)
    out["cls"] = out["class"].map({c: i for i, c in enumerate(names)}).astype(np.int64)
    return out, names


def recentre_labels(col: Any, df: pd.DataFrame, radius: float, *, max_chunks: int = 64) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Labels moved onto their particle's density centre, one per particle (:mod:`milotile.ops.recentre`).

    Each label moves by a mean shift on its level-0 tomogram within ``radius`` (half the picker's box);
    labels of one tomogram and class that end closer than ``radius / 2`` (the picker's matching radius) are
    then one particle, kept as their mean. The particle contrast is measured once over all labels.

    Returns
    -------
    labels, info
        The new table (same columns; ``x, y, z`` replaced, merged rows dropped) and ``{"n_before", "n_after",
        "contrast", "moved", "kept", "median_shift", "max_shift"}`` for the run's record.
    """
    from milotile.ops.recentre import contrast_differences, density_centres, merge_close
    from milotile.ops.volume_reader import VolumeReader

    readers = {n: VolumeReader(col[n].data(level=0), n, max_chunks=max_chunks) for n in sorted(set(df["tomogram"]))}
    diffs = [d for n, g in df.groupby("tomogram") for d in contrast_differences(readers[n], g[["z", "y", "x"]].to_numpy(),
                                                                                radius)]
    sign = -1 if (not diffs or float(np.median(diffs)) < 0) else 1
    out = df.copy()
    totals = {"moved": 0, "kept": 0}
    shifts = []
    for n, g in df.groupby("tomogram"):
        zyx, info = density_centres(readers[n], g[["z", "y", "x"]].to_numpy(np.float64), radius, contrast=sign)
        out.loc[g.index, ["z", "y", "x"]] = zyx
        totals["moved"] += info["moved"]
        totals["kept"] += info["kept"]
        shifts.append(np.linalg.norm(zyx - g[["z", "y", "x"]].to_numpy(np.float64), axis=1))
    groups = out["tomogram"].astype(str) + "\0" + out["class"].astype(str)
    centres, members = merge_close(out[["z", "y", "x"]].to_numpy(np.float64), radius / 2.0, groups.to_numpy())
    first = np.unique(members, return_index=True)[1]
    merged = out.iloc[first].copy()
    merged[["z", "y", "x"]] = centres
    merged = merged.reset_index(drop=True)
    s = np.concatenate(shifts) if shifts else np.zeros(0)
    info = {"n_before": int(len(df)), "n_after": int(len(merged)), "contrast": "dark" if sign < 0 else "bright",
            **totals, "median_shift": round(float(np.median(s)), 2) if len(s) else 0.0,
            "max_shift": round(float(s.max()), 2) if len(s) else 0.0}
    logger.info("recentred %d labels on their particles' density (median shift %.1f voxels, %d left in place), "
                "%d after merging those closer than %.1f voxels", info["n_before"], info["median_shift"], info["kept"],
                info["n_after"], radius / 2.0)
    return merged, info


def _selection_params(path: str) -> dict:
    """The milotile parameters a selection parquet carries in its metadata (``{}`` when none)."""
    if not path.endswith(".parquet"):
        return {}
    try:
        import json

        import pyarrow.parquet as pq

        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(b"milotile", b"{}"))
    except (OSError, ValueError):  # not a readable parquet here (remote, or not ours): read_labels says why later
        return {}


def selection_recentred(labels: pd.DataFrame | str | os.PathLike[str]) -> float | list[float] | None:
    """The ``mine --recentre`` radius of the candidates an atlas selection was made of (``None``: DoG peaks as
    mined, not a selection, or not known): ``attrs["candidates_recentred"]`` of a table
    :func:`milotile.explore.select.save_selection` returned (or :func:`load_label_table` read), or the
    parameters of its parquet."""
    if isinstance(labels, pd.DataFrame):
        return labels.attrs.get("candidates_recentred")
    return _selection_params(os.fspath(labels)).get("candidates_recentred")


def is_atlas_selection(labels: pd.DataFrame | str | os.PathLike[str]) -> bool:
    """Whether ``labels`` are an atlas selection (``explore select`` or the atlas app): a table with the candidate
    ``id`` and ``cluster`` columns (or one :func:`load_label_table` read from a selection: ``attrs["atlas_selection"]``),
    or a parquet file whose milotile metadata names its atlas."""
    if isinstance(labels, pd.DataFrame):
        return bool(labels.attrs.get("atlas_selection")) or {"id", "cluster"} <= set(labels.columns)
    return "atlas" in _selection_params(os.fspath(labels))
