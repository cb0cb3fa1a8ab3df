"""Choosing the pick threshold without a fully annotated validation region.

With a handful of labels (say 9 of 27 particles in three tomograms) a held-out *region* cannot
measure precision: the unlabelled particles inside it count as false positives, and a region small
enough to be fully annotated holds one or two particles. Instead the threshold is chosen from the
heatmap's own peaks, with the labels as a random sample of the particles (the PU assumption):

* **labels** (:func:`f1_label_threshold`, the default) — the fraction of label scores at least ``t``
  estimates the recall ``r(t)``; the number of particles ``P`` among the peaks of the labelled
  tomograms is bounded at every threshold by ``N(t) / r(t)`` (``N(t)``: peaks at least ``t``), and the
  tightest bound over thresholds keeping at least half the labels is the estimate. The threshold
  maximises the estimated ``F1(t) = 2 P r(t) / (N(t) + P)``. Unlike Lee & Liu's ``r² / N`` (the
  previous rule, still available as ``rule="pu"``), it knows how many particles there are, so it
  stops where the look-alikes begin instead of where the recall starts to fall: on the look-alike
  benchmark (``benchmarks/refine_hard.py --preset lookalike``) the r²/N rule kept a threshold of 0.998
  (F1 0.08) where the best threshold gave 0.43.
* **calibration** — the training labels score higher than the particles the network has not seen
  (memorisation), so their recall at a high threshold overstates the particles'. Pickers trained with
  ``calibration_holdout > 0`` (off by default: it lost to the fixed shift on the hard preset, see
  :class:`~milotile.refine.recipe.PickerRecipe`; :mod:`milotile.refine.calibration`) carry a measurement of it:
  the ranks among the peaks of labels held out of the first half of training, next to the trained labels'.
  :func:`calibrated_label_scores` turns them into the scores of unseen particles under the final network;
  other pickers fall back to lowering the label scores by the fixed :data:`LABEL_SHIFT`.
* **valley** — without labels among the peaks (picking a collection the picker was not trained
  on), Otsu's split of the logit-scores of all peaks above ``floor``.

Reviewed picks (:mod:`milotile.refine.review`) replace the estimate by a measured precision.
:func:`choose_threshold` returns the threshold and how it was found.

Alternatives measured (``benchmarks/threshold_rules.py``, ``results/threshold_rules.json``: 23 saved runs at the
current picker defaults, hard preset seeds 0-2 with two species and look-alike settings 0-5 with up to three
seeds; defaults chosen on the 11 tuning runs, reported on the other 12). Mean gap to the best threshold's F1,
tuning / report runs: this rule 0.048 / 0.082; label shift 0 0.046 / 0.089, 0.5 0.056 / 0.111, 1.0 0.073 / 0.124;
a lower confidence bound of the recall (Beta 0.2 quantile) 0.059 / 0.064; the particle count at 3/4 of the labels'
recall 0.059 / 0.067; the estimated F1 curve averaged over 100 bootstrap resamples of the labels 0.049 / 0.061;
as many peaks as particles estimated 0.077 / 0.111; Otsu's valley 0.136 / 0.145; r²/N 0.113 / 0.097. The rule is
kept: it is best or tied on the tuning runs, and the bagged curve, better on the report runs, only ties there.
Scoring the shape check's peaks by the mean of the labels' leave-one-out Gaussians (the labels' own footing)
lost as well (16 runs: mean gap 0.095 against 0.065). What fails is memorisation: with 6-9 labels trained to
scores of 0.98-0.999 their recall overstates the particles' at high thresholds (hard seed 2: threshold 0.97
against the best 0.62), and no rule on these runs corrects it without losing elsewhere; a reviewed sample does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

#: Lowest score decoded when the threshold is chosen automatically.
AUTO_FLOOR = 0.05
#: Logit units the threshold sits below the chosen label score. On the hard benchmark's final runs
#: (10 picker runs, 6 labels, big and small species) the mean F1 at margins 0.25 / 0.5 / 0.75 / 1.0 / 1.5
#: was 0.593 / 0.629 / 0.662 / 0.647 / 0.594.
LABEL_MARGIN = 0.75
#: Logit units the training labels' scores are lowered by before they estimate the recall
#: (:func:`f1_label_threshold`): the network scores its own labels higher than the particles it has not
#: seen, so their recall at a high threshold overstates the particles'. Chosen on the tuning data
#: (look-alike settings 0-2 and the hard preset's seed 0, 8 picker runs): mean gap to the best
#: threshold's F1 0.028 / 0.023 / 0.029 / 0.036 at shifts 0 / 0.25 / 0.5 / 1.0.
#: The fallback of pickers without a measured calibration (``contract["calibration"]``).
LABEL_SHIFT = 0.25
#: Fewest fraction of the labels a threshold must keep to bound the number of particles.
MIN_RECALL = 0.5
#: How a picker's label-score calibration (``contract["calibration"]``, :mod:`milotile.refine.calibration`)
#: becomes the recall curve of unseen particles (:func:`calibrated_label_scores`).
CALIBRATION_RULES = ("union", "held_out", "rank_shift")
CALIBRATION_RULE = "union"

__all__ = ["CALIBRATION_RULES", "apply_auto_threshold", "calibrated_label_scores", "choose_threshold",
           "f1_label_threshold", "label_records", "label_scores", "otsu_logit", "pu_label_threshold"]


def otsu_logit(scores: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of ``logit(scores)``, mapped back to a probability."""
    s = np.clip(np.asarray(scores, np.float64), 1e-6, 1 - 1e-6)
    z = np.log(s / (1 - s))
    if len(z) < 2 or np.ptp(z) <= 0:
        return float(s.min()) if len(s) else 0.5
    hist, edges = np.histogram(z, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(np.argmax(between[:-1]))
    t = edges[k + 1]
    return float(1.0 / (1.0 + np.exp(-t)))


def choose_threshold(
    peak_scores: np.ndarray,
    label_scores: np.ndarray | None = None,
    *,
    labelled_peak_scores: np.ndarray | None = None,
    floor: float = 0.05,
    margin: float | None = None,
    rule: str = "f1",
    shift: float | None = None,
) -> tuple[float, str]:
    """Threshold for the picks of one class.

    Parameters
    ----------
    peak_scores : ndarray
        Scores of all local maxima of the heatmap (after NMS) in the tomograms being picked.
    label_scores : ndarray, optional
        Best peak score within the matching radius of each labelled particle (0 when none).
    labelled_peak_scores : ndarray, optional
        Scores of the peaks in the tomograms that hold the labels (default ``peak_scores``).
    floor : float
        Peaks below this are ignored (and it is the lowest threshold returned).
    margin : float, optional
        Rule ``"pu"`` only: logit units below the chosen label score (default :data:`LABEL_MARGIN`).
    rule : {"f1", "pu"}
        ``"f1"`` (default): :func:`f1_label_threshold`, the threshold of the best F1 estimated from the
        labels and the peak counts. ``"pu"``: the previous rule, the larger of Otsu's valley and Lee &
        Liu's ``r² / N`` label score lowered by ``margin`` (kept for comparison).
    shift : float, optional
        Rule ``"f1"``: logit units the label scores are lowered by (default :data:`LABEL_SHIFT`; 0 for scores
        already calibrated by :func:`calibrated_label_scores`).

    Returns
    -------
    threshold, source
        ``source`` is ``"labels"`` (estimated F1), ``"valley"`` (no labels among the peaks: Otsu's split
        of the logit-scores), or ``"floor"``.
    """
    s = np.asarray(peak_scores, np.float64)
    s = s[s >= floor]
    if rule not in ("f1", "pu"):
        raise ValueError(f"unknown threshold rule {rule!r}; use 'f1' or 'pu'")
    t, src = (otsu_logit(s), "valley") if len(s) >= 2 else (0.5, "floor")
    if label_scores is not None and len(label_scores):
        lab_peaks = s if labelled_peak_scores is None else np.asarray(labelled_peak_scores, np.float64)
        if rule == "f1":
            if len(lab_peaks[lab_peaks >= floor]):
                t_f1, info = f1_label_threshold(label_scores, lab_peaks, floor=floor, shift=shift)
                if info["recall"] > 0:  # else the labels score below the peaks: keep the valley
                    t, src = t_f1, "labels"
        else:
            m = LABEL_MARGIN if margin is None else float(margin)
            cap = _logit_shift(pu_label_threshold(label_scores, lab_peaks, floor=floor), -m)
            # a "valley" above the median label score, with the network calling most labels particles,
            # cuts through them: the scores are not bimodal (few or no background peaks), the labels decide
            splits_labels = src == "valley" and t > float(np.median(label_scores)) >= 0.5
            if cap > t or splits_labels:
                t, src = cap, "labels"
    if t < floor:
        t, src = floor, "floor"
    return float(t), src


def pu_label_threshold(label_scores: np.ndarray, peak_scores: np.ndarray, *, floor: float = 0.05) -> float:
    """The label score ``t`` that maximises Lee & Liu's PU criterion ``r(t)² / N(t)``.

    ``r(t)`` is the fraction of ``label_scores`` at least ``t`` and ``N(t)`` the number of
    ``peak_scores`` at least ``t`` (at least 1). Labels below ``floor`` (missed by the picker) count in
    ``r`` but are never chosen; with none above it, the weakest label score is returned.
    """
    ls = np.sort(np.clip(np.asarray(label_scores, np.float64), 1e-6, 1 - 1e-6))
    peaks = np.sort(np.asarray(peak_scores, np.float64))
    n = len(ls)
    best, best_t = -1.0, float(ls[0])
    for k, t in enumerate(ls):
        if t < floor:
            continue
        recall = (n - k) / n
        above = len(peaks) - int(np.searchsorted(peaks, t, side="left"))
        value = recall * recall / max(above, 1)
        if value > best:
            best, best_t = value, float(t)
    return best_t


def f1_label_threshold(label_scores: np.ndarray, peak_scores: np.ndarray, *, floor: float = AUTO_FLOOR,
                       shift: float | None = None, min_recall: float | None = None) -> tuple[float, dict[str, float]]:
    """The threshold that maximises the F1 estimated from the labels and the peak counts.

    The labels are a random sample of the particles (the PU assumption), so the fraction of label
    scores at least ``t`` estimates the recall ``r(t)``; if ``P`` particles lie in the labelled
    tomograms, the peaks at least ``t`` hold ``P · r(t)`` of them among ``N(t)`` peaks, and
    ``F1(t) = 2 P r(t) / (N(t) + P)``. ``P`` itself is bounded by every threshold, ``P ≤ N(t) / r(t)``
    (no more true picks than picks); the tightest bound over the thresholds that keep at least
    ``min_recall`` of the labels is the estimate (exact where the strictest such threshold is clean).

    Training labels score higher than the particles the network has not seen (the gap measured on the
    look-alike benchmark: 0.1-0.6 logit units), so their logit-scores are lowered by ``shift`` first.

    Parameters
    ----------
    label_scores : ndarray
        Best peak score near each labelled particle (0 when none).
    peak_scores : ndarray
        Scores of the peaks in the tomograms that hold the labels.
    floor : float
        Lowest threshold considered.
    shift, min_recall : float, optional
        Default :data:`LABEL_SHIFT` and :data:`MIN_RECALL`.

    Returns
    -------
    threshold, details
        ``details``: ``n_particles`` (the estimate ``P``), ``recall`` and ``f1`` estimated at the threshold.
    """
    shift = LABEL_SHIFT if shift is None else float(shift)
    min_recall = MIN_RECALL if min_recall is None else float(min_recall)
    zl = _logit(np.asarray(label_scores, np.float64)) - shift
    peaks = np.asarray(peak_scores, np.float64)
    zp = np.sort(_logit(peaks[peaks >= floor]))
    if not len(zl) or not len(zp):
        return float(floor), {"n_particles": float("nan"), "recall": float("nan"), "f1": float("nan")}
    cand = np.unique(zp)
    recall = (zl[None, :] >= cand[:, None]).mean(axis=1)
    above = len(zp) - np.searchsorted(zp, cand, side="left")
    ok = recall >= min_recall
    if not ok.any() and shift > 0:  # the shift took the labels below every peak (a flat heatmap): undo it
        return f1_label_threshold(label_scores, peak_scores, floor=floor, shift=0.0, min_recall=min_recall)
    if not ok.any():  # the labels score below the peaks: no estimate (the caller falls back to the valley)
        return float(floor), {"n_particles": float("nan"), "recall": 0.0, "f1": float("nan")}
    n_pos = float(np.min(above[ok] / recall[ok]))
    f1 = 2.0 * n_pos * recall / (above + n_pos)
    k = int(np.argmax(f1))
    t = float(1.0 / (1.0 + np.exp(-cand[k])))
    return max(t, float(floor)), {"n_particles": n_pos, "recall": float(recall[k]), "f1": float(f1[k])}


def calibrated_label_scores(label_scores: np.ndarray, peak_scores: np.ndarray, record: dict[str, Any],
                            rule: str | None = None) -> np.ndarray:
    """Scores standing for *unseen* particles, from the training labels' scores and the picker's calibration.

    The calibration (:func:`milotile.refine.calibration.measure_calibration`) holds, for labels left out of
    the first part of training and for the labels trained on, the number of peaks of the labelled tomograms
    that scored at least as high (their *rank*) with the network of that moment. Ranks, unlike scores, carry
    over from that network to the final one (whose scores are higher and sharper), so a rank ``n`` stands for
    the final network's ``n``-th highest peak among ``peak_scores``:

    * ``"held_out"`` — each held-out label's rank (an unseen particle, two or three of them);
    * ``"rank_shift"`` — each training label's rank under the final network, times the ratio of the held-out
      to the trained labels' median ranks (the memorisation, as a factor on the rank; at least 1);
    * ``"union"`` (:data:`CALIBRATION_RULE`) — both samples together.

    Parameters
    ----------
    label_scores : ndarray
        The final network's best peak score near each training label (0 when none).
    peak_scores : ndarray
        The final network's peaks in the labelled tomograms.
    record : dict
        One class of ``contract["calibration"]["classes"]``.
    rule : str, optional
        One of :data:`CALIBRATION_RULES` (default :data:`CALIBRATION_RULE`).

    Returns
    -------
    ndarray
        Scores whose fraction at least ``t`` estimates the recall of unseen particles (0: missed); use them
        with ``shift=0``.
    """
    rule = CALIBRATION_RULE if rule is None else str(rule)
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"unknown calibration rule {rule!r}; use one of {', '.join(CALIBRATION_RULES)}")
    desc = np.sort(np.asarray(peak_scores, np.float64))[::-1]

    def at_rank(rank: np.ndarray) -> np.ndarray:
        r = np.ceil(np.asarray(rank, np.float64))
        ok = (r >= 1) & (r <= len(desc))
        out = np.zeros(len(r))
        out[ok] = desc[r[ok].astype(np.int64) - 1]
        return out

    n_ck = int(record.get("n_peaks", 0))
    held = np.asarray(record.get("held_out_rank") or [], np.float64)
    held = np.where(held > 0, held, n_ck + 1.0)  # a missed label ranks below every peak
    parts = []
    if rule in ("held_out", "union"):
        parts.append(at_rank(held))
    if rule in ("rank_shift", "union"):
        trained = np.asarray(record.get("trained_rank") or [], np.float64)
        trained = trained[trained > 0]
        ls = np.asarray(label_scores, np.float64)
        asc = desc[::-1]
        final_rank = np.where(ls > 0, len(desc) - np.searchsorted(asc, ls, side="left"), 0)
        factor = float(np.exp(np.median(np.log(held)) - np.median(np.log(trained)))) if len(held) and len(trained) else 1.0
        factor = max(factor, 1.0)  # training cannot rank unseen particles above its labels: below 1 is noise
        parts.append(np.where(final_rank > 0, at_rank(np.maximum(final_rank * factor, 1.0)), 0.0))
    return np.concatenate(parts) if parts else np.asarray(label_scores, np.float64)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _logit_shift(p: float, delta: float) -> float:
    p = float(np.clip(p, 1e-6, 1 - 1e-6))
    return float(1.0 / (1.0 + np.exp(-(np.log(p / (1 - p)) + delta))))


