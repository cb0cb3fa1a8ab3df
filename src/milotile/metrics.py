"""Point matching and detection metrics.

Predicted and true particle positions are matched one-to-one with the Hungarian algorithm
(:func:`scipy.optimize.linear_sum_assignment`) on **squared** Euclidean distances, allowing a pair only
when its distance is at most ``radius`` (MiLoPYP's evaluation compared ``d**2`` with ``r**3``, which
silently widened the radius to ``r**1.5``; here the comparison is ``d**2 <= r**2``).

The assignment first maximises the number of pairs inside the radius and then minimises their summed
squared distance. Points are split into connected components of the "within radius" graph (KD-tree),
so the dense cost matrices stay small even for many thousands of points.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from milotile.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "MatchResult",
    "match_points",
    "precision_recall_f1",
    "fbeta",
    "evaluate",
    "pr_curve",
    "average_precision",
    "matched_accuracy",
    "clustering_scores",
]


@dataclass(frozen=True)
class MatchResult:
    """Counts of a one-to-one matching and the scores derived from them."""

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float

    def as_dict(self) -> dict[str, float]:
        """Return the fields as a plain dict."""
        return asdict(self)


def _as_points(points: np.ndarray | Sequence, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, arr.shape[-1] if arr.ndim == 2 else 3)
    if arr.ndim != 2:
        raise InputError(f"{name} must be an (N, d) array of coordinates, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or infinite coordinates.")
    return arr


def match_points(
    pred: np.ndarray | Sequence,
    true: np.ndarray | Sequence,
    radius: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match predicted to true points one-to-one within ``radius``.

    Parameters
    ----------
    pred, true
        Arrays of shape ``(N, d)`` and ``(M, d)`` with coordinates in the same unit.
    radius
        Largest distance at which a prediction can match a true point (same unit).

    Returns
    -------
    pred_idx, true_idx, dist
        Indices of the matched pairs into ``pred`` and ``true`` and their Euclidean distances. The
        matching has the largest possible number of pairs with ``dist <= radius`` and, among those,
        the smallest sum of squared distances.

    Examples
    --------
    >>> pi, ti, d = match_points([[0, 0, 0], [10, 0, 0]], [[1, 0, 0]], radius=2)
    >>> pi.tolist(), ti.tolist()
    ([0], [0])
    """
    if not np.isfinite(radius) or radius < 0:
        raise InputError(f"Matching radius must be a finite non-negative number, got {radius!r}.")
    p = _as_points(pred, "pred")
    t = _as_points(true, "true")
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if len(p) == 0 or len(t) == 0:
        return empty
    if p.shape[1] != t.shape[1]:
        raise InputError(
            f"pred has {p.shape[1]} coordinates per point but true has {t.shape[1]}."
        )
    r2 = float(radius) ** 2
    pairs = cKDTree(p).sparse_distance_matrix(cKDTree(t), max_distance=radius, output_type="ndarray")
    if len(pairs) == 0:
        return empty
    ip = pairs["i"].astype(np.int64)
    it = pairs["j"].astype(np.int64)
    d2 = pairs["v"].astype(np.float64) ** 2
    keep = d2 <= r2
    ip, it, d2 = ip[keep], it[keep], d2[keep]
    if len(ip) == 0:
        return empty
    n, m = len(p), len(t)
    graph = sparse.coo_matrix((np.ones(len(ip)), (ip, n + it)), shape=(n + m, n + m))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[ip]
    order = np.argsort(edge_comp, kind="stable")
    ip, it, d2, edge_comp = ip[order], it[order], d2[order], edge_comp[order]
    bounds = np.flatnonzero(np.diff(edge_comp)) + 1
    out_p, out_t, out_d2 = [], [], []
    for sl_p, sl_t, sl_d in zip(
        np.split(ip, bounds), np.split(it, bounds), np.split(d2, bounds), strict=True
    ):
        up, inv_p = np.unique(sl_p, return_inverse=True)
        ut, inv_t = np.unique(sl_t, return_inverse=True)
        if len(up) == 1 or len(ut) == 1:
            # star-shaped component: the single point takes its nearest partner
            k = int(np.argmin(sl_d))
            out_p.append(sl_p[k : k + 1])
            out_t.append(sl_t[k : k + 1])
            out_d2.append(sl_d[k : k + 1])
            continue
        # Pairs outside the radius cost more than any complete set of feasible pairs, so the
        # optimum first maximises the number of feasible pairs, then minimises squared distance.
        big = r2 * (min(len(up), len(ut)) + 1) + 1.0
        cost = np.full((len(up), len(ut)), big)
        cost[inv_p, inv_t] = sl_d
        rows, cols = linear_sum_assignment(cost)
        ok = cost[rows, cols] < big
        out_p.append(up[rows[ok]])
        out_t.append(ut[cols[ok]])
        out_d2.append(cost[rows[ok], cols[ok]])
    pi = np.concatenate(out_p)
    ti = np.concatenate(out_t)
    dd = np.sqrt(np.concatenate(out_d2))
    return pi, ti, dd


