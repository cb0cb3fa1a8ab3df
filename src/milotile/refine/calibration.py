"""Measuring how much the picker flatters its own labels (label-score calibration).

A network scores the particles it was trained on higher than the particles it has not seen, so the
training labels overstate the recall the automatic threshold (:mod:`milotile.refine.threshold`)
expects at a high threshold, and the number of particles it estimates is too low. The trainer
measures that gap at almost no cost: for the first part of the run (``calibration_epochs`` of the
epochs) a fraction of the labels (``calibration_holdout``, at least two per class) is left out of
the loss; then the labelled tomograms are picked with the network of that moment, exactly as
``pick`` does it (one TTA view, shape check fitted to the trained labels only), the scores of the
held-out and of the trained labels are recorded in the contract (``contract["calibration"]``), and
training goes on with every label.

At pick time :func:`milotile.refine.threshold.apply_auto_threshold` turns the record into the
recall curve of unseen particles (:func:`milotile.refine.threshold.calibrated_label_scores`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from milotile.refine.threshold import AUTO_FLOOR, label_scores

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_VERSION", "MIN_CLASS_LABELS", "calibration_epoch", "holdout_mask", "measure_calibration"]

#: Version of ``contract["calibration"]``.
CALIBRATION_VERSION = 1
#: Fewest labels of a class for a calibration hold-out (two held out, two trained on).
MIN_CLASS_LABELS = 4


def holdout_mask(labels: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Which labels the first part of training leaves out: ``round(fraction · n)`` of each class's ``n``
    labels, at least 2 and at most ``n - 2``, for classes with at least :data:`MIN_CLASS_LABELS` labels.

    ``labels`` carries the channel index ``cls`` (without it every label is of one class). Returns a
    boolean mask (all False when ``fraction`` is 0 or no class has enough labels).
    """
    mask = np.zeros(len(labels), bool)
    if not fraction > 0:
        return mask
    cls = labels["cls"].to_numpy() if "cls" in labels else np.zeros(len(labels), np.int64)
    rng = np.random.default_rng([int(seed), 23])
    for c in np.unique(cls):
        idx = np.flatnonzero(cls == c)
        if len(idx) < MIN_CLASS_LABELS:
            continue
        k = min(max(int(round(float(fraction) * len(idx))), 2), len(idx) - 2)
        mask[rng.choice(idx, k, replace=False)] = True
    return mask


def calibration_epoch(epochs: int, fraction: float) -> int:
    """The epoch after which the calibration is measured (0: none), at least 1 and before the last."""
    if not fraction > 0 or epochs < 2:
        return 0
    return int(min(max(round(float(fraction) * epochs), 1), epochs - 1))


def measure_calibration(col: Any, model: Any, contract: Mapping[str, Any], labels: pd.DataFrame, held: np.ndarray,
                        readers: Mapping[str, Any], device: Any, epoch: int) -> dict[str, Any]:
    """Pick the labelled tomograms with ``model`` as it is now and record the held-out and trained labels' scores.

    Parameters
    ----------
    col
        The collection.
    model
        The network being trained (switched to eval mode; the trainer switches it back).
    contract
        The run's picker contract (classes, geometry, preprocessing).
    labels
        Training labels ``tomogram, x, y, z, cls``.
    held
        Boolean mask of the labels left out of the loss so far (:func:`holdout_mask`).
    readers
        Tomogram name -> :class:`milotile.ops.volume_reader.VolumeReader` (for the shape check's profiles).
    device
        Torch device of ``model``.
    epoch
        Epochs trained so far (recorded).

    Returns
    -------
    dict
        ``version, epoch, tta, seconds`` and per class name ``held_out`` / ``trained`` (label scores, 0 when
        no peak is near), ``held_out_rank`` / ``trained_rank`` (peaks of the labelled tomograms scoring at
        least as high; 0 for a missed label) and ``n_peaks`` (peaks at least :data:`AUTO_FLOOR`).
    """
    from milotile.refine.picker import Picker
    from milotile.refine.predict import pick
    from milotile.refine.shape import fit_shape_references
    from milotile.stages.preprocess import volume_stats

    t0 = time.perf_counter()
    classes = list(contract["classes"])
    trained = labels[~held]
    cal = {**contract, "tta": 1, "suggested_threshold": None}
    if contract.get("shape"):  # the held-out labels must not shape the check that scores them
        names = sorted(set(trained["tomogram"]))
        stds = {n: volume_stats(col, n)[1] for n in names}
        cal["shape"] = fit_shape_references(readers, stds, trained, classes, float(contract["bbox"]) / 2.0)
    picker = Picker(model, cal, device=device)
    names = sorted(set(labels["tomogram"]))
    picks = pick(col, picker, threshold=AUTO_FLOOR, names=names, write_heatmaps=False, table=None)
    radius = float(contract["bbox"]) / 4.0
    cls_idx = labels["cls"].to_numpy() if "cls" in labels else np.zeros(len(labels), np.int64)
    out: dict[str, Any] = {"version": CALIBRATION_VERSION, "epoch": int(epoch), "tta": 1, "classes": {}}
    for k, name in enumerate(classes):
        sel = cls_idx == k
        if not (held & sel).any():
            continue
        p = picks[picks["class"] == name]
        peaks = np.sort(p["score"].to_numpy(np.float64))
        rec: dict[str, Any] = {"n_peaks": int(len(peaks))}
        for key, part in (("held_out", labels[held & sel]), ("trained", labels[~held & sel])):
            s = label_scores(p, part, radius) if len(p) else np.zeros(len(part))
            rank = [int(len(peaks) - np.searchsorted(peaks, v, side="left")) if v > 0 else 0 for v in s]
            rec[key], rec[f"{key}_rank"] = [round(float(v), 6) for v in s], rank
        out["classes"][str(name)] = rec
        logger.info("calibration (epoch %d), class %s: held-out label scores %s, trained %s", epoch, name,
                    np.round(rec["held_out"], 3).tolist(), np.round(rec["trained"], 3).tolist())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out