def label_records(df: pd.DataFrame, classes: Sequence[str]) -> list[list[Any]]:
    """The training labels as ``[tomogram, x, y, z, class name]`` rows for the checkpoint contract.

    ``df`` carries the channel index ``cls`` (as made by the trainer); without it every label is
    of ``classes[0]``.
    """
    cls = df["cls"].to_numpy() if "cls" in df else np.zeros(len(df), np.int64)
    return [[str(t), float(x), float(y), float(z), str(classes[int(c)])]
            for t, x, y, z, c in zip(df["tomogram"], df["x"], df["y"], df["z"], cls, strict=True)]


def label_scores(picks: pd.DataFrame, labels: pd.DataFrame, radius: float) -> np.ndarray:
    """Best pick score within ``radius`` of each label in the picked tomograms (0 when none)."""
    out = []
    for name, g in labels.groupby("tomogram"):
        p = picks[picks["tomogram"] == name]
        if len(p) == 0:
            out.extend([0.0] * len(g))
            continue
        tree = cKDTree(p[["z", "y", "x"]].to_numpy(np.float64))
        sc = p["score"].to_numpy(np.float64)
        for pt in g[["z", "y", "x"]].to_numpy(np.float64):
            idx = tree.query_ball_point(pt, radius)
            out.append(float(sc[idx].max()) if idx else 0.0)
    return np.asarray(out, np.float64)


