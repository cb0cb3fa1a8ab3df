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

**Footing.** The labels' descriptors are taken, at pick time, at the pick nearest each label (within half a
radius; :meth:`ShapeReference.on_peaks`), so labels and peaks are measured the same way: a label one or two
voxels off the network's peak has a descriptor unlike every unseen particle's peak, and the check then lowered
them all to its cap. Re-scored on 31 saved pickers (``results/shape_footing_session13.json``): mean F1 at the
automatic threshold on the tuning runs (look-alike settings 0-2, hard seed 0) 0.349 → 0.383 (8 better, 3 worse);
on the report runs hard seeds 1-2 0.568 → 0.612, look-alike settings 3-5 0.383 → 0.383 (1 better, 4 worse), the
label-free chain on look-alike setting 3 0.299 → 0.451 (its recentred selection: 0.10 → 0.69).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.refine.threshold import AUTO_FLOOR

logger = logging.getLogger(__name__)

__all__ = ["SHAPE_CAP", "SHAPE_COLUMNS", "SHAPE_VERSION", "SHAPE_WEIGHT", "ShapeModel", "ShapeReference",
           "apply_shape_check", "check_shapes", "fit_shape_models", "fit_shape_references", "radial_profiles",
           "shape_descriptors"]

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
#: Version 2: logit units per unit of log density ratio below the labels' median, and the largest penalty.
SHAPE_WEIGHT_V2 = 0.5
SHAPE_CAP_V2 = 8.0


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
        # the voxels any shell or the background uses, and the float32 matrix averaging them per shell (columns
        # 0..n_shells-1) and over the background shell (last column): 2.8 MB for a radius of 12 voxels
        inner = (shell < self.n_shells) | self.background
        self.inner = np.flatnonzero(inner)
        sh = shell[self.inner]
        means = np.zeros((self.inner.size, self.n_shells + 1), np.float32)
        rows = np.flatnonzero(sh < self.n_shells)
        means[rows, sh[rows]] = 1.0 / self.counts[sh[rows]]
        bg = np.flatnonzero(self.background[self.inner])
        means[bg, self.n_shells] = 1.0 / max(bg.size, 1)
        self.means = means


#: Boxes whose shell moments are computed together (64 boxes of a radius-12 particle: 8.6 MB of voxels).
SHELL_BATCH = 64


def _shell_moments(reader: Any, pts: np.ndarray, geo: _Geometry, squares: bool) -> Iterator[tuple[slice, np.ndarray,
                                                                                                   np.ndarray | None]]:
    """Per batch of points: the batch's rows, the mean of each shell and of the background shell
    ``(b, n_shells + 1)``, each box's values minus the box's mean, and (``squares``) the mean square of each
    shell of those centred values ``(b, n_shells)``.

    Boxes are read as :meth:`VolumeReader.read` reads them (edge-padded at the volume's faces, NaN refused);
    a batch's moments are two float32 matrix products (centring keeps float32 sums exact to ~1e-6 of the
    tomogram's standard deviation). Two weighted bincounts per point took 1.5 CPU ms per peak (4.5 of a
    25 M-voxel pick's 19 CPU s with one TTA view in bf16; ``benchmarks/refine_pick.py --speed``).
    """
    n = geo.n_shells
    for a in range(0, len(pts), SHELL_BATCH):
        rows = slice(a, min(a + SHELL_BATCH, len(pts)))
        boxes = np.empty((rows.stop - a, geo.inner.size), np.float32)
        for j, c in enumerate(pts[rows]):
            boxes[j] = reader.read(c - geo.half, geo.size).ravel()[geo.inner]
        boxes -= boxes.mean(axis=1, keepdims=True)
        means = (boxes @ geo.means).astype(np.float64)
        sq = (np.square(boxes) @ geo.means[:, :n]).astype(np.float64) if squares else None
        yield rows, means, sq


