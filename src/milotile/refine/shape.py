"""Shape check of the picks: radial density profiles compared with the labelled particles'.

A 2.5D U-Net trained from a handful of labels learns "a blob at least this big" faster than the
particle's shape: on the hard benchmark (``benchmarks/refine_hard.py``) nearly all of its false
positives sit on crowders of the same or a slightly larger size, scored as high as the particles.
The check measures what the network sees poorly, the particle's extent and mass distribution:

* every peak and every labelled particle gets its **radial profile**: the mean density in
  one-voxel spherical shells from the centre out to 1.6 particle radii, after subtracting the mean
  of the shell 1.3-1.6 radii out (the local background, so ice gradients cancel) and dividing by
  the tomogram's standard deviation. Averaging whole shells keeps it stable at SNR 0.1 and makes it
  independent of the particle's orientation;
* the labels' profiles give a Gaussian model (mean and Ledoit-Wolf shrunk covariance, usable from
  a handful of labels); a peak's squared Mahalanobis distance ``d2`` to it is scaled by the
  median leave-one-out distance of the labels themselves (``scale``), so ``d2 / scale`` is about 1
  for a typical particle whatever the number of labels or profile length;
* the peak's score is lowered in logit units by ``weight · clip(d2 / scale − 1, 0, cap)``: peaks
  shaped like the labels keep their score, others lose up to ``weight · cap``. The automatic
  threshold (:mod:`milotile.refine.threshold`) is then chosen on the checked scores as before;
* a peak on a training label is given (at least) that label's *leave-one-out* distance: the model
  fits its own labels better than the particles it has not seen, and the automatic threshold
  estimates the recall from the labels' scores, so in-sample distances would make it too strict
  (on the hard benchmark with 6 labels: F1 0.58 instead of 0.88 for one seed).

Measured on the hard benchmark (big species, 6 and 18 labels, three seeds; the table in
``benchmarks/results/refine_hard.json``): see :data:`SHAPE_WEIGHT`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["SHAPE_CAP", "SHAPE_COLUMNS", "SHAPE_WEIGHT", "ShapeModel", "apply_shape_check", "fit_shape_models",
           "radial_profiles", "shape_checked"]

#: Logit units a peak loses per unit of ``d2 / scale − 1``.
SHAPE_WEIGHT = 0.75
#: Largest penalty, in units of ``SHAPE_WEIGHT``.
SHAPE_CAP = 4.0
#: Columns the check adds to a picks table.
SHAPE_COLUMNS = ["score_model", "shape_d2"]
#: Fewest labels of a class for a shape model (fewer: that class is not checked).
MIN_LABELS = 4
#: Outer edge of the profile and the background shell, in particle radii.
PROFILE_EXTENT = 1.6
BACKGROUND_SHELL = (1.3, 1.6)


class _Geometry:
    """Shell index of every voxel of the box around a point, for one radius."""

    def __init__(self, radius: float) -> None:
        if not radius > 0:
            raise InputError(f"the shape check needs a positive particle radius, got {radius!r}")
        self.radius = float(radius)
        self.n_shells = max(int(np.ceil(PROFILE_EXTENT * radius)), 2)
        self.half = self.n_shells + 1
        g = np.arange(-self.half, self.half + 1, dtype=np.float32)
        rho = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
        shell = np.floor(rho).astype(np.int64).ravel()
        shell[shell >= self.n_shells] = self.n_shells  # one bin for everything outside
        self.shell = shell
        self.counts = np.bincount(shell, minlength=self.n_shells + 1)[: self.n_shells].astype(np.float64)
        lo, hi = BACKGROUND_SHELL
        self.background = ((rho >= lo * radius) & (rho <= hi * radius)).ravel()
        self.size = (2 * self.half + 1,) * 3


def radial_profiles(reader: Any, points_zyx: np.ndarray, radius: float, std: float) -> np.ndarray:
    """Background-subtracted radial density profiles around points of one tomogram.

    Parameters
    ----------
    reader : VolumeReader
        Reader of the level-0 tomogram (:class:`milotile.refine.data.VolumeReader`).
    points_zyx : ndarray, shape (n, 3)
        Level-0 voxel coordinates (rounded to the nearest voxel).
    radius : float
        Particle radius in level-0 voxels.
    std : float
        The tomogram's standard deviation (profiles are in its units).

    Returns
    -------
    ndarray, shape (n, ceil(1.6 radius))
        Mean density of each one-voxel shell minus the mean of the 1.3-1.6 radius shell.
    """
    geo = _Geometry(radius)
    pts = np.rint(np.asarray(points_zyx, np.float64).reshape(-1, 3)).astype(np.int64)
    out = np.empty((len(pts), geo.n_shells), np.float64)
    scale = 1.0 / max(float(std), 1e-12)
    for i, c in enumerate(pts):
        box = reader.read(c - geo.half, geo.size).ravel().astype(np.float64)
        sums = np.bincount(geo.shell, weights=box, minlength=geo.n_shells + 1)[: geo.n_shells]
        out[i] = (sums / geo.counts - box[geo.background].mean()) * scale
    return out


@dataclass
class ShapeModel:
    """Gaussian model of the labelled particles' radial profiles (see the module notes).

    Attributes
    ----------
    radius : float
        Particle radius (level-0 voxels) the profiles are taken at.
    mean, precision : ndarray
        Profile mean and inverse (shrunk) covariance.
    scale : float
        Median leave-one-out ``d2`` of the labels.
    weight, cap : float
        Penalty ``weight · clip(d2 / scale − 1, 0, cap)`` in logit units.
    n_labels : int
        Labels the model was fitted on.
    labels : list
        ``[tomogram, z, y, x, leave-one-out d2]`` of each label (when fitted with ``points``).
    """

    radius: float
    mean: np.ndarray
    precision: np.ndarray
    scale: float
    weight: float = SHAPE_WEIGHT
    cap: float = SHAPE_CAP
    n_labels: int = 0
    labels: list | None = None

    @classmethod
    def fit(cls, profiles: np.ndarray, radius: float, *, points: pd.DataFrame | None = None,
            weight: float = SHAPE_WEIGHT, cap: float = SHAPE_CAP) -> ShapeModel:
        """Fit the model to the labels' profiles (at least :data:`MIN_LABELS` rows); ``points``
        (``tomogram, z, y, x``, one row per profile) are kept with their leave-one-out distances."""
        x = np.asarray(profiles, np.float64)
        if x.ndim != 2 or len(x) < MIN_LABELS:
            raise InputError(f"a shape model needs at least {MIN_LABELS} labelled profiles, got {len(x)}")
        mean, prec = _gaussian(x)
        loo = []
        for i in range(len(x)):
            m_i, p_i = _gaussian(np.delete(x, i, axis=0))
            v = x[i] - m_i
            loo.append(float(v @ p_i @ v))
        scale = max(float(np.median(loo)), 1e-9)
        rows = None
        if points is not None:
            if len(points) != len(x):
                raise InputError(f"{len(points)} label points for {len(x)} profiles")
            rows = [[str(t), float(z), float(y), float(xx), d]
                    for t, z, y, xx, d in zip(points["tomogram"], points["z"], points["y"], points["x"], loo, strict=True)]
        return cls(float(radius), mean, prec, scale, float(weight), float(cap), len(x), rows)

    def d2(self, profiles: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each profile to the labels' mean."""
        v = np.asarray(profiles, np.float64) - self.mean
        return np.einsum("ij,jk,ik->i", v, self.precision, v)

    def penalty(self, d2: np.ndarray) -> np.ndarray:
        """Logit units each peak loses, from its distance ``d2`` (:meth:`d2` or :meth:`peak_d2`)."""
        rel = np.asarray(d2, np.float64) / self.scale - 1.0
        return self.weight * np.clip(rel, 0.0, self.cap)

    def peak_d2(self, profiles: np.ndarray, tomogram: str, points_zyx: np.ndarray) -> np.ndarray:
        """``d2`` of peaks of one tomogram, raised to the leave-one-out distance of a label within half
        a radius (see the module notes)."""
        d2 = self.d2(profiles)
        mine = [r for r in (self.labels or []) if r[0] == str(tomogram)]
        if mine and len(d2):
            from scipy.spatial import cKDTree

            lab = np.asarray([r[1:4] for r in mine], np.float64)
            dist, j = cKDTree(lab).query(np.asarray(points_zyx, np.float64).reshape(-1, 3))
            close = dist <= self.radius / 2
            loo = np.asarray([r[4] for r in mine], np.float64)
            d2[close] = np.maximum(d2[close], loo[j[close]])
        return d2

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the picker's contract."""
        return {"radius": self.radius, "mean": self.mean.tolist(), "precision": self.precision.tolist(),
                "scale": self.scale, "weight": self.weight, "cap": self.cap, "n_labels": self.n_labels,
                "labels": self.labels or []}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShapeModel:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["radius"]), np.asarray(d["mean"], np.float64), np.asarray(d["precision"], np.float64),
                   float(d["scale"]), float(d.get("weight", SHAPE_WEIGHT)), float(d.get("cap", SHAPE_CAP)),
                   int(d.get("n_labels", 0)), list(d.get("labels") or []))


