"""Tilt handedness check: reproject the tomogram onto its tilt series and correlate.

A tomogram and its aligned tilt series agree on :func:`milotile.ops.geometry.project_points` up to
the handedness ``sign``; :func:`check_tilt_geometry` chooses it per tomogram (or rejects a tilt
series that does not belong to the tomogram).
"""

from __future__ import annotations

import logging
import math

import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from milotile.errors import InputError
from milotile.ops.geometry import TiltGeometry
from milotile.ops.grid import Grid
from milotile.ops.resample import bin_volume

__all__ = ["check_tilt_geometry", "reproject"]

logger = logging.getLogger(__name__)

def reproject(
    small: np.ndarray,
    small_grid: Grid,
    geom: TiltGeometry,
    tilt_index: int,
    sign: int,
    out_shape: tuple[int, int],
    tilt_bin: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Forward-project a (binned) volume onto one tilt by bilinear splatting.

    Returns the projection and the per-pixel ray weight, both ``out_shape`` in tilt pixels binned by
    ``tilt_bin``.
    """
    zz, yy, xx = np.indices(small.shape).reshape(3, -1)
    full = small_grid.to_level0(np.stack([zz, yy, xx], axis=1))[:, ::-1]
    g = TiltGeometry(
        data=geom.data, angles=geom.angles, full_shape=geom.full_shape, tilt_axis_angle=geom.tilt_axis_angle,
        sign=sign, pixel_ratio=geom.pixel_ratio, shifts=geom.shifts,
    )
    uv = g.project(full, np.array([tilt_index]))[:, 0]
    ub = (uv[:, 0] - (tilt_bin - 1) / 2) / tilt_bin
    vb = (uv[:, 1] - (tilt_bin - 1) / 2) / tilt_bin
    ny, nx = out_shape
    x0, y0 = np.floor(ub).astype(np.int64), np.floor(vb).astype(np.int64)
    fx, fy = ub - x0, vb - y0
    vals = small.reshape(-1).astype(np.float64)
    proj = np.zeros(ny * nx)
    wsum = np.zeros(ny * nx)
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + dy, x0 + dx
        ok = (yi >= 0) & (yi < ny) & (xi >= 0) & (xi < nx)
        lin = yi[ok] * nx + xi[ok]
        proj += np.bincount(lin, weights=w[ok] * vals[ok], minlength=ny * nx)
        wsum += np.bincount(lin, weights=w[ok], minlength=ny * nx)
    return proj.reshape(ny, nx), wsum.reshape(ny, nx)


def _bandpass(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return ndi.gaussian_filter(img, lo, mode="nearest") - ndi.gaussian_filter(img, hi, mode="nearest")


def check_tilt_geometry(
    volume: da.Array,
    geom: TiltGeometry,
    *,
    grid: Grid | None = None,
    name: str = "",
    n_angles: int = 4,
    max_side: int = 128,
    min_correlation: float = 0.3,
) -> dict:
    """Choose the projection handedness by reprojecting the tomogram and correlating with its tilts.

    The volume is mean-binned (chunk by chunk) until its largest side is at most ``max_side`` — so
    memory stays bounded whatever the tomogram size — and forward-projected with both signs onto up
    to ``n_angles`` tilts at large angles (near ±30° and ±50°). Projections and tilt images (binned
    alike) are band-passed and compared by Pearson correlation where the rays are complete.

    Parameters
    ----------
    volume : dask.array.Array
        The tomogram (any pyramid level; ``grid`` maps it to full resolution).
    geom : TiltGeometry
        Tilt series and geometry; its ``sign`` is ignored.
    grid : Grid, optional
        Mapping of ``volume`` to full resolution.
    name : str
        Tomogram name for messages.
    n_angles : int
        Number of tilts to compare.
    max_side : int
        Largest side of the binned volume.
    min_correlation : float
        Below this for both signs the tilt series is declared not to match.

    Returns
    -------
    dict
        ``{"sign", "correlation", "correlation_plus", "correlation_minus", "angles"}``.

    Raises
    ------
    InputError
        If neither sign correlates (the tilt series does not belong to the tomogram).
    """
    grid = grid or Grid()
    f = max(1, int(math.ceil(max(volume.shape) / max_side)))
    small = np.asarray(bin_volume(volume, f).compute(), np.float64) if f > 1 else np.asarray(volume.compute(), np.float64)
    sgrid = grid.then(Grid.binned(f))
    ang = np.asarray(geom.angles, np.float64)
    picks: list[int] = []
    for target in (50.0, -50.0, 30.0, -30.0, 40.0, -40.0, 20.0, -20.0):
        i = int(np.argmin(np.abs(ang - target)))
        if abs(ang[i] - target) <= 12 and abs(ang[i]) >= 10 and i not in picks:
            picks.append(i)
        if len(picks) >= n_angles:
            break
    if not picks:
        picks = [int(np.argmax(np.abs(ang)))]
    tb = max(1, int(round(f * grid.scale[2] * geom.pixel_ratio)))
    ty, tx = geom.data.shape[1:]
    out_shape = (ty // tb, tx // tb)
    tsel = geom.data[np.array(picks)][:, : out_shape[0] * tb, : out_shape[1] * tb]
    timgs = np.asarray(da.coarsen(np.mean, tsel.rechunk((1, -1, -1)), {1: tb, 2: tb}).compute(), np.float64)
    corr = {}
    for sign in (1, -1):
        cs = []
        for k, ti in enumerate(picks):
            proj, w = reproject(small, sgrid, geom, ti, sign, out_shape, tb)
            mask = w >= 0.9 * w.max()
            mask = ndi.binary_erosion(mask, iterations=3)
            if mask.sum() < 16:
                continue
            a = _bandpass(proj, 0.7, 4.0)[mask]
            b = _bandpass(timgs[k], 0.7, 4.0)[mask]
            if a.std() == 0 or b.std() == 0:
                continue
            cs.append(float(np.corrcoef(a, b)[0, 1]))
        corr[sign] = float(np.mean(cs)) if cs else float("nan")
    cp, cm = corr[1], corr[-1]
    label = f"tomogram {name!r}" if name else "the tomogram"
    if not (np.nanmax([cp, cm]) >= min_correlation):
        raise InputError(
            f"the tilt series of {label} does not match it: reprojections correlate at {cp:.3f} (sign +1) "
            f"and {cm:.3f} (sign -1), below {min_correlation}; check the tilt series, its angles and tilt axis"
        )
    sign = 1 if (np.isnan(cm) or cp >= cm) else -1
    if abs(cp - cm) < 0.02:
        logger.warning("%s: tilt handedness is ambiguous (correlation %.3f vs %.3f); using %+d", label, cp, cm, sign)
    logger.info("%s: tilt sign %+d (correlation %.3f, other sign %.3f)", label, sign, max(cp, cm), min(cp, cm))
    return {
        "sign": sign,
        "correlation": corr[sign],
        "correlation_plus": cp,
        "correlation_minus": cm,
        "angles": [float(ang[i]) for i in picks],
    }
