"""``mine``: MiLoPYP candidate mining (DoG pyramid, local maxima, global threshold, NMS) into the store.

Reads ``derived/preprocessed/<name>`` when it exists (else the raw level-0 tomogram, with a
warning: the DoG and the relative threshold do not depend on an affine intensity change, but the
contrast clip is skipped), runs :func:`milotile.ops.peaks.dog_peaks` chunk by chunk in the processed
grid (``border`` and ``nms_distance`` are in voxels of that grid, as in MiLoPYP), converts the peaks
to full-resolution voxels and Å, and writes ``tables/<table>.parquet`` with the columns
``tomogram, x, y, z, x_A, y_A, z_A, score, level``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.ops.grid import Grid
from milotile.ops.peaks import DOG_BLOCK, dog_peaks
from milotile.stages.preprocess import PREPROCESSED, preprocessed_volume, tomogram_sources
from milotile.store import missing_input

__all__ = ["mine", "CANDIDATE_COLUMNS"]

logger = logging.getLogger(__name__)

CANDIDATE_COLUMNS = ["tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "score", "level"]


def mine(
    col: Any,
    *,
    dog: Sequence[float] = (3.0, 5.0),
    threshold_std: float = 0.5,
    nms_distance: float = 7.0,
    border: int = 30,
    invert: bool = False,
    border_z: int = 10,
    footprint: Sequence[int] = (1, 3, 3),
    names: Sequence[str] | None = None,
    table: str = "candidates",
    top_k: int | None = None,
    chunks: Sequence[int] | None = None,
    recentre: float | None = None,
) -> pd.DataFrame:
    """Mine particle candidates in every tomogram and write ``tables/<table>.parquet``.

    Parameters
    ----------
    col : milotile.store.Collection
        The collection.
    dog : sequence of float
        Strictly increasing DoG sigmas (voxels of the processed grid); MiLoPYP default ``3, 5``.
    threshold_std : float
        Threshold ``mean + threshold_std * std`` of the positive local-maximum responses. When no
        candidate passes it (in any tomogram) :class:`InputError` says which threshold to lower and
        nothing is written.
    nms_distance : float
        NMS radius (voxels of the processed grid; MiLoPYP's ``min_distance`` 7).
    border : int
        Exclusion band in y and x (MiLoPYP: 30).
    invert : bool
        Bright particles instead of dark ones.
    border_z : int
        Exclusion band in z (MiLoPYP: 10 slices).
    footprint : sequence of int
        Local-maximum window ``(z, y, x)``; MiLoPYP's in-plane ``(1, 3, 3)``.
    names : sequence of str, optional
        Only these tomograms.
    table : str
        Output table name.
    top_k : int, optional
        At most this many candidates per tomogram.
    chunks : sequence of int, optional
        Processing block shape ``(z, y, x)`` of the DoG/peak tasks (``-1``: whole axis); default
        :data:`milotile.ops.peaks.DOG_BLOCK`. The candidates do not depend on it.
    recentre : float, optional
        Radius (level-0 voxels; about the largest particle's) of a mean shift that moves each candidate onto the
        centre of its blob's density on the level-0 tomogram (:func:`milotile.ops.recentre.density_centres`;
        particles dark, or bright with ``invert``), after which candidates closer than ``nms_distance`` (in
        level-0 voxels) are suppressed again, the higher DoG score kept. A DoG pyramid peaks on the lobes and
        shells of particles larger than its sigmas, off their centres; off by default (MiLoPYP's candidates).

    Returns
    -------
    pandas.DataFrame
        The candidate table (also written to the store).
    """
    if recentre is not None and not (np.isfinite(float(recentre)) and float(recentre) > 0):
        raise InputError(f"--recentre must be a positive radius in voxels, got {recentre!r}.")
    names = list(names) if names is not None else col.names
    if not names:
        raise missing_input(col.url, "tomograms", "tomograms")
    frames = []
    sources: dict[str, str | None] = {}
    for name in names:
        t = col[name]
        pre = preprocessed_volume(col, name)
        if pre is None:
            logger.warning("mine %s: no preprocessed volume, mining the raw tomogram (run `milotile preprocess`)", name)
            vol, grid = t.data(0), Grid()
            sources.update(tomogram_sources(col, name))
        else:
            vol, grid, _ = pre
            sources[f"{PREPROCESSED}/{name}"] = col.source_token(f"{PREPROCESSED}/{name}")
        df = dog_peaks(
            vol, tuple(dog), threshold_std=threshold_std, min_distance=nms_distance,
            border=(int(border_z), int(border), int(border)), invert=invert, footprint=tuple(footprint), top_k=top_k,
            chunks=DOG_BLOCK if chunks is None else tuple(chunks),
        )
        zyx = grid.to_level0(df[["z", "y", "x"]].to_numpy())
        full = np.array(t.shape, dtype=np.float64) - 1
        zyx = np.clip(zyx, 0, full)  # a lone last compressed slice maps back to Z - 1
        if recentre and len(zyx):
            zyx, df = _recentred(t, zyx, df, float(recentre), invert, float(nms_distance) * float(grid.scale[2]))
        vs = t.voxel_size
        out = pd.DataFrame({
            "tomogram": name,
            "x": zyx[:, 2], "y": zyx[:, 1], "z": zyx[:, 0],
            "x_A": zyx[:, 2] * vs, "y_A": zyx[:, 1] * vs, "z_A": zyx[:, 0] * vs,
            "score": df["score"].to_numpy(), "level": df["level"].to_numpy(),
        })
        logger.info("mine %s: %d candidates", name, len(out))
        frames.append(out)
    result = pd.concat(frames, ignore_index=True)[CANDIDATE_COLUMNS] if frames else pd.DataFrame(columns=CANDIDATE_COLUMNS)
    if not len(result):  # an empty table would only fail later, far from its cause: refuse here, write nothing
        raise InputError(
            f"mining found 0 candidates in {len(names)} tomogram(s) above mean + {threshold_std:g} std of the DoG "
            f"responses; lower --threshold-std (or --border {border} / --border-z {border_z}, or try --invert)"
        )
    params = {
        "stage": "mine", "dog": [float(v) for v in dog], "threshold_std": float(threshold_std),
        "recentre": None if not recentre else float(recentre),
        "nms_distance": float(nms_distance), "border": int(border), "border_z": int(border_z),
        "invert": bool(invert), "footprint": [int(v) for v in footprint], "top_k": top_k, "names": names,
    }
    col.write_table(table, result, params=params, sources=sources, written_only=True)
    return result


def _recentred(t: Any, zyx: np.ndarray, df: pd.DataFrame, radius: float, invert: bool,
               distance: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Candidates of tomogram ``t`` moved onto their blobs' density centres, then suppressed within ``distance``
    (level-0 voxels) by DoG score; returns the kept positions and rows of ``df``."""
    from milotile.ops.peaks import greedy_nms
    from milotile.ops.recentre import density_centres
    from milotile.ops.volume_reader import VolumeReader

    moved, info = density_centres(VolumeReader(t.data(0), t.name, max_chunks=64), zyx, radius,
                                  contrast="bright" if invert else "dark")
    keep = np.sort(greedy_nms(moved, df["score"].to_numpy(np.float64), distance))
    logger.info("mine %s: %d candidates recentred (median shift %.1f voxels, %d left in place), %d after NMS",
                t.name, len(zyx), info["median_shift"], info["kept"], len(keep))
    return moved[keep], df.iloc[keep].reset_index(drop=True)