def radial_profiles(reader: Any, points_zyx: np.ndarray, radius: float, std: float) -> np.ndarray:
    """Background-subtracted radial density profiles around points of one tomogram.

    Parameters
    ----------
    reader : VolumeReader
        Reader of the level-0 tomogram (:class:`milotile.ops.volume_reader.VolumeReader`).
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
    n = geo.n_shells
    out = np.empty((len(pts), n), np.float64)
    scale = 1.0 / max(float(std), 1e-12)
    for rows, means, _ in _shell_moments(reader, pts, geo, squares=False):
        out[rows] = (means[:, :n] - means[:, n:]) * scale
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


def _labels_by_class(labels: pd.DataFrame, classes: Sequence[str]) -> Iterator[tuple[str, list]]:
    """``(class name, [(tomogram, its labels), ...])`` of each class with at least :data:`MIN_LABELS` labels
    (channel index ``cls``; without it every label is of ``classes[0]``); the others are logged."""
    cls_idx = labels["cls"].to_numpy() if "cls" in labels else np.zeros(len(labels), np.int64)
    for k, name in enumerate(classes):
        sel = labels[cls_idx == k]
        if len(sel) < MIN_LABELS:
            logger.info("class %s: %d labels, too few for the shape check (at least %d); not checked",
                        name, len(sel), MIN_LABELS)
            continue
        yield str(name), list(sel.groupby("tomogram", sort=True))


def fit_shape_models(readers: Mapping[str, Any], stds: Mapping[str, float], labels: pd.DataFrame,
                     classes: Sequence[str], radius: float, *, weight: float = SHAPE_WEIGHT,
                     cap: float = SHAPE_CAP) -> dict[str, dict[str, Any]]:
    """One shape model per class with enough labels (as contract dictionaries).

    ``labels`` carries ``tomogram, x, y, z`` and the channel index ``cls`` (as the trainer makes it;
    without it every label is of ``classes[0]``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, groups in _labels_by_class(labels, classes):
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


# ---------------------------------------------------------------------------------------------- version 2
#: Version of the shape check written by :func:`fit_shape_references` (1: radial profiles and a
#: distance to the labels' Gaussian, :class:`ShapeModel`; still applied for older pickers).
SHAPE_VERSION = 2


def shape_descriptors(reader: Any, points_zyx: np.ndarray, radius: float, std: float) -> np.ndarray:
    """Orientation-free shape descriptors around points of one tomogram.

    For each one-voxel spherical shell out to 1.6 particle radii: the shell's mean density minus the
    mean of the 1.3-1.6 radius shell (the radial profile of :func:`radial_profiles`) and the standard
    deviation of the voxels within the shell (the *angular* variation: zero for a sphere, large for
    a ring, a rod or a dumbbell of the same size). Both are in units of the tomogram's standard
    deviation ``std``.

    Returns
    -------
    ndarray, shape (n, 2 * ceil(1.6 radius))
        Profile, then angular standard deviation, per shell.
    """
    geo = _Geometry(radius)
    pts = np.rint(np.asarray(points_zyx, np.float64).reshape(-1, 3)).astype(np.int64)
    n = geo.n_shells
    out = np.empty((len(pts), 2 * n), np.float64)
    scale = 1.0 / max(float(std), 1e-12)
    for rows, means, sq in _shell_moments(reader, pts, geo, squares=True):
        mean = means[:, :n]
        out[rows, :n] = (mean - means[:, n:]) * scale
        out[rows, n:] = np.sqrt(np.maximum(sq - mean * mean, 0.0)) * scale
    return out


class _Gauss:
    """Gaussian with a Ledoit-Wolf shrunk covariance: log-density of rows."""

    def __init__(self, x: np.ndarray) -> None:
        from sklearn.covariance import LedoitWolf

        lw = LedoitWolf().fit(np.asarray(x, np.float64))
        self.mean = lw.location_
        sign, logdet = np.linalg.slogdet(lw.covariance_)
        if sign <= 0:
            raise InputError("the shape check's covariance is singular (identical descriptors?)")
        self.precision = np.linalg.inv(lw.covariance_)
        self.logdet = float(logdet)

    def logpdf(self, x: np.ndarray) -> np.ndarray:
        v = np.asarray(x, np.float64) - self.mean
        return -0.5 * (np.einsum("ij,jk,ik->i", v, self.precision, v) + self.logdet)


@dataclass
class ShapeReference:
    """The labelled particles' shape descriptors of one class (the contract's version-2 shape check).

    At pick time :meth:`log_ratio` compares each peak's descriptor under a Gaussian of the labels with
    one of *all* peaks of that class in the picked tomograms (particles and everything else the network
    fires on: other species, crowders, membranes). Their log ratio estimates, up to a constant, the
    log-odds that a peak is shaped like the labels (the positive-unlabeled density ratio
    ``f_labels / f_peaks``), so shapes the labels do not have lose score however high the network
    scored them.

    Attributes
    ----------
    radius : float
        Particle radius (level-0 voxels) the descriptors are taken at.
    descriptors : ndarray, shape (n_labels, d)
        The labels' :func:`shape_descriptors`.
    labels : list
        ``[tomogram, z, y, x]`` of each label, row by row with ``descriptors``.
    weight, cap : float
        A peak's logit changes by ``weight · clip(llr − m, −cap, 0)``, ``m`` the labels' median
        leave-one-out log ratio.
    """

    radius: float
    descriptors: np.ndarray
    labels: list
    weight: float = SHAPE_WEIGHT_V2
    cap: float = SHAPE_CAP_V2

    def log_ratio(self, peaks: np.ndarray, background: np.ndarray, tomogram: Sequence[str] | None = None,
                  points_zyx: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Log density ratio of each peak (labels' Gaussian over the background's) and the labels' median
        leave-one-out ratio ``m``.

        ``background``: descriptors of all peaks of the class (at least ``d + 2`` rows are advised; fewer
        fall back to the peaks themselves). A peak within half a radius of a label of the same tomogram
        (``tomogram`` and ``points_zyx`` given) is scored by the labels' Gaussian fitted *without* that
        label: the model fits its own labels better than the particles it has not seen.
        """
        lab = np.asarray(self.descriptors, np.float64)
        bg = _Gauss(background)
        full = _Gauss(lab)
        out = full.logpdf(peaks) - bg.logpdf(peaks)
        loo = np.empty(len(lab))
        loo_models = []
        for i in range(len(lab)):
            g = _Gauss(np.delete(lab, i, axis=0))
            loo_models.append(g)
            loo[i] = float(g.logpdf(lab[i : i + 1])[0] - bg.logpdf(lab[i : i + 1])[0])
        if tomogram is not None and points_zyx is not None and len(out) and self.labels:
            from scipy.spatial import cKDTree

            names = np.asarray([str(r[0]) for r in self.labels])
            pts = np.asarray(points_zyx, np.float64).reshape(-1, 3)
            tom = np.asarray([str(t) for t in tomogram])
            for name in set(tom) & set(names):
                li = np.flatnonzero(names == name)
                pi = np.flatnonzero(tom == name)
                lab_pts = np.asarray([self.labels[k][1:4] for k in li], np.float64)
                dist, j = cKDTree(lab_pts).query(pts[pi])
                for p, d, jj in zip(pi, dist, j, strict=True):
                    if d <= self.radius / 2:
                        g = loo_models[int(li[jj])]
                        out[p] = float(g.logpdf(peaks[p : p + 1])[0] - bg.logpdf(peaks[p : p + 1])[0])
        return out, float(np.median(loo))

    def on_peaks(self, peaks: np.ndarray, tomogram: Sequence[str], points_zyx: np.ndarray) -> ShapeReference:
        """The reference with each label's descriptor taken at the peak nearest to it (within half a radius)
        among ``peaks`` (descriptors of the picks of ``tomogram`` at ``points_zyx``), where there is one.

        Peaks are measured where the network puts them; a label where the person (or the recentring) put it.
        Where the two differ systematically (by a voxel or two on every particle) the labels' Gaussian is
        tighter than the peaks of unseen particles, and the check lowers those: on the look-alike chain from
        an atlas selection (setting 3, recentred labels) F1 at the automatic threshold was 0.10 with the labels'
        own descriptors and 0.69 with their peaks' (``benchmarks/results/shape_footing_session13.json``).
        """
        if not self.labels or not len(peaks):
            return self
        from scipy.spatial import cKDTree

        desc = np.array(self.descriptors, np.float64, copy=True)
        labels = [list(r) for r in self.labels]
        tom = np.asarray([str(t) for t in tomogram])
        pts = np.asarray(points_zyx, np.float64).reshape(-1, 3)
        names = np.asarray([str(r[0]) for r in self.labels])
        for name in set(tom) & set(names):
            li = np.flatnonzero(names == name)
            pi = np.flatnonzero(tom == name)
            lab_pts = np.asarray([self.labels[k][1:4] for k in li], np.float64)
            dist, j = cKDTree(pts[pi]).query(lab_pts)
            near = dist <= self.radius / 2
            desc[li[near]] = np.asarray(peaks, np.float64)[pi[j[near]]]
            for k, p in zip(li[near], pi[j[near]], strict=True):  # the label now stands at its peak
                labels[k] = [name, *(float(v) for v in pts[p])]
        return ShapeReference(self.radius, desc, labels, self.weight, self.cap)

    def adjustment(self, llr: np.ndarray, m: float) -> np.ndarray:
        """Logit change of each peak from its log ratio (:meth:`log_ratio`)."""
        return self.weight * np.clip(np.asarray(llr, np.float64) - m, -self.cap, 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the picker's contract."""
        return {"version": SHAPE_VERSION, "radius": self.radius, "descriptors": np.asarray(self.descriptors).tolist(),
                "labels": [list(r) for r in self.labels], "weight": self.weight, "cap": self.cap}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShapeReference:
        """Inverse of :meth:`to_dict`."""
        return cls(float(d["radius"]), np.asarray(d["descriptors"], np.float64), [list(r) for r in d.get("labels") or []],
                   float(d.get("weight", SHAPE_WEIGHT_V2)), float(d.get("cap", SHAPE_CAP_V2)))


def fit_shape_references(readers: Mapping[str, Any], stds: Mapping[str, float], labels: pd.DataFrame,
                         classes: Sequence[str], radius: float) -> dict[str, dict[str, Any]]:
    """The version-2 shape check of each class with at least :data:`MIN_LABELS` labels (contract dictionaries).

    ``labels`` carries ``tomogram, x, y, z`` and the channel index ``cls`` (as the trainer makes it;
    without it every label is of ``classes[0]``).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, groups in _labels_by_class(labels, classes):
        desc = np.concatenate([shape_descriptors(readers[t], g[["z", "y", "x"]].to_numpy(), radius, stds[t])
                               for t, g in groups])
        rows = [[str(t), float(z), float(y), float(x)] for t, g in groups for z, y, x in g[["z", "y", "x"]].to_numpy()]
        out[str(name)] = ShapeReference(float(radius), desc, rows).to_dict()
    return out


def check_shapes(col: Any, picks: pd.DataFrame, contract: Mapping[str, Any], footing: str = "peaks") -> pd.DataFrame:
    """``picks`` (all tomograms, decoded at a low floor) with the picker's shape check applied.

    Version-2 checks (:class:`ShapeReference`) compare each peak with the labels and with all peaks of
    its class in ``picks``; version-1 checks (:class:`ShapeModel`, older pickers) are applied per
    tomogram. Adds ``score_model`` (the network's score) and ``shape_d2`` (version 2: the labels' median
    log ratio minus the peak's, ≤ 0 for a peak at least as label-like as a typical label; version 1:
    ``d2 / scale``). Rows keep their order. ``footing``: where the labels' descriptors are measured, ``"peaks"``
    (the default: at each label's nearest pick, :meth:`ShapeReference.on_peaks`) or ``"labels"`` (as stored in
    the contract, at the labels' coordinates).
    """
    if footing not in ("peaks", "labels"):
        raise ValueError(f"footing must be 'peaks' or 'labels', got {footing!r}")
    models = (contract or {}).get("shape") or {}
    out = picks.copy()
    out["score_model"] = out["score"].astype(np.float64)
    out["shape_d2"] = np.nan
    if not models or not len(out):
        return out
    from milotile.ops.volume_reader import VolumeReader
    from milotile.stages.preprocess import volume_stats

    readers: dict[str, Any] = {}
    stds: dict[str, float] = {}
    for name in out["tomogram"].unique():
        readers[str(name)] = VolumeReader(col[str(name)].data(0), str(name))
        stds[str(name)] = float(volume_stats(col, str(name))[1])
    for cls, g in out.groupby("class", sort=False):
        spec = models.get(str(cls))
        if spec is None:
            continue
        if int(spec.get("version", 1)) < SHAPE_VERSION:
            for name, gt in g.groupby("tomogram", sort=False):
                done = apply_shape_check(gt, readers[str(name)], stds[str(name)], {str(cls): spec})
                out.loc[gt.index, ["score", "shape_d2"]] = done[["score", "shape_d2"]].to_numpy()
            continue
        ref = ShapeReference.from_dict(spec)
        pts = g[["z", "y", "x"]].to_numpy(np.float64)
        desc = np.empty((len(g), 2 * _Geometry(ref.radius).n_shells))
        tom = g["tomogram"].astype(str).to_numpy()
        for name in np.unique(tom):
            sel = tom == name
            desc[sel] = shape_descriptors(readers[name], pts[sel], ref.radius, stds[name])
        # the background: the peaks the automatic threshold considers (from AUTO_FLOOR up), so a peak's
        # checked score does not depend on how low the picks were decoded
        bg = desc[g["score"].to_numpy(np.float64) >= AUTO_FLOOR]
        if len(bg) < 2:
            bg = desc
        if len(bg) < 2:
            continue
        if footing == "peaks":
            ref = ref.on_peaks(desc, tom, pts)
        llr, m = ref.log_ratio(desc, bg, tom, pts)
        s = np.clip(g["score"].to_numpy(np.float64), 1e-7, 1 - 1e-7)
        logit = np.log(s / (1 - s)) + ref.adjustment(llr, m)
        out.loc[g.index, "score"] = 1.0 / (1.0 + np.exp(-logit))
        out.loc[g.index, "shape_d2"] = m - llr
    return out
