"""The positive-unlabeled class prior estimated from the data instead of a fixed ``tau``.

``tau`` is the fraction of *unlabelled output voxels* that are positives: (particles per output
voxel) x (positive voxels per particle). MiLoPYP fixes it (option 0.1, docs 0.01); both are far
too high for a 10 Å tomogram with a few dozen particles (about 1e-4 to 1e-3), and 0.1 makes the
picker call almost everything a particle.

:func:`estimate_prior` counts the positive voxels one particle's target holds
(:func:`milotile.refine.targets.crop_targets` at ``thresh``) and estimates the number of
particles in the labelled tomograms by a DoG of the labelled size: the peaks at least as strong as
the weaker labelled particles (``quantile`` of their DoG scores). Crowders of the same size make
this an over-estimate, never an under-estimate of the order of magnitude; the result is clipped to
``[lo, hi]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from milotile.refine.targets import crop_targets

logger = logging.getLogger(__name__)

__all__ = ["estimate_prior", "positive_voxels_per_particle"]


def positive_voxels_per_particle(geom: Any, thresh: float) -> int:
    """Number of output voxels at or above ``thresh`` in one isolated particle's target."""
    r = int(np.ceil(geom.radius / min(geom.stride[1:]))) + 3
    shape = (2 * r + 1,) * 3
    centre = np.array([[r * geom.stride[0], r * geom.stride[1], r * geom.stride[2]]], np.float64)
    tgt = crop_targets(centre, None, (0.0, 0.0, 0.0), shape, geom, n_classes=1, thresh=thresh, unlabeled=True)
    return max(int((tgt >= 1.0).sum()), 1)


def _count_like_labels(vol: Any, pts_zyx: np.ndarray, radius: float, quantile: float) -> int:
    from milotile.ops.peaks import dog_peaks

    pk = dog_peaks(vol, (radius / 2.0, radius), threshold_std=-10.0, min_distance=radius, border=(2, 4, 4))
    if len(pk) == 0:
        return len(pts_zyx)
    tree = cKDTree(pk[["z", "y", "x"]].to_numpy(np.float64))
    d, i = tree.query(pts_zyx, distance_upper_bound=radius / 2.0)
    ok = np.isfinite(d)
    if not ok.any():
        return len(pts_zyx)
    lab = pk["score"].to_numpy()[i[ok]]
    cut = float(np.quantile(lab, quantile))
    return max(int((pk["score"].to_numpy() >= cut).sum()), len(pts_zyx))


def estimate_prior(col: Any, labels: pd.DataFrame, bbox: float, geom: Any, thresh: float, *,
                   quantile: float = 0.25, lo: float = 1e-5, hi: float = 0.05,
                   tomograms: Sequence[str] | None = None) -> tuple[float, dict]:
    """PU class prior from the labelled tomograms.

    Parameters
    ----------
    col
        Collection.
    labels
        ``tomogram, x, y, z`` (level-0 voxels).
    bbox
        Particle box (diameter) in level-0 voxels.
    geom, thresh
        Target geometry and hard-positive threshold of the training run.
    quantile
        DoG peaks at least as strong as this quantile of the labelled particles' DoG scores count.
    lo, hi
        Clip range of the result.

    Returns
    -------
    tau, info
        The prior and the numbers it came from (``n_estimated``, ``voxels_per_particle``,
        ``output_voxels``).
    """
    names = sorted(set(labels["tomogram"])) if tomograms is None else list(tomograms)
    vpp = positive_voxels_per_particle(geom, thresh)
    n_est, n_out = 0, 0
    for n in names:
        t = col[n]
        pts = labels.loc[labels["tomogram"] == n, ["z", "y", "x"]].to_numpy(np.float64)
        n_est += _count_like_labels(t.data(0), pts, float(bbox) / 2.0, quantile)
        z, y, x = t.shape
        n_out += int(np.prod([np.ceil(z / geom.stride[0]), np.ceil(y / geom.stride[1]), np.ceil(x / geom.stride[2])]))
    tau = float(np.clip(n_est * vpp / max(n_out, 1), lo, hi))
    info = {"n_estimated": int(n_est), "voxels_per_particle": int(vpp), "output_voxels": int(n_out), "tau": tau}
    logger.info("class prior %.3g from %d estimated particles x %d voxels / %d output voxels", tau, n_est, vpp, n_out)
    return tau, info
