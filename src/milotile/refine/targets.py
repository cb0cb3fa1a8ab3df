"""Heatmap targets built per crop on the model output grid (never as a whole-volume array).

A particle at level-0 position ``(x, y, z)`` gets an isotropic Gaussian ``exp(-d² / 2σ²)`` where ``d``
is the physical distance (level-0 voxels) between the particle and the centre of an output voxel.
``σ`` and the cut-off radius follow MiLoPYP/CenterNet from ``bbox`` (see :func:`target_geometry`).
Values ``>= thresh`` and the output voxel nearest to the particle become hard positives (1), the other
voxels inside the radius are soft positives (0 < g < 1), and every other voxel is UNLABELED (-1) in
training crops (0 = background in validation targets). With several classes each class has its own
channel; a particle only marks its own channel.

Output voxel ``k`` along an axis sits at level-0 position ``origin + k * stride + offset``: in y and x
the stride is ``down_ratio`` (2) and the offset 0 (the centre of the stride-2 stem's window); in z the
stride is 1, or 2 with offset 0.5 when slices are compressed in pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["gaussian_radius", "TargetGeometry", "target_geometry", "crop_targets", "NEGATIVE", "UNLABELED"]

#: Target value of unlabeled voxels (training crops).
UNLABELED = -1.0
#: Target value of labelled-negative voxels: within the target radius of a coordinate known not to be
#: the target (``refine train --negatives``), and not inside any particle's radius.
NEGATIVE = -2.0


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the smallest of the three roots that keep IoU >= ``min_overlap``.

    Parameters
    ----------
    height, width
        Box size (output-grid voxels).
    min_overlap
        Required IoU between a shifted box and the true box.
    """
    a1 = 1.0
    b1 = height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2 = 4.0
    b2 = 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


@dataclass(frozen=True)
class TargetGeometry:
    """Geometry of the target Gaussians, all lengths in level-0 voxels.

    Attributes
    ----------
    sigma : float
        Gaussian sigma.
    radius : float
        Cut-off radius (values beyond are unlabeled).
    stride : tuple of int
        Output stride (z, y, x).
    offset : tuple of float
        Level-0 position of output voxel 0 relative to the crop origin (z, y, x).
    """

    sigma: float
    radius: float
    stride: tuple[int, int, int]
    offset: tuple[float, float, float]


def target_geometry(bbox: float, down_ratio: int = 2, compress: bool = False) -> TargetGeometry:
    """Sigma and radius from ``bbox`` as in MiLoPYP (CenterNet radius on the output grid).

    ``h = bbox / down_ratio``, ``r = int(gaussian_radius(h, h, 0.7))``, ``σ_out = (2r + 1) / 6``;
    in level-0 voxels ``σ = σ_out · down_ratio`` and the radius is ``(r + 0.5) · down_ratio``.
    """
    h = float(bbox) / down_ratio
    r = max(int(gaussian_radius(h, h, 0.7)), 1)
    sigma = (2 * r + 1) / 6.0 * down_ratio
    zs = 2 if compress else 1
    return TargetGeometry(
        sigma=sigma,
        radius=(r + 0.5) * down_ratio,
        stride=(zs, down_ratio, down_ratio),
        offset=(0.5 if compress else 0.0, 0.0, 0.0),
    )


def crop_targets(
    points_zyx: np.ndarray,
    point_class: np.ndarray | None,
    origin_zyx: Sequence[float],
    out_shape: Sequence[int],
    geom: TargetGeometry,
    *,
    n_classes: int = 1,
    thresh: float = 0.8,
    unlabeled: bool = True,
    negatives_zyx: np.ndarray | None = None,
) -> np.ndarray:
    """Target heatmap of one crop.

    Parameters
    ----------
    points_zyx
        ``(N, 3)`` particle positions (z, y, x) in level-0 voxels, already in the crop's frame or
        absolute (anything far outside the crop is ignored).
    point_class
        ``(N,)`` channel index of each particle (None = all 0).
    origin_zyx
        Level-0 position of the crop's first voxel (same frame as ``points_zyx``).
    out_shape
        ``(D', H', W')`` of the model output for the crop.
    geom
        From :func:`target_geometry`.
    n_classes
        Number of channels.
    thresh
        Gaussian value from which a voxel is a hard positive.
    unlabeled
        True: voxels outside every particle are -1 (training); False: 0 (validation).
    negatives_zyx
        ``(M, 3)`` positions known not to be particles (same frame as ``points_zyx``): with ``unlabeled``,
        the output voxels within ``geom.radius`` of each that lie in no particle's radius become
        :data:`NEGATIVE` in every channel.

    Returns
    -------
    numpy.ndarray
        float32 ``(n_classes, D', H', W')``.
    """
    out_shape = tuple(int(s) for s in out_shape)
    heat = np.zeros((n_classes, *out_shape), dtype=np.float32)
    pts = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    cls = np.zeros(len(pts), np.int64) if point_class is None else np.asarray(point_class, np.int64)
    stride = np.asarray(geom.stride, np.float64)
    off = np.asarray(origin_zyx, np.float64) + np.asarray(geom.offset, np.float64)
    rad = geom.radius
    two_s2 = 2.0 * geom.sigma**2
    shape = np.asarray(out_shape)
    for p, c in zip(pts, cls, strict=True):
        k = (p - off) / stride  # fractional output index of the particle
        lo = np.floor(k - rad / stride).astype(int) + 1
        hi = np.ceil(k + rad / stride).astype(int)
        lo_c = np.maximum(lo, 0)
        hi_c = np.minimum(hi, shape)
        if np.any(hi_c <= lo_c):
            continue
        axes = [(np.arange(lo_c[a], hi_c[a]) * stride[a] + off[a] - p[a]) ** 2 for a in range(3)]
        d2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
        g = np.exp(-d2 / two_s2)
        g[d2 > rad * rad] = 0.0
        g[g >= thresh] = 1.0
        near = np.rint(k).astype(int)
        if np.all((near >= 0) & (near < shape)):
            g[tuple(near - lo_c)] = 1.0
        sl = (int(c),) + tuple(slice(int(a), int(b)) for a, b in zip(lo_c, hi_c, strict=True))
        np.maximum(heat[sl], g.astype(np.float32), out=heat[sl])
    if unlabeled:
        heat[heat <= 0] = UNLABELED
        if negatives_zyx is not None and len(negatives_zyx):
            near = _near_points(np.asarray(negatives_zyx, np.float64).reshape(-1, 3), off, stride, shape, rad)
            heat[:, near & (heat < 0).all(axis=0)] = NEGATIVE
    return heat


def _near_points(pts: np.ndarray, off: np.ndarray, stride: np.ndarray, shape: np.ndarray, rad: float) -> np.ndarray:
    """Output voxels within ``rad`` (level-0 voxels) of any of ``pts``, as a boolean ``shape`` mask."""
    mask = np.zeros(tuple(shape), bool)
    for p in pts:
        k = (p - off) / stride
        lo = np.maximum(np.floor(k - rad / stride).astype(int) + 1, 0)
        hi = np.minimum(np.ceil(k + rad / stride).astype(int), shape)
        if np.any(hi <= lo):
            continue
        axes = [(np.arange(lo[a], hi[a]) * stride[a] + off[a] - p[a]) ** 2 for a in range(3)]
        d2 = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= d2 <= rad * rad
    return mask