def _gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    return lw.location_, np.linalg.pinv(lw.covariance_)


def fit_shape_models(readers: Mapping[str, Any], stds: Mapping[str, float], labels: pd.DataFrame,
                     classes: Sequence[str], radius: float, *, weight: float = SHAPE_WEIGHT,
                     cap: float = SHAPE_CAP) -> dict[str, dict[str, Any]]:
    """One shape model per class with enough labels (as contract dictionaries).

    ``labels`` carries ``tomogram, x, y, z`` and the channel index ``cls`` (as the trainer makes it;
    without it every label is of ``classes[0]``).
    """
    cls_idx = labels["cls"].to_numpy() if "cls" in labels else np.zeros(len(labels), np.int64)
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        sel = labels[cls_idx == k]
        if len(sel) < MIN_LABELS:
            logger.info("class %s: %d labels, too few for the shape check (at least %d); not checked",
                        name, len(sel), MIN_LABELS)
            continue
        groups = list(sel.groupby("tomogram", sort=True))
        prof = np.concatenate([radial_profiles(readers[t], g[["z", "y", "x"]].to_numpy(), radius, stds[t])
                               for t, g in groups])
        points = pd.concat([g for _, g in groups])[["tomogram", "z", "y", "x"]]
        out[str(name)] = ShapeModel.fit(prof, radius, points=points, weight=weight, cap=cap).to_dict()
    return out


