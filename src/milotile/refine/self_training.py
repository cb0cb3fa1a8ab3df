"""Self-training of the picker: confident picks of one round become positives of the next.

With a handful of labels most particles of the labelled tomograms are unlabelled, and the PU loss
treats them as (mostly) negative. After a round of training, the picks that score like the labelled
particles are added as extra positives and the picker is trained again from scratch.

Which picks (:func:`pseudo_labels`): in the tomograms holding labels, the peaks of each class that
score at least the PU label threshold (:func:`milotile.refine.threshold.pu_label_threshold`, the
threshold ``pick`` would choose, without its margin) and lie farther than the particle radius
(``bbox / 2``) from every label, at most ``max_ratio`` × the number of labels of that class per
tomogram, best first.

Stopping rule (:func:`converged`): stop when a round adds no pseudo-label, or when at least
``stable`` (90 %) of a round's pseudo-labels were already pseudo-labels of the previous round.
The picker's contract keeps the user's labels only (``train_labels``), so the automatic threshold is
never chosen on the picker's own picks.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from milotile.refine.threshold import label_scores, pu_label_threshold

logger = logging.getLogger(__name__)

__all__ = ["converged", "pseudo_labels"]


def pseudo_labels(picks: pd.DataFrame, labels: pd.DataFrame, bbox: float, *, max_ratio: float = 2.0) -> pd.DataFrame:
    """Confident picks to add as positives (``tomogram, x, y, z, class``).

    Parameters
    ----------
    picks
        Picks of the labelled tomograms decoded at a low threshold (``tomogram, x, y, z, score, class``).
    labels
        The user's labels (``tomogram, x, y, z, class``).
    bbox
        Particle box (level-0 voxels): labels match picks within ``bbox / 4``, pseudo-labels keep
        ``bbox / 2`` away from labels.
    max_ratio
        At most this many pseudo-labels per label, per tomogram and class.
    """
    out = []
    for cls, lab_c in labels.groupby("class", sort=True):
        pk_c = picks[(picks["class"] == cls) & picks["tomogram"].isin(set(lab_c["tomogram"]))]
        if not len(pk_c):
            continue
        ls = label_scores(pk_c, lab_c, float(bbox) / 4.0)
        thr = pu_label_threshold(ls, pk_c["score"].to_numpy())
        for name, lab_t in lab_c.groupby("tomogram", sort=True):
            cand = pk_c[(pk_c["tomogram"] == name) & (pk_c["score"] >= thr)]
            if not len(cand):
                continue
            tree = cKDTree(lab_t[["z", "y", "x"]].to_numpy(np.float64))
            d, _ = tree.query(cand[["z", "y", "x"]].to_numpy(np.float64))
            cand = cand[d > float(bbox) / 2.0].nlargest(int(np.ceil(max_ratio * len(lab_t))), "score")
            out.append(cand[["tomogram", "x", "y", "z", "class"]])
    if not out:
        return pd.DataFrame({"tomogram": [], "x": [], "y": [], "z": [], "class": []})
    new = pd.concat(out, ignore_index=True)
    logger.info("self-training: %d pseudo-labels from %d labels", len(new), len(labels))
    return new


def converged(previous: pd.DataFrame | None, current: pd.DataFrame, radius: float, *, stable: float = 0.9) -> bool:
    """True when ``current`` is empty or at least ``stable`` of it lies within ``radius`` of ``previous``."""
    if len(current) == 0:
        return True
    if previous is None or len(previous) == 0:
        return False
    same = 0
    for name, cur in current.groupby("tomogram"):
        prev = previous[previous["tomogram"] == name]
        if not len(prev):
            continue
        d, _ = cKDTree(prev[["z", "y", "x"]].to_numpy(np.float64)).query(cur[["z", "y", "x"]].to_numpy(np.float64))
        same += int((d <= radius).sum())
    return same >= stable * len(current)