def precision_recall_f1(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts (0 where undefined).

    Parameters
    ----------
    tp
        Number of matched pairs.
    n_pred, n_true
        Number of predictions and of true points.

    Returns
    -------
    precision, recall, f1
    """
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = fbeta(precision, recall, 1.0)
    return float(precision), float(recall), float(f1)


def fbeta(precision: float, recall: float, beta: float = 1.0) -> float:
    """F-beta score ``(1 + b²) P R / (b² P + R)`` (0 when both are 0).

    Parameters
    ----------
    precision, recall
        Values in [0, 1].
    beta
        Weight of recall relative to precision (beta > 1 favours recall).
    """
    if beta <= 0:
        raise InputError(f"beta must be positive, got {beta!r}.")
    b2 = beta * beta
    den = b2 * precision + recall
    return float((1 + b2) * precision * recall / den) if den > 0 else 0.0


def _xyz(df: pd.DataFrame, cols: Sequence[str]) -> np.ndarray:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise InputError(f"Coordinate table lacks the column(s) {missing}.")
    return df[list(cols)].to_numpy(np.float64)


def _groups(pred: pd.DataFrame, true: pd.DataFrame, by: str | None):
    if by is None:
        yield None, pred, true
        return
    for df, name in ((pred, "pred"), (true, "true")):
        if by not in df.columns:
            raise InputError(f"The {name} table has no '{by}' column to group by.")
    keys = sorted(set(pred[by].astype(str)) | set(true[by].astype(str)))
    pk = pred[by].astype(str)
    tk = true[by].astype(str)
    for k in keys:
        yield k, pred[pk == k], true[tk == k]


def evaluate(
    pred: pd.DataFrame,
    true: pd.DataFrame,
    radius: float,
    *,
    by: str | None = "tomogram",
    cols: Sequence[str] = ("x", "y", "z"),
    score_col: str = "score",
    threshold: float | None = None,
    beta: float = 1.0,
) -> pd.DataFrame:
    """Precision, recall and F-beta per group and overall.

    Parameters
    ----------
    pred, true
        Tables with the coordinate columns ``cols`` (and ``by`` when grouping).
    radius
        Matching radius in the unit of ``cols``.
    by
        Column naming the tomogram; matches never cross groups. ``None`` matches all points at once.
    score_col, threshold
        When ``threshold`` is given, predictions with ``pred[score_col] < threshold`` are dropped.
    beta
        F-beta weight; the column is named ``f1`` for beta 1 and ``fbeta`` otherwise.

    Returns
    -------
    pandas.DataFrame
        One row per group plus a final row ``"all"`` with columns ``group, n_pred, n_true, tp, fp, fn,
        precision, recall, f1|fbeta``.
    """
    if threshold is not None:
        if score_col not in pred.columns:
            raise InputError(f"Prediction table has no '{score_col}' column for thresholding.")
        pred = pred[pred[score_col] >= threshold]
    fname = "f1" if beta == 1.0 else "fbeta"
    rows = []
    for key, p, t in _groups(pred, true, by):
        pi, _, _ = match_points(_xyz(p, cols), _xyz(t, cols), radius)
        tp = len(pi)
        prec, rec, _ = precision_recall_f1(tp, len(p), len(t))
        rows.append(
            {
                "group": "all" if key is None else key,
                "n_pred": len(p),
                "n_true": len(t),
                "tp": tp,
                "fp": len(p) - tp,
                "fn": len(t) - tp,
                "precision": prec,
                "recall": rec,
                fname: fbeta(prec, rec, beta),
            }
        )
    out = pd.DataFrame(rows)
    if by is not None:
        tot = out[["n_pred", "n_true", "tp", "fp", "fn"]].sum() if len(out) else pd.Series(
            {"n_pred": 0, "n_true": 0, "tp": 0, "fp": 0, "fn": 0}
        )
        prec, rec, _ = precision_recall_f1(int(tot["tp"]), int(tot["n_pred"]), int(tot["n_true"]))
        total = {"group": "all", **{k: int(v) for k, v in tot.items()}}
        total.update(precision=prec, recall=rec, **{fname: fbeta(prec, rec, beta)})
        out = pd.concat([out, pd.DataFrame([total])], ignore_index=True)
    return out


def pr_curve(
    pred: pd.DataFrame,
    true: pd.DataFrame,
    radius: float,
    *,
    by: str | None = "tomogram",
    cols: Sequence[str] = ("x", "y", "z"),
    score_col: str = "score",
    max_thresholds: int = 200,
) -> pd.DataFrame:
    """Precision/recall/F1 as a function of the score threshold.

    The Hungarian matching is recomputed at every threshold (the distinct scores, or ``max_thresholds``
    of them at geometrically spaced ranks when there are more), so each row is an exact optimal
    matching of the predictions kept at that threshold.

    Returns
    -------
    pandas.DataFrame
        Columns ``threshold, n_pred, tp, precision, recall, f1`` sorted by decreasing threshold.
    """
    if score_col not in pred.columns:
        raise InputError(f"Prediction table has no '{score_col}' column.")
    scores = np.unique(pred[score_col].to_numpy(np.float64))[::-1]
    if len(scores) > max_thresholds:
        # thresholds at score ranks spaced geometrically: dense among the best-scored predictions,
        # where precision changes fastest, sparse in the long tail of weak ones
        ranks = np.unique(np.round(np.geomspace(1, len(scores), max_thresholds)).astype(int)) - 1
        scores = scores[ranks]
    n_true = len(true)
    rows = []
    for thr in scores:
        res = evaluate(pred, true, radius, by=by, cols=cols, score_col=score_col, threshold=thr)
        tot = res.iloc[-1]
        prec, rec, f1 = precision_recall_f1(int(tot["tp"]), int(tot["n_pred"]), n_true)
        rows.append(
            {"threshold": float(thr), "n_pred": int(tot["n_pred"]), "tp": int(tot["tp"]),
             "precision": prec, "recall": rec, "f1": f1}
        )
    return pd.DataFrame(rows, columns=["threshold", "n_pred", "tp", "precision", "recall", "f1"])


def average_precision(curve: pd.DataFrame) -> float:
    """Average precision ``sum_k P_k (R_k - R_{k-1})`` from a :func:`pr_curve` table.

    Recall is relative to all true points, so missed particles lower the AP.
    """
    if len(curve) == 0:
        return 0.0
    c = curve.sort_values("threshold", ascending=False)
    rec = np.concatenate([[0.0], c["recall"].to_numpy()])
    prec = c["precision"].to_numpy()
    return float(np.sum(prec * np.clip(np.diff(rec), 0, None)))


def matched_accuracy(true: Sequence, pred: Sequence) -> float:
    """Accuracy after the best one-to-one matching of predicted clusters to true classes (Hungarian).

    Clusters left without a class (more clusters than classes) count as wrong; so do noise labels.
    EManalysis matched clusters to classes by size rank instead, which can pair the wrong ones.
    """
    t = pd.factorize(pd.Series(np.asarray(true)))[0]
    p = pd.factorize(pd.Series(np.asarray(pred)))[0]
    if len(t) == 0:
        return 0.0
    if len(t) != len(p):
        raise InputError(f"{len(t)} true labels but {len(p)} predicted labels.")
    cont = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(cont, (t, p), 1)
    rows, cols = linear_sum_assignment(-cont)
    return float(cont[rows, cols].sum() / len(t))


def clustering_scores(true: Sequence, pred: Sequence) -> dict[str, float]:
    """Adjusted Rand index, normalised mutual information and Hungarian-matched accuracy.

    Parameters
    ----------
    true : sequence
        Reference class per object.
    pred : sequence
        Cluster per object (any hashable labels; DBSCAN/HDBSCAN noise ``-1`` is one more label).

    Returns
    -------
    dict
        ``{"ari", "nmi", "accuracy", "n"}``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    t, p = np.asarray(true), np.asarray(pred)
    if len(t) != len(p):
        raise InputError(f"{len(t)} true labels but {len(p)} predicted labels.")
    return {
        "ari": float(adjusted_rand_score(t, p)),
        "nmi": float(normalized_mutual_info_score(t, p)),
        "accuracy": matched_accuracy(t, p),
        "n": int(len(t)),
    }