def apply_auto_threshold(picks: pd.DataFrame, contract: dict, margin: float | None = None,
                         rule: str = "f1", calibration: str | None = None) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Keep the picks above the threshold chosen per class by :func:`choose_threshold` (``margin``:
    its label margin, default :data:`LABEL_MARGIN`).

    ``picks`` must be decoded at :data:`AUTO_FLOOR` or lower; the labels come from the picker's
    contract (``train_labels``), matched within half the particle radius (``bbox / 4``). With a
    label-score calibration in the contract (pickers trained with ``calibration_holdout > 0``) the labels'
    scores are first turned into unseen particles' by :func:`calibrated_label_scores` (``calibration``: its
    rule, default :data:`CALIBRATION_RULE`; ``"off"``: the fixed :data:`LABEL_SHIFT` of older pickers).
    """
    rows = contract.get("train_labels") or []
    labels = pd.DataFrame(rows, columns=["tomogram", "x", "y", "z", "class"])
    radius = float(contract.get("bbox", 16)) / 4.0
    cal_classes = (contract.get("calibration") or {}).get("classes") or {}
    keep, info = [], {}
    for cls, g in picks.groupby("class", sort=False):
        lab = labels[(labels["class"] == cls) & labels["tomogram"].isin(set(g["tomogram"]))]
        ls = label_scores(g, lab, radius) if len(lab) else None
        lab_peaks = g.loc[g["tomogram"].isin(set(lab["tomogram"])), "score"].to_numpy()
        record = cal_classes.get(str(cls)) if calibration != "off" else None
        shift, n_seen = None, 0 if ls is None else int(len(ls))
        if record and ls is not None and rule == "f1":
            ls, shift = calibrated_label_scores(ls, lab_peaks[lab_peaks >= AUTO_FLOOR], record, calibration), 0.0
        t, src = choose_threshold(g["score"].to_numpy(), ls, labelled_peak_scores=lab_peaks, floor=AUTO_FLOOR,
                                  margin=margin, rule=rule, shift=shift)
        info[str(cls)] = {"threshold": t, "source": src, "n_labels_seen": n_seen, "calibrated": shift is not None}
        logger.info("class %s: automatic threshold %.3f (%s)", cls, t, src)
        keep.append(g[g["score"] >= t])
    out = pd.concat(keep, ignore_index=True) if keep else picks.iloc[:0]
    return out, info
