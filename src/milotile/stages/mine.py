"""``mine``: MiLoPYP candidate mining (DoG pyramid, local maxima, global threshold, NMS) into the store.

Reads ``derived/preprocessed/<name>`` when it exists (else the raw level-0 tomogram, with a
warning: the DoG and the relative threshold do not depend on an affine intensity change, but the
contrast clip is skipped), runs :func:`milotile.ops.peaks.dog_peaks` chunk by chunk in the processed
grid (``border`` and ``nms_distance`` are in voxels of that grid, as in MiLoPYP), converts the peaks
to full-resolution voxels and Å, moves each candidate onto its blob's density centre (``recentre``,
on by default; ``"off"`` keeps MiLoPYP's peaks) and writes ``tables/<table>.parquet`` with the columns
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
    recentre: float | str | None = "auto",
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
    recentre : float or "auto", optional
        Radius (level-0 voxels; about the largest particle's) of a mean shift that moves each candidate onto the
        centre of its blob's density on the level-0 tomogram (:func:`milotile.ops.recentre.density_centres`;
        particles dark, or bright with ``invert``), after which candidates closer than ``nms_distance`` (in
        level-0 voxels) are suppressed again, the higher DoG score kept. A DoG pyramid peaks on the lobes and
        shells of particles larger than its sigmas, off their centres. ``"auto"`` (default):
        :func:`auto_recentre_radius` of the largest sigma. ``None`` (or ``"off"``): MiLoPYP's candidates. The
        mean shift runs as Dask tasks (the candidates of one storage chunk each, with the sub-volume their
        windows cover).

    Returns
    -------
    pandas.DataFrame
        The candidate table (also written to the store).
    """
    recentre = _recentre_option(recentre)
    names = list(names) if names is not None else col.names
    if not names:
        raise missing_input(col.url, "tomograms", "tomograms")
    frames = []
    found = []
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
        found.append((t, zyx, df, grid))
    radii: dict[str, float] = {}
    if recentre is not None:
        radii = {t.name: (auto_recentre_radius(dog, grid) if recentre == "auto" else float(recentre))
                 for t, _, _, grid in found}
        found = _recentred(found, radii, invert, float(nms_distance))
    for t, zyx, df, _ in found:
        name = t.name
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
        "recentre": _radius_param(radii) if recentre is not None else None,
        "recentre_option": recentre,
        "nms_distance": float(nms_distance), "border": int(border), "border_z": int(border_z),
        "invert": bool(invert), "footprint": [int(v) for v in footprint], "top_k": top_k, "names": names,
    }
    col.write_table(table, result, params=params, sources=sources, written_only=True)
    return result


#: ``recentre="auto"``: the mean-shift radius in units of the largest DoG sigma (12 level-0 voxels at the
#: default sigmas 3, 5 and an unbinned grid). Chosen on the hard preset (largest radius 12) and look-alike
#: setting 3 (radii 5-8, where 12 beat 8: label-free F1 0.97 against 0.88); reported on look-alike settings
#: 0, 2, 4 and 5 (``benchmarks/label_free.py``, results/label_free_recentre_report_session14.json).
RECENTRE_PER_SIGMA = 2.4


def auto_recentre_radius(dog: Sequence[float], grid: Grid) -> float:
    """The ``recentre="auto"`` radius in level-0 voxels: :data:`RECENTRE_PER_SIGMA` times the largest DoG
    sigma, in the processed grid's in-plane voxels."""
    return float(RECENTRE_PER_SIGMA * max(float(v) for v in dog) * float(grid.scale[2]))


def _radius_param(radii: dict[str, float]) -> float | list[float] | None:
    """The recentring radius as recorded in the table's parameters (one value, or the distinct ones)."""
    vals = sorted(set(radii.values()))
    return None if not vals else vals[0] if len(vals) == 1 else vals


def _recentre_option(value: float | str | None) -> float | str | None:
    """``None`` (off), ``"auto"`` or a positive radius, from what the API or the CLI was given."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none", "")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = float("nan")
    if not (np.isfinite(r) and r > 0):
        raise InputError(f"--recentre must be a positive radius in voxels, 'auto' or 'off', got {value!r}.")
    return r


def _recentred(found: list, radii: dict[str, float], invert: bool, nms_distance: float) -> list:
    """Every tomogram's candidates moved onto their blobs' density centres (one Dask compute over all of them),
    then suppressed within ``nms_distance`` (processed-grid voxels, converted to level-0) by DoG score."""
    from milotile.ops.peaks import greedy_nms
    from milotile.ops.recentre import density_centre_tasks, gather_centres
    from milotile.runtime import compute_with_progress

    contrast = "bright" if invert else "dark"
    plans = [density_centre_tasks(t.data(0), zyx, radii[t.name], contrast=contrast) if len(zyx) else []
             for t, zyx, _, _ in found]
    n = sum(len(zyx) for _, zyx, _, _ in found)
    logger.info("mine: recentring %d candidates in %d tasks", n, sum(len(p) for p in plans))
    results = compute_with_progress([task for plan in plans for _, task in plan], desc="mine: recentre")
    out, k = [], 0
    for (t, zyx, df, grid), plan in zip(found, plans, strict=True):
        if not len(zyx):
            out.append((t, zyx, df, grid))
            continue
        moved, info = gather_centres(zyx, plan, results[k:k + len(plan)], contrast)
        k += len(plan)
        keep = np.sort(greedy_nms(moved, df["score"].to_numpy(np.float64), nms_distance * float(grid.scale[2])))
        logger.info("mine %s: %d candidates recentred (radius %.1f, median shift %.1f voxels, %d left in place), "
                    "%d after NMS", t.name, len(zyx), radii[t.name], info["median_shift"], info["kept"], len(keep))
        out.append((t, moved[keep], df.iloc[keep].reset_index(drop=True), grid))
    return out
