"""Training crops streamed from the Zarr store.

:class:`~milotile.ops.volume_reader.VolumeReader` (re-exported here) reads boxes of the volume through an LRU
cache of decompressed storage chunks. :class:`CropDataset` is a ``torch`` Dataset whose items are preprocessed crops and
their targets: one crop around every labelled particle (jittered so the particle is anywhere in the
crop) plus a fraction of random crops, with flips, in-plane rot90 and intensity augmentation.
Crops are read per item, so DataLoader workers can be used.

Crops have an **odd** size in y and x: the output grid (every second voxel) is then symmetric, and a
flipped crop's output grid coincides with the original's, which the flip-consistency term needs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from milotile.ops.preprocess import block_halo, preprocess_block
from milotile.ops.volume_reader import VolumeReader
from milotile.refine.targets import TargetGeometry, crop_targets

logger = logging.getLogger(__name__)

__all__ = ["VolumeReader", "CropSpec", "CropDataset", "model_crop_shape", "raw_crop_shape"]


def model_crop_shape(crop: Sequence[int]) -> tuple[int, int, int]:
    """Model-input crop (z, y, x): y and x made odd (see module notes)."""
    d, h, w = (int(c) for c in crop)
    return d, h | 1, w | 1


def raw_crop_shape(crop: Sequence[int], compress: bool) -> tuple[int, int, int]:
    """Level-0 voxels read for a model crop (z doubled when slices are compressed)."""
    d, h, w = model_crop_shape(crop)
    return (2 * d if compress else d), h, w


def out_shape(model_shape: Sequence[int]) -> tuple[int, int, int]:
    """Model output grid for a model-input shape (stride 2 in y and x)."""
    d, h, w = model_shape
    return d, math.ceil(h / 2), math.ceil(w / 2)


@dataclass
class CropSpec:
    """One training crop: tomogram and level-0 origin (z, y, x) of its raw box."""

    tomogram: str
    origin: tuple[int, int, int]


class CropDataset(Dataset):
    """Preprocessed training crops with PU targets.

    Parameters
    ----------
    readers
        Tomogram name -> :class:`VolumeReader`.
    stats
        Tomogram name -> (mean, std) of the filtered volume (:func:`milotile.stages.preprocess.volume_stats`).
    labels
        Table with ``tomogram, x, y, z`` (level-0 voxels) and ``cls`` (int channel index).
    geom
        Target geometry.
    crop
        Model-input crop (z, y, x); y and x are made odd.
    n_classes, thresh, gauss, clip, compress, compress_how
        Target and preprocessing settings (:func:`milotile.ops.preprocess.preprocess_block`).
    random_fraction
        Random crops per epoch as a fraction of the labelled particles.
    random_tomograms
        Tomograms random crops are drawn from (default: those with labels).
    augment
        Flips, rot90 and intensity jitter.
    seed
        Base seed; item ``i`` of epoch ``e`` is deterministic given (seed, e, i).
    repeats
        Crops per labelled particle and epoch (each with its own jitter and augmentation).
    negatives
        Table ``tomogram, x, y, z`` of labelled negatives: their voxels get the target
        :data:`~milotile.refine.targets.NEGATIVE`, and each is a crop anchor like a label.
    negative_crops
        At most this multiple of the labelled crops are negative-anchored crops per epoch, drawn anew each
        epoch from the ``repeats`` copies of every negative (``0``: all of them, one per negative and
        repeat). Bounds the epoch when the negatives outnumber the labels (``explore select --negatives
        rest`` writes hundreds); every negative's voxels are still marked in every crop that holds them.
    """

    def __init__(
        self,
        readers: dict[str, VolumeReader],
        stats: dict[str, tuple[float, float]],
        labels: pd.DataFrame,
        geom: TargetGeometry,
        crop: Sequence[int] = (8, 64, 64),
        *,
        n_classes: int = 1,
        thresh: float = 0.8,
        gauss: float = 0.0,
        clip: tuple[float, float] = (-3.0, 3.0),
        compress: bool = False,
        compress_how: str = "max",
        random_fraction: float = 0.25,
        random_tomograms: Sequence[str] | None = None,
        augment: bool = True,
        seed: int = 0,
        repeats: int = 1,
        negatives: pd.DataFrame | None = None,
        negative_crops: float = 0.0,
    ) -> None:
        self.readers = readers
        self.stats = stats
        self.geom = geom
        self.model_shape = model_crop_shape(crop)
        self.raw_shape = raw_crop_shape(crop, compress)
        self.out_shape = out_shape(self.model_shape)
        self.n_classes = n_classes
        self.thresh = thresh
        self.gauss = gauss
        self.clip = clip
        self.compress = compress
        self.compress_how = compress_how
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.labels = labels.reset_index(drop=True)
        self._pts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, grp in self.labels.groupby("tomogram", sort=True):
            self._pts[str(name)] = (
                grp[["z", "y", "x"]].to_numpy(np.float64),
                grp["cls"].to_numpy(np.int64),
            )
        neg = negatives if negatives is not None else self.labels.iloc[:0]
        self._neg = {str(n): g[["z", "y", "x"]].to_numpy(np.float64) for n, g in neg.groupby("tomogram", sort=True)}
        reps, cols = max(int(repeats), 1), ["tomogram", "x", "y", "z"]
        self._pos_anchors = np.tile(self.labels[cols].to_numpy(), (reps, 1))
        self._neg_anchors = np.tile(neg[cols].to_numpy(), (reps, 1))
        self._all_anchors = np.tile(pd.concat([self.labels[cols], neg[cols]]).to_numpy(), (reps, 1))
        n_neg = len(self._neg_anchors)
        if float(negative_crops) > 0:
            n_neg = min(n_neg, max(int(np.ceil(float(negative_crops) * len(self._pos_anchors))), 1))
        self.n_negative_crops = n_neg
        self.random_tomograms = list(random_tomograms or sorted(self._pts))
        self.n_random = int(round(random_fraction * (len(self._pos_anchors) + n_neg)))
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.anchors) + self.n_random

    def set_epoch(self, epoch: int) -> None:
        """Change the per-epoch random draws (jitter, random crops, augmentation, which negatives anchor crops)."""
        self.epoch = int(epoch)
        if self.n_negative_crops == len(self._neg_anchors):  # every negative, in the order labels, negatives
            self.anchors = self._all_anchors
            return
        pick = np.random.default_rng([self.seed, self.epoch, 1 << 30]).permutation(len(self._neg_anchors))
        self.anchors = np.concatenate([self._pos_anchors, self._neg_anchors[pick[:self.n_negative_crops]]])

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def spec(self, i: int, rng: np.random.Generator) -> CropSpec:
        """The crop of item ``i`` (anchor crops first, then random crops)."""
        rz, ry, rx = self.raw_shape
        if i < len(self.anchors):
            name, x, y, z = self.anchors[i]
            name = str(name)
            # the particle lands anywhere in the central part of the crop (not at its very edge)
            jy = rng.integers(-(ry // 2) + 8, ry // 2 - 8 + 1) if ry > 20 else 0
            jx = rng.integers(-(rx // 2) + 8, rx // 2 - 8 + 1) if rx > 20 else 0
            jz = rng.integers(-(rz // 4), rz // 4 + 1) if rz > 3 else 0
            origin = (
                int(round(z)) - rz // 2 + int(jz),
                int(round(y)) - ry // 2 + int(jy),
                int(round(x)) - rx // 2 + int(jx),
            )
        else:
            name = self.random_tomograms[int(rng.integers(len(self.random_tomograms)))]
            shp = self.readers[name].shape
            origin = tuple(int(rng.integers(0, max(shp[a] - self.raw_shape[a], 0) + 1)) for a in range(3))
        if self.compress:  # slice pairs as in the whole volume (and in ``pick``): start at an even slice
            origin = (origin[0] - origin[0] % 2, origin[1], origin[2])
        return CropSpec(name, origin)  # type: ignore[arg-type]

    def load(self, spec: CropSpec, augment_rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read, preprocess and (optionally) augment a crop; returns (input, target)."""
        halo = block_halo(self.gauss, self.compress)
        start = [o - h for o, h in zip(spec.origin, halo, strict=True)]
        size = [s + 2 * h for s, h in zip(self.raw_shape, halo, strict=True)]
        raw = self.readers[spec.tomogram].read(start, size)
        mean, std = self.stats[spec.tomogram]
        x = preprocess_block(raw, mean=mean, std=std, gauss=self.gauss, clip=self.clip, compress=self.compress,
                             compress_how=self.compress_how)
        h = halo[1]  # the same in every axis of the processed grid
        if h:
            x = x[h:-h, h:-h, h:-h]
        pts, cls = self._pts.get(spec.tomogram, (np.zeros((0, 3)), np.zeros(0, np.int64)))
        neg = self._neg.get(spec.tomogram, np.zeros((0, 3)))
        both = np.concatenate([pts, neg]) - np.asarray(spec.origin, np.float64)  # crop frame
        if augment_rng is not None:
            x, both = self._augment(x, both, augment_rng)
        tgt = crop_targets(
            both[: len(pts)], cls, (0.0, 0.0, 0.0), self.out_shape, self.geom,
            n_classes=self.n_classes, thresh=self.thresh, unlabeled=True, negatives_zyx=both[len(pts):],
        )
        return np.ascontiguousarray(x, np.float32), tgt

    def _augment(self, x: np.ndarray, pts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        _, hh, ww = x.shape
        pts = pts.copy()
        if hh == ww:
            k = int(rng.integers(4))
            for _ in range(k):  # rot90 in the (y, x) plane: (y, x) -> (W-1-x, y)
                x = np.rot90(x, 1, axes=(1, 2))
                y_old = pts[:, 1].copy()
                pts[:, 1] = (ww - 1) - pts[:, 2]
                pts[:, 2] = y_old
        if rng.random() < 0.5:
            x = x[:, ::-1, :]
            pts[:, 1] = (hh - 1) - pts[:, 1]
        if rng.random() < 0.5:
            x = x[:, :, ::-1]
            pts[:, 2] = (ww - 1) - pts[:, 2]
        # intensity: contrast/brightness jitter and a little noise, kept in [0, 1]
        scale = rng.uniform(0.8, 1.2)
        shift = rng.uniform(-0.1, 0.1)
        x = (x - 0.5) * scale + 0.5 + shift
        x = x + rng.normal(0.0, 0.02, size=x.shape).astype(np.float32)
        return np.clip(x, 0.0, 1.0).astype(np.float32), pts

    def __getitem__(self, i: int) -> dict:
        rng = self._rng(i)
        spec = self.spec(i, rng)
        x, tgt = self.load(spec, rng if self.augment else None)
        return {
            "input": torch.from_numpy(x),
            "target": torch.from_numpy(tgt),
            "tomogram": spec.tomogram,
            "origin": torch.tensor(spec.origin),
        }