def apply_shape_check(picks: pd.DataFrame, reader: Any, std: float, models: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Lower the scores of one tomogram's picks by their shape penalty.

    Adds ``score_model`` (the network's score) and ``shape_d2`` (``d2 / scale``; NaN for classes
    without a model) and returns the picks sorted as before. Scores stay in (0, 1).
    """
    out = picks.copy()
    out["score_model"] = out["score"].astype(np.float64)
    out["shape_d2"] = np.nan
    if not len(out):
        return out
    names = out["tomogram"].unique() if "tomogram" in out else ["?"]
    if len(names) != 1:
        raise InputError(f"apply_shape_check takes the picks of one tomogram, got {len(names)}")
    tomogram = str(names[0])
    for cls, g in out.groupby("class", sort=False):
        spec = models.get(str(cls))
        if spec is None:
            continue
        model = ShapeModel.from_dict(spec)
        pts = g[["z", "y", "x"]].to_numpy()
        prof = radial_profiles(reader, pts, model.radius, std)
        d2 = model.peak_d2(prof, tomogram, pts)
        s = np.clip(g["score"].to_numpy(np.float64), 1e-7, 1 - 1e-7)
        logit = np.log(s / (1 - s)) - model.penalty(d2)
        out.loc[g.index, "score"] = 1.0 / (1.0 + np.exp(-logit))
        out.loc[g.index, "shape_d2"] = d2 / model.scale
    return out


def shape_checked(col: Any, name: str, picks: pd.DataFrame, contract: Mapping[str, Any],
                  threshold: float | None = None) -> pd.DataFrame:
    """``picks`` of tomogram ``name`` with the picker's shape check applied (unchanged without one).

    The picker's contract holds the models (``contract["shape"]``, written by
    :func:`milotile.refine.train`); ``threshold`` (the ``score > threshold`` rule of ``pick``) is
    applied again to the checked scores.
    """
    models = (contract or {}).get("shape") or {}
    if not models or not len(picks):
        return picks
    from milotile.refine.data import VolumeReader
    from milotile.stages.preprocess import volume_stats

    t = col[name]
    out = apply_shape_check(picks, VolumeReader(t.data(0), name), volume_stats(col, name)[1], models)
    if threshold is not None:
        out = out[out["score"] > float(threshold)]
    return out.reset_index(drop=True)
