"""Shape measurements of one object from its binary mask (numpy / scikit-image / scipy only).

All lengths use ``spacing`` (the voxel size ``(z, y, x)``, Å, or 1 in voxel units), so anisotropic
voxels are measured correctly. Definitions (unit ``L`` = Å when the voxel size is known, else voxels):

============================  =====  ============================================================
feature                       unit   definition
============================  =====  ============================================================
voxels                        —      voxel count
volume                        L³     voxels × voxel volume
surface_area                  L²     marching-cubes (level 0.5) mesh area of the padded mask after a
                                     Gaussian of σ = 0.5 voxel (the raw staircase over-estimates a
                                     ball's area by 8-17 %, smoothed 1-6 %; EManalysis also missed
                                     the faces on the crop boundary)
sphericity                    1      π^⅓ (6V)^⅔ / A  (1 for a ball)
circularity                   1      EManalysis's mean over z-slices of 4πA/P² (skimage perimeter,
                                     pixels), clipped to 1 (tiny regions gave values above 1)
skeleton_length               L      summed length of the 26-neighbour links of the 3-D skeleton
                                     (skimage ``skeletonize``; EManalysis used a centroid polyline)
skeleton_branches             —      segments of the skeleton after removing junction voxels
skeleton_endpoints            —      skeleton voxels with one neighbour
axis_major/mid/minor          L      4·√λ of the voxel-coordinate covariance (regionprops' axis
                                     lengths of the equivalent ellipsoid), voxel extent included
elongation, flatness          1      major/mid and mid/minor
thickness_max, thickness_mean L      2 × max Euclidean distance to the background, and 2 × its mean
                                     on the skeleton (EDT with ``sampling = spacing``)
z_extent                      —      number of z-slices the object spans
============================  =====  ============================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = ["measure", "shape_cube", "surface_points", "FEATURE_UNITS"]

#: feature name -> power of the length unit (0 = dimensionless / count)
FEATURE_UNITS: dict[str, int] = {
    "voxels": 0, "volume": 3, "surface_area": 2, "sphericity": 0, "circularity": 0, "skeleton_length": 1,
    "skeleton_branches": 0, "skeleton_endpoints": 0, "axis_major": 1, "axis_mid": 1, "axis_minor": 1,
    "elongation": 0, "flatness": 0, "thickness_max": 1, "thickness_mean": 1, "z_extent": 0,
}

_OFFSETS = [(dz, dy, dx) for dz in (0, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dz, dy, dx) > (0, 0, 0)]


def _shifted_and(a: np.ndarray, off: Sequence[int]) -> int:
    """Number of voxels ``p`` with ``a[p]`` and ``a[p + off]`` both set."""
    sl_a, sl_b = [], []
    for o, n in zip(off, a.shape, strict=True):
        sl_a.append(slice(max(0, -o), n - max(0, o)))
        sl_b.append(slice(max(0, o), n - max(0, -o)))
    return int(np.count_nonzero(a[tuple(sl_a)] & a[tuple(sl_b)]))


def _skeleton(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, float, int, int]:
    from skimage.morphology import skeletonize

    skel = skeletonize(mask).astype(bool)
    if not skel.any():
        return skel, 0.0, 0, 0
    length = 0.0
    for off in _OFFSETS:
        n = _shifted_and(skel, off)
        if n:
            length += n * float(np.linalg.norm(np.asarray(off) * spacing))
    nb = ndimage.convolve(skel.astype(np.uint8), np.ones((3, 3, 3), np.uint8), mode="constant") - 1
    ends = int(np.count_nonzero(skel & (nb == 1)))
    junction = skel & (nb >= 3)
    _, branches = ndimage.label(skel & ~junction, structure=np.ones((3, 3, 3)))
    return skel, length, int(branches), ends


def _circularity(mask: np.ndarray) -> float:
    from skimage.measure import perimeter

    vals = []
    for sl in mask:
        a = int(np.count_nonzero(sl))
        if not a:
            continue
        p = float(perimeter(sl))
        vals.append(min(4 * math.pi * a / p**2, 1.0) if p > 0 else 1.0)
    return float(np.mean(vals)) if vals else 0.0


def measure(mask: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Any]:
    """Hand-crafted shape features of one object (see the module table for definitions and units).

    Parameters
    ----------
    mask : numpy.ndarray of bool
        The object's voxels inside its bounding box ``(z, y, x)``.
    spacing : (z, y, x)
        Voxel size.

    Returns
    -------
    dict
        Feature name -> value; plus ``_verts`` (marching-cubes vertices, physical units, for
        surface points) and ``_centre`` (physical centroid of the mask in the padded crop).
    """
    from skimage.measure import marching_cubes, mesh_surface_area

    sp = np.asarray(spacing, dtype=np.float64)
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    n = int(np.count_nonzero(m))
    vol = n * float(np.prod(sp))
    try:
        smooth = ndimage.gaussian_filter(np.pad(m, 1).astype(np.float32), 0.5)
        verts, faces, _, _ = marching_cubes(smooth, level=0.5, spacing=tuple(sp))
        verts -= sp  # undo the extra padding
        area = float(mesh_surface_area(verts, faces))
    except (ValueError, RuntimeError):
        verts, area = np.zeros((0, 3)), 0.0
    sph = float(math.pi ** (1 / 3) * (6 * vol) ** (2 / 3) / area) if area > 0 else 0.0
    coords = np.argwhere(m) * sp
    centre = coords.mean(axis=0)
    cov = np.cov(coords.T, bias=True) if n > 1 else np.zeros((3, 3))
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1] + float(np.mean(sp**2)) / 12.0
    axes = 4.0 * np.sqrt(np.maximum(lam, 0))
    skel, slen, branches, ends = _skeleton(m, sp)
    edt = ndimage.distance_transform_edt(m, sampling=sp)
    tmax = 2.0 * float(edt.max())
    tmean = 2.0 * float(edt[skel].mean()) if skel.any() else tmax
    return {
        "voxels": n, "volume": vol, "surface_area": area, "sphericity": sph, "circularity": _circularity(m),
        "skeleton_length": slen, "skeleton_branches": branches, "skeleton_endpoints": ends,
        "axis_major": float(axes[0]), "axis_mid": float(axes[1]), "axis_minor": float(axes[2]),
        "elongation": float(axes[0] / axes[1]), "flatness": float(axes[1] / axes[2]),
        "thickness_max": tmax, "thickness_mean": tmean, "z_extent": int(np.count_nonzero(m.any(axis=(1, 2)))),
        "_verts": verts, "_centre": centre,
    }


def shape_cube(mask: np.ndarray, spacing: Sequence[float], size: int) -> tuple[np.ndarray, float]:
    """The object's mask resampled into a ``size``³ cube, centred, isotropic, scaled to fit.

    The largest physical extent of the bounding box spans ``size - 2`` cube voxels (one voxel
    margin), the aspect ratio is kept, and values are linearly interpolated (soft edges) and
    stored as uint8 0..255. The physical size of a cube voxel is returned so that the absolute
    size stays available as a feature (``crop_scale``).

    Returns
    -------
    cube : numpy.ndarray
        ``(size, size, size)`` uint8.
    scale : float
        Physical length per cube voxel.
    """
    sp = np.asarray(spacing, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float32)
    extent = np.asarray(m.shape) * sp
    scale = float(extent.max() / max(size - 2, 1))
    centre = (np.asarray(m.shape) - 1) / 2.0  # in crop voxels
    g = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * scale
    zz, yy, xx = np.meshgrid(g / sp[0] + centre[0], g / sp[1] + centre[1], g / sp[2] + centre[2], indexing="ij")
    vals = ndimage.map_coordinates(m, [zz, yy, xx], order=1, cval=0.0, mode="constant")
    return np.clip(np.rint(vals * 255), 0, 255).astype(np.uint8), scale


def surface_points(verts: np.ndarray, centre: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, float]:
    """``n`` surface points (mesh vertices, drawn without replacement where possible), centred on
    the object's centroid and divided by their RMS radius (returned, so size stays a feature).

    Per-axis min-max normalisation, as in EManalysis, would destroy size and aspect ratio; a single
    isotropic scale keeps the aspect ratio.
    """
    if len(verts) == 0:
        return np.zeros((n, 3), np.float32), 0.0
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(verts), size=n, replace=len(verts) < n)
    p = verts[idx] - centre
    rms = float(np.sqrt(np.mean(np.sum((verts - centre) ** 2, axis=1))))
    return (p / max(rms, 1e-9)).astype(np.float32), rms
