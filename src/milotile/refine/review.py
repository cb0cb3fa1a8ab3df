"""The review loop: a person accepts or rejects picks, every verdict is stored, the next round uses them.

Three parts, each usable without the others:

* **Queue** (:func:`review_order`): picks ordered by how much a verdict would teach — the ones whose
  score is nearest the threshold first (in logit units) — interleaved with a *stratified random
  sample* (every ``sample_every``-th item): uniform within the picks kept at the threshold (stratum 1,
  :data:`ABOVE_SHARE` = 3/4 of the sample) and within those below it (stratum 0). A verdict on a sampled
  pick is flagged ``sample`` with its stratum and the stratum's size: only those estimate precision and
  recall, so the estimates carry no selection bias. (A sample uniform over all picks wastes itself on
  the many low-score candidates: on saved look-alike picks, 16 sample verdicts held 0-2 kept picks and
  the precision estimate was off by up to 0.74, ``benchmarks/results/review_rescore_uniform_sample.log``.)
* **Estimates** (:func:`estimate`, :func:`reviewed_threshold`): each sample verdict weighs the number
  of picks it stands for (:func:`design_weights`: stratum size / verdicts in the stratum); the
  weighted fraction accepted at score ``>= t`` estimates the precision of the picks kept at ``t``, the
  weighted fraction of accepted sample picks scoring ``>= t`` the recall *within the reviewed table*
  (particles the picker never proposed are not counted; added particles show they exist). Wilson score
  intervals on the effective sample size (Kish). The reviewed threshold maximises the estimated F1 (or
  reaches a target precision).
* **Verdict tables** (:class:`VerdictLog`): accepted picks and added particles go to
  ``tables/labels-<name>``, rejections to ``tables/negatives-<name>``, each row with who, when, the
  picker run, the picks table, the pick's row and score, the reason and the sample flag. Written on
  every verdict, so a closed browser tab loses nothing.

:func:`retrain` is the next round: fine-tune from the previous picker (:func:`milotile.refine.train.train`
with ``init_from``) on its labels plus the accepted picks, its negatives plus the rejections; pick again;
re-score the reviewed sample with the new picker and choose the threshold from it. :func:`apply_rethreshold`
is the round without training: the reviewed picks at the threshold their own verdicts choose.

Keeping whichever of the two rounds the sample estimates better was measured and lost: the estimated F1s
err by 0.1-0.25 at 50 verdicts (16-25 of them from the sample), and over 11 review rounds the mean F1 was 0.780
always retrained, 0.749 re-thresholded, 0.755 keeping the better estimate (0.763 with a 0.1 margin); the rule
gained on look-alike 3 (1.000 instead of 0.897) and lost on look-alike 5 (0.769 instead of 0.951)
(``benchmarks/results/review_keep_session15.json``). :func:`retrain` reports both estimates instead.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["REASONS", "VerdictLog", "apply_rethreshold", "design_weights", "estimate", "load_picks", "rescored_weights",
           "rethreshold", "retrain", "review_order", "reviewed_threshold", "round_labels", "sample_threshold",
           "sample_weights", "table_verdicts", "wilson_interval"]

#: Reasons a rejected pick can be tagged with (keys 1-4 on the review page).
REASONS = ("other species", "junk", "gold", "duplicate")
#: Every ``SAMPLE_EVERY``-th queue item is drawn at random (stratified by the threshold).
SAMPLE_EVERY = 3
#: Share of the random sample drawn from the picks kept at the threshold (the rest from those below).
ABOVE_SHARE = 0.75
#: Fewest reviewed sample picks from which :func:`retrain` re-chooses the threshold.
MIN_SAMPLE = 10
#: Fewest accepted sample picks from which :func:`reviewed_threshold` chooses a threshold. On saved review
#: rounds, 3 accepted of 16 chose 0.08 where the automatic threshold chose 0.92 (estimated precision 0.34,
#: true 0.07; F1 0.13 against 0.43), while 8-19 accepted chose thresholds within 0.06 F1 of the automatic one
#: (``benchmarks/review.py --part rechoose``).
MIN_ACCEPTED = 5
#: Fewest sample picks a threshold chosen by :func:`reviewed_threshold` keeps.
MIN_ABOVE = 5
#: Fewest sample picks per score bin when a new picker's scores re-weight the sample (:func:`rescored_weights`).
MIN_PER_BIN = 5
#: Box (voxels) of the thumbnails for a table without a picker (imported picks) and without ``radius``.
DEFAULT_BOX = 32.0
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
_VERDICTS = ("accept", "reject", "add")
_COLUMNS = ["vid", "tomogram", "x", "y", "z", "class", "verdict", "reason", "sample", "stratum", "stratum_n", "score",
            "pick", "picks", "run", "who", "when"]


# ------------------------------------------------------------------------------- statistics
def wilson_interval(k: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n == 0``).

    Examples
    --------
    >>> lo, hi = wilson_interval(8, 10)
    >>> round(lo, 3), round(hi, 3)
    (0.49, 0.943)
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(max(0.0, mid - half)), float(min(1.0, mid + half))


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(s, np.float64), 1e-6, 1 - 1e-6)
    return np.log(s / (1 - s))


def review_order(scores: Sequence[float], threshold: float | None, *, sample_every: int = SAMPLE_EVERY,
                 above_share: float = ABOVE_SHARE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The review queue: row indices of the picks in review order and which of them are the random sample.

    Parameters
    ----------
    scores
        Pick scores (probabilities; a table without scores passes constant values).
    threshold
        The picks' threshold (default: the median score).
    sample_every
        Every ``sample_every``-th item is the next pick of a random permutation of one stratum (not
        yet queued); the others are the picks nearest the threshold in logit units. ``1``: the whole
        queue is the random sample.
    above_share
        Share of the sample drawn from the picks at ``score >= threshold`` (stratum 1); the rest come
        from those below (stratum 0); an exhausted stratum gives way to the other.
    seed
        Seed of the random sample (the same seed gives the same queue, so a reloaded page resumes).

    Returns
    -------
    order, sample
        ``order`` (int64, every row once) and ``sample`` (bool, per queue position).
    """
    s = np.asarray(scores, np.float64)
    n = len(s)
    if sample_every < 1:
        raise InputError(f"sample_every must be at least 1, got {sample_every}")
    t = float(np.median(s)) if threshold is None and n else float(threshold or 0.5)
    near = np.argsort(np.abs(_logit(s) - _logit(np.array([t])))[:], kind="stable")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    strata = [perm[s[perm] < t], perm[s[perm] >= t]]  # a random order within each stratum
    i_str = [0, 0]
    taken = np.zeros(n, bool)
    order = np.empty(n, np.int64)
    sample = np.zeros(n, bool)
    i_near = 0
    k_sample = 0
    for pos in range(n):
        from_sample = (pos + 1) % sample_every == 0
        if from_sample:
            want = int(np.floor((k_sample + 1) * above_share) > np.floor(k_sample * above_share))
            k_sample += 1
            for st in (want, 1 - want):
                while i_str[st] < len(strata[st]) and taken[strata[st][i_str[st]]]:
                    i_str[st] += 1
                if i_str[st] < len(strata[st]):
                    j = strata[st][i_str[st]]
                    break
            else:  # both strata exhausted (cannot happen while picks remain)
                from_sample = False
        if not from_sample:
            while taken[near[i_near]]:
                i_near += 1
            j = near[i_near]
        taken[j] = True
        order[pos] = j
        sample[pos] = from_sample
    return order, sample


def design_weights(stratum: Sequence[int], stratum_n: Sequence[int], sample: Sequence[bool]) -> np.ndarray:
    """Weight of each verdict of one picks table in the precision / recall estimates.

    The picks judged from the informative part of the queue are known exactly (weight 1). The
    sample verdicts of a stratum are a uniform sample of the stratum's other picks, so each stands
    for ``(stratum size - informative verdicts in it) / sample verdicts in it`` picks. Rows with
    stratum ``-1`` (none recorded) weigh 1.

    Examples
    --------
    >>> design_weights([1, 1, 1, 0], [100, 100, 100, 900], [True, True, False, True]).tolist()
    [49.5, 49.5, 1.0, 900.0]
    """
    st = np.asarray(stratum, np.int64)
    sn = np.asarray(stratum_n, np.float64)
    sm = np.asarray(sample, bool)
    w = np.ones(len(st))
    for k in np.unique(st[st >= 0]):
        m = (st == k) & sm
        if m.any():
            w[m] = max(float(sn[m].max()) - int(((st == k) & ~sm).sum()), float(m.sum())) / m.sum()
    return w


def _wprop(num: np.ndarray, den: np.ndarray, w: np.ndarray, z: float) -> tuple[float, tuple[float, float]]:
    """Weighted proportion ``sum(w num) / sum(w den)`` and its Wilson interval on Kish's effective size."""
    wd = w[den]
    if not len(wd) or wd.sum() <= 0:
        return float("nan"), (0.0, 1.0)
    p = float((w * (num & den)).sum() / wd.sum())
    n_eff = float(wd.sum() ** 2 / (wd**2).sum())
    return p, wilson_interval(p * n_eff, n_eff, z)


def estimate(scores: Sequence[float], accepted: Sequence[bool], threshold: float, *,
             weights: Sequence[float] | None = None, z: float = 1.96) -> dict[str, Any]:
    """Precision and recall (within the reviewed table) of the picks kept at ``score >= threshold``.

    Parameters
    ----------
    scores, accepted
        Score and verdict of each reviewed pick. Unweighted, they must be a uniform random sample
        (the queue's informative picks alone would bias the estimate); with ``weights`` from
        :func:`design_weights`, every verdict of the queue counts.
    threshold
        The threshold to evaluate.
    weights
        Design weights of the sample verdicts (:func:`design_weights`; default equal).
    z
        Normal quantile of the Wilson intervals (1.96: 95 %).

    Returns
    -------
    dict
        ``precision``, ``precision_ci``, ``recall``, ``recall_ci``, ``f1`` (NaN where undefined),
        ``n_sample``, ``n_above`` (sample picks at ``>= threshold``), ``n_accepted``.
    """
    s = np.asarray(scores, np.float64)
    a = np.asarray(accepted, bool)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, np.float64)
    above = s >= threshold
    p, p_ci = _wprop(a, above, w, z)
    r, r_ci = _wprop(above, a, w, z)
    f1 = 2 * p * r / (p + r) if np.isfinite(p) and np.isfinite(r) and p + r > 0 else float("nan")
    return {"threshold": float(threshold), "precision": p, "precision_ci": p_ci, "recall": r, "recall_ci": r_ci,
            "f1": f1, "n_sample": int(len(s)), "n_above": int(above.sum()), "n_accepted": int(a.sum())}


def reviewed_threshold(scores: Sequence[float], verdicts: Sequence[bool], *, weights: Sequence[float] | None = None,
                       target_precision: float | None = None, min_reviews: int = MIN_SAMPLE,
                       min_accepted: int = MIN_ACCEPTED, min_above: int = MIN_ABOVE, z: float = 1.96) -> dict[str, Any]:
    """Choose the pick threshold from a reviewed random sample of picks.

    Each distinct sample score that keeps at least ``min_above`` sample picks is a candidate
    threshold (a precision from one or two picks is noise: on saved look-alike picks, the F1 optimum
    over every score chose thresholds whose estimated precision was 1 and true precision 0.05);
    its precision and recall are estimated with :func:`estimate`. Default: the candidate with the highest estimated F1 (ties: the higher
    threshold); with ``target_precision``: the lowest candidate whose estimated precision reaches
    it (the highest-precision candidate when none does). The returned threshold lies halfway (in
    logit units) between the chosen score and the next lower sample score, so that the
    reviewed picks at the chosen score are kept by ``score >= threshold`` and ``score > threshold``.

    Parameters
    ----------
    scores, verdicts
        Score (under the picker being thresholded) and verdict (``True`` = accepted) of each
        reviewed random-sample pick.
    weights
        Design weights (:func:`design_weights`; default equal).
    target_precision
        Optional precision to reach instead of the F1 optimum.
    min_reviews
        Fewest reviewed picks to decide; fewer raise :class:`InputError`.
    min_accepted
        Fewest accepted reviewed picks to decide (default :data:`MIN_ACCEPTED`, at least 1); fewer raise
        :class:`InputError`: a precision curve drawn from two or three particles chose thresholds far below
        the automatic one.
    min_above
        Fewest sample picks a candidate threshold keeps (default :data:`MIN_ABOVE`).
    z
        Normal quantile of the Wilson intervals.

    Returns
    -------
    dict
        :func:`estimate` at the chosen threshold plus ``rule`` (``"f1"`` / ``"precision"``).
    """
    s = np.asarray(scores, np.float64)
    a = np.asarray(verdicts, bool)
    if len(s) != len(a):
        raise InputError(f"scores and verdicts differ in length ({len(s)} and {len(a)}).")
    need_acc = max(int(min_accepted), 1)
    if len(s) < min_reviews or a.sum() < need_acc:
        raise InputError(f"{len(s)} reviewed picks ({int(a.sum())} accepted): review at least {min_reviews} picks, "
                         f"{need_acc} of them accepted, to choose a threshold from them.")
    cands = np.unique(s[s > 0])[::-1] if (s > 0).any() else np.unique(s)[::-1]
    keep = np.array([(s >= c).sum() >= min(min_above, len(s)) for c in cands])
    cands = cands[keep] if keep.any() else cands[-1:]
    est = [estimate(s, a, float(c), weights=weights, z=z) for c in cands]
    if target_precision is None:
        f1 = np.array([e["f1"] if np.isfinite(e["f1"]) else -1.0 for e in est])
        k = int(np.argmax(f1))  # first maximum = the highest threshold among ties
        rule = "f1"
    else:
        ok = [i for i, e in enumerate(est) if np.isfinite(e["precision"]) and e["precision"] >= target_precision]
        k = ok[-1] if ok else int(np.nanargmax([e["precision"] for e in est]))
        rule = "precision"
    chosen = float(cands[k])
    lower = s[(s < chosen) & (s > 0)]  # a pick no candidate holds (score 0) is no lower neighbour
    thr = (1 / (1 + np.exp(-(_logit(np.array([chosen]))[0] + _logit(np.array([lower.max()]))[0]) / 2))
           if len(lower) else chosen * 0.999)
    out = estimate(s, a, float(thr), weights=weights, z=z)
    out.update(rule=rule, chosen_score=chosen)
    return out


# ------------------------------------------------------------------------------- picks
def load_picks(col: Any, spec: str | os.PathLike[str] | pd.DataFrame = "picks") -> tuple[pd.DataFrame, dict[str, Any]]:
    """A picks table to review and what is known about it.

    Parameters
    ----------
    col
        The collection.
    spec
        A table of the store (``picks``), a file in any layout :func:`milotile.formats.read_labels`
        reads (STAR, copick JSON, IMOD ``.mod``, MiLoPYP TSV, parquet/CSV), or a DataFrame.

    Returns
    -------
    picks, info
        ``picks`` with ``tomogram, x, y, z, score, class`` (score 1 and class ``particle`` when missing);
        ``info``: ``table`` (name or file), ``run``, ``checkpoint``, ``threshold``, ``box`` (voxels).
    """
    from milotile.formats import read_labels

    params: dict[str, Any] = {}
    if isinstance(spec, pd.DataFrame):
        df, name = spec.copy(), "dataframe"
    elif "/" not in str(spec) and not str(spec).startswith(".") and col.has_table(str(spec)):
        df, name = col.read_table(str(spec)), str(spec)
        params = col.table_params(name)
    elif Path(spec).exists():
        p = Path(spec)
        df = (pd.read_parquet(p) if p.suffix.lower() in (".parquet", ".pq") else read_labels(p, col))
        name = p.name
    else:
        raise InputError(f"Picks {str(spec)!r} are neither a table of {col.url} nor a file.")
    missing = {"tomogram", "x", "y", "z"} - set(df.columns)
    if missing:
        raise InputError(f"Picks {name!r} lack the column(s) {sorted(missing)}.")
    unknown = sorted(set(df["tomogram"].astype(str)) - set(col.names))
    if unknown:
        raise InputError(f"Picks {name!r} name tomogram(s) {unknown[:5]} that are not in {col.url}.")
    df = df.reset_index(drop=True)
    df["tomogram"] = df["tomogram"].astype(str)
    if "score" not in df:
        df["score"] = 1.0
    if "class" not in df:
        df["class"] = df["species"].astype(str) if "species" in df else "particle"
    ckpt = params.get("checkpoint")
    box = _box(ckpt, df)
    thr = params.get("threshold")
    run = params.get("run") or (Path(ckpt).parent.name if ckpt and ckpt != "None" else None)
    return df, {"table": name, "run": run, "checkpoint": ckpt if ckpt and ckpt != "None" else None,
                "threshold": None if thr is None else float(thr), "box": box}


def _box(ckpt: str | None, df: pd.DataFrame) -> float:
    """The picker's box (its contract ``bbox``), else twice a ``radius`` column, else :data:`DEFAULT_BOX`."""
    if ckpt and ckpt != "None" and Path(ckpt).is_file():
        try:
            from milotile.nn.checkpoint import load_checkpoint

            return float(load_checkpoint(Path(ckpt), map_location="cpu")["contract"]["bbox"])
        except (KeyError, OSError, RuntimeError, InputError) as exc:
            log.warning("no box from %s (%s); using the default", ckpt, exc)
    if "radius" in df and len(df):
        return float(2 * np.nanmedian(df["radius"].to_numpy(np.float64)))
    return DEFAULT_BOX


# ------------------------------------------------------------------------------- verdicts
class VerdictLog:
    """Verdicts of a review, kept in ``tables/labels-<name>`` (accept, add) and ``tables/negatives-<name>`` (reject).

    Every change rewrites the table it touches (atomically, :meth:`Collection.write_table`), so the
    store always holds every verdict made so far. These two tables are the only thing it writes.

    Parameters
    ----------
    col
        The collection (opened writable).
    name
        Review name (default ``review``): the tables are ``labels-<name>`` and ``negatives-<name>``.
    who
        Reviewer recorded with each verdict (default the login name).
    """

    def __init__(self, col: Any, name: str = "review", who: str | None = None):
        if not _NAME.match(str(name)):
            raise InputError(f"review name {name!r} must be letters, digits, '_', '-' or '.' (at most 80).")
        self.col = col
        self.name = str(name)
        self.who = who or _user()
        self._lock = threading.Lock()
        frames = [col.read_table(t) for t in self.tables.values() if col.has_table(t)]
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_COLUMNS)
        rows = rows.assign(**{c: rows[c] if c in rows else d for c, d in (("stratum", -1), ("stratum_n", 0))})
        rows = rows.sort_values("when", kind="stable") if len(rows) else rows  # undo takes the latest
        self.rows: list[dict[str, Any]] = rows.to_dict("records")

    @property
    def tables(self) -> dict[str, str]:
        """``{"labels": "labels-<name>", "negatives": "negatives-<name>"}``."""
        return {"labels": f"labels-{self.name}", "negatives": f"negatives-{self.name}"}

    def frame(self, verdicts: Sequence[str] = _VERDICTS) -> pd.DataFrame:
        """The verdicts (all, or of the given kinds) in the order they were made."""
        with self._lock:
            df = pd.DataFrame(self.rows, columns=_COLUMNS)
        return df[df["verdict"].isin(list(verdicts))].reset_index(drop=True)

    def add(self, verdict: str, *, tomogram: str, x: float, y: float, z: float, cls: str = "particle",
            reason: str = "", sample: bool = False, stratum: int = -1, stratum_n: int = 0,
            score: float = float("nan"), pick: int = -1, picks: str = "", run: str | None = None) -> dict[str, Any]:
        """Record one verdict (``accept``, ``reject`` or ``add`` = a missed particle) and write its table.

        ``sample``, ``stratum``, ``stratum_n``: the pick came from the queue's random sample, from
        stratum 1 (kept at the threshold) or 0, which held ``stratum_n`` picks.

        A new verdict on a pick already judged (same ``picks`` table, ``pick`` row and picker ``run``) replaces
        the old one; a table of the same name written again by another run (``refine retrain`` writes ``picks``)
        holds other picks, and its verdicts are new ones.
        """
        if verdict not in _VERDICTS:
            raise InputError(f"verdict must be one of {_VERDICTS}, got {verdict!r}")
        if reason and reason not in REASONS:
            raise InputError(f"reason must be one of {REASONS}, got {reason!r}")
        if str(tomogram) not in set(self.col.names):
            raise InputError(f"tomogram {tomogram!r} is not in {self.col.url}")
        row = {"vid": uuid.uuid4().hex[:12], "tomogram": str(tomogram), "x": float(x), "y": float(y), "z": float(z),
               "class": str(cls), "verdict": verdict, "reason": str(reason if verdict == "reject" else ""),
               "sample": bool(sample), "stratum": int(stratum), "stratum_n": int(stratum_n), "score": float(score), "pick": int(pick), "picks": str(picks),
               "run": "" if run is None else str(run), "who": self.who,
               "when": datetime.now(UTC).isoformat(timespec="seconds")}
        with self._lock:
            old = [r for r in self.rows if pick >= 0 and int(r["pick"]) == pick and r["picks"] == picks
                   and str(r["run"]) == row["run"]]  # the same row of the same table written by the same run
            self.rows = [r for r in self.rows if not any(r is o for o in old)] + [row]
            self._write({_kind(row["verdict"])} | {_kind(o["verdict"]) for o in old})
        return row

    def undo(self, vid: str | None = None) -> dict[str, Any] | None:
        """Remove the verdict ``vid`` (default the last one made); returns it (``None`` when there is none)."""
        with self._lock:
            if not self.rows:
                return None
            i = len(self.rows) - 1 if vid is None else next((k for k, r in enumerate(self.rows) if r["vid"] == vid), -1)
            if i < 0:
                return None
            row = self.rows.pop(i)
            self._write({_kind(row["verdict"])})
        return row

    def _write(self, kinds: set[str]) -> None:
        df = pd.DataFrame(self.rows, columns=_COLUMNS)
        for kind in sorted(kinds):
            sub = df[df["verdict"].map(_kind) == kind].reset_index(drop=True)
            sub = sub.astype({"x": float, "y": float, "z": float, "score": float, "pick": np.int64, "sample": bool,
                              "stratum": np.int64, "stratum_n": np.int64})
            self.col.write_table(self.tables[kind], sub, params={"source": "review", "review": self.name},
                                 consolidate=False)


def _kind(verdict: str) -> str:
    return "negatives" if verdict == "reject" else "labels"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ------------------------------------------------------------------------------- next round
def sample_weights(verdicts: pd.DataFrame) -> np.ndarray:
    """:func:`design_weights` of accept / reject verdicts, per picks table (other rows weigh 1)."""
    w = np.ones(len(verdicts))
    for _, g in verdicts[verdicts["verdict"].isin(["accept", "reject"])].groupby("picks"):
        rows = verdicts.index.get_indexer(g.index)
        w[rows] = design_weights(g["stratum"].to_numpy(np.int64), g["stratum_n"].to_numpy(np.int64),
                                 g["sample"].to_numpy(bool))
    return w


def round_labels(contract: dict[str, Any], verdicts: pd.DataFrame, *, train_on_sample: bool = False
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labels and negatives of the next round: the previous picker's plus the review's, each place once.

    A second round under the same review name sees the first round's verdicts again, and the previous
    picker's contract already holds them (it was trained on them): they are kept once, so no verdict
    weighs double. A pick the reviewer accepted after an earlier rejection (or the reverse) keeps its
    latest verdict only.

    Parameters
    ----------
    contract
        The previous picker's contract (``classes``, ``train_labels``, ``train_negatives``).
    verdicts
        :meth:`VerdictLog.frame` of the review.
    train_on_sample
        Also train on the random-sample verdicts (default: held out, see :func:`retrain`).

    Returns
    -------
    labels, negatives
        ``tomogram, x, y, z, class`` and ``tomogram, x, y, z``.
    """
    rows = verdicts if train_on_sample else verdicts[~verdicts["sample"].astype(bool)]
    cls0 = (contract.get("classes") or ["particle"])[0]
    xyz = ["tomogram", "x", "y", "z"]
    prev_lab = pd.DataFrame(contract.get("train_labels") or [], columns=[*xyz, "class"])
    prev_neg = pd.DataFrame(contract.get("train_negatives") or [], columns=xyz)
    new_lab = rows[rows["verdict"].isin(["accept", "add"])][xyz].assign(**{"class": cls0})
    new_neg = rows[rows["verdict"] == "reject"][xyz]

    def places(df: pd.DataFrame) -> pd.Series:
        c = df[["x", "y", "z"]].to_numpy(np.float64).round(3)
        return pd.Series([f"{t}|{a}|{b}|{d}" for t, (a, b, d) in zip(df["tomogram"].astype(str), c, strict=True)],
                         index=df.index, dtype=object)

    # a place rejected in this review is no label, a place accepted is no negative (the latest verdict wins
    # within the review: VerdictLog keeps one verdict per pick)
    labels = pd.concat([prev_lab[~places(prev_lab).isin(set(places(new_neg)))], new_lab], ignore_index=True)
    negs = pd.concat([prev_neg[~places(prev_neg).isin(set(places(new_lab)))], new_neg], ignore_index=True)
    labels = labels[~places(labels).duplicated()].reset_index(drop=True)
    negs = negs[~places(negs).duplicated()].reset_index(drop=True)
    return labels, negs


def rescored_weights(sample_scores: Sequence[float], candidate_scores: Sequence[float], *,
                     min_per_bin: int = MIN_PER_BIN) -> np.ndarray:
    """Weights of reviewed sample picks re-scored by a new picker (post-stratified on the new scores).

    The design weights (:func:`design_weights`) describe the candidates of the picker that was reviewed;
    the sample picks of its large low-score stratum each stand for hundreds of them, and under a
    retrained picker one such rejected pick that now scores high claims hundreds of false positives the
    new picks do not hold (on the hard preset after 100 verdicts: estimated precision 0.53 against a true
    0.78, threshold 0.82 chosen where the best was 0.06, F1 0.20 against 0.70). Here the new candidates'
    score counts are known: the sample picks the new picker proposes (score > 0) are sorted by score and
    cut into bins of at least ``min_per_bin`` (from the top; the remainder joins the lowest bin); a bin
    spans the scores from halfway to the next lower bin to halfway to the next higher one (the lowest
    down to 0, the highest up to 1), and each of its picks weighs the new candidates in that span over
    the bin's sample picks. Sample picks the new picker no longer proposes (score 0) weigh what a pick
    of the lowest bin weighs (they count against recall at every threshold).

    Parameters
    ----------
    sample_scores
        Score of each sample pick under the new picker (0: not proposed).
    candidate_scores
        Scores of all the new picker's candidates.
    min_per_bin
        Fewest sample picks per bin.

    Returns
    -------
    numpy.ndarray
        One weight per sample pick.

    Examples
    --------
    >>> rescored_weights([0.9, 0.8, 0.2, 0.1, 0.0], [0.95, 0.9, 0.8, 0.5, 0.3, 0.2, 0.1, 0.1], min_per_bin=2).tolist()
    [2.0, 2.0, 2.0, 2.0, 2.0]
    """
    s = np.asarray(sample_scores, np.float64)
    c = np.asarray(candidate_scores, np.float64)
    w = np.zeros(len(s))
    pos = np.flatnonzero(s > 0)
    if not len(pos):
        return np.ones(len(s))
    order = pos[np.argsort(-s[pos], kind="stable")]
    k = max(int(min_per_bin), 1)
    groups = [order[i:i + k] for i in range(0, len(order), k)]
    if len(groups) > 1 and len(groups[-1]) < k:
        groups[-2] = np.concatenate([groups[-2], groups[-1]])
        groups.pop()
    hi = np.inf
    for j, g in enumerate(groups):
        lo = 0.0 if j == len(groups) - 1 else (s[g].min() + s[groups[j + 1]].max()) / 2.0
        n_cand = int(((c >= lo) & (c < hi)).sum()) if j else int((c >= lo).sum())
        w[g] = max(n_cand, len(g)) / len(g)
        hi = lo
    w[s <= 0] = w[groups[-1]].min()
    return w


def sample_threshold(candidates: pd.DataFrame, verdicts: pd.DataFrame, radius: float, *,
                     target_precision: float | None = None, weighting: str = "rescored") -> dict[str, Any] | None:
    """The threshold of a new picker's candidates chosen from the review's random-sample verdicts.

    Each sample pick takes the best score of a new candidate within ``radius``
    (:func:`milotile.refine.threshold.label_scores`); the weights are :func:`rescored_weights`
    (``weighting="rescored"``) or the sample's design weights on the reviewed picks
    (``"design"``, :func:`sample_weights`: right for the reviewed picks themselves, not for a new
    picker's). ``None`` with fewer than :data:`MIN_SAMPLE` sample verdicts or fewer than :data:`MIN_ACCEPTED`
    accepted (the caller falls back to the automatic threshold).

    Returns
    -------
    dict or None
        :func:`reviewed_threshold`'s result plus ``weighting``.
    """
    from milotile.refine.threshold import label_scores

    if weighting not in ("rescored", "design"):
        raise InputError(f"weighting must be 'rescored' or 'design', got {weighting!r}")
    keep = verdicts["sample"].astype(bool) & verdicts["verdict"].isin(["accept", "reject"])
    samp = verdicts[keep].reset_index(drop=True)
    if len(samp) < MIN_SAMPLE or (samp["verdict"] == "accept").sum() < MIN_ACCEPTED:
        return None
    scores = label_scores(candidates, samp, radius=radius)
    if weighting == "design":
        w = sample_weights(verdicts)[keep.to_numpy()]
    else:
        w = rescored_weights(scores, candidates["score"].to_numpy(np.float64))
    est = reviewed_threshold(scores, samp["verdict"] == "accept", weights=w, target_precision=target_precision)
    est["weighting"] = weighting
    return est


def table_verdicts(verdicts: pd.DataFrame, table: str, run: str | None) -> pd.DataFrame:
    """The accept / reject verdicts on the picks table ``table`` as it is now: made on a table of that name by the
    same picker run (``run``, the table's ``run`` parameter; verdicts on an earlier table of the same name, which a
    later round replaced, are not its verdicts)."""
    rows = verdicts[verdicts["verdict"].isin(["accept", "reject"]) & (verdicts["picks"].astype(str) == str(table))]
    if run not in (None, "", "None"):
        rows = rows[rows["run"].astype(str) == str(run)]
    return rows.reset_index(drop=True)


def rethreshold(col: Any, verdicts: pd.DataFrame, *, table: str | None = None,
                target_precision: float | None = None) -> dict[str, Any]:
    """The reviewed picks at the threshold their own verdicts choose (the round without training).

    Parameters
    ----------
    col
        The collection.
    verdicts
        :meth:`VerdictLog.frame` of the review.
    table
        The reviewed picks table of the store (default: the table of the latest accept / reject verdict).
        Its verdicts (:func:`table_verdicts`; all of them, weighted by the sample's design,
        :func:`sample_weights`) choose the threshold (:func:`reviewed_threshold`).
    target_precision
        Passed to :func:`reviewed_threshold`.

    Returns
    -------
    dict
        :func:`reviewed_threshold`'s result plus ``table``, ``run`` (the table's picker run), ``candidates`` (the
        whole table) and ``picks`` (its rows at the threshold).

    Raises
    ------
    InputError
        When the table is not in the store, its rows no longer are the ones reviewed, or it has too few verdicts
        (the message says how many it has and how many it needs).
    """
    judged = verdicts[verdicts["verdict"].isin(["accept", "reject"]) & (verdicts["picks"].astype(str) != "")]
    if table is None:
        if not len(judged):
            raise InputError("no reviewed pick: accept or reject picks on the review page first.")
        table = str(judged["picks"].iloc[-1])
    if not col.has_table(table):
        raise InputError(f"the reviewed picks {table!r} are not a table of {col.url} (a file was reviewed): "
                         "import it as a table to re-threshold it.")
    run = col.table_params(table).get("run")
    rows = table_verdicts(verdicts, table, run)
    cands = col.read_table(table)
    idx = rows["pick"].to_numpy(np.int64)
    same = len(idx) == 0 or (idx.max() < len(cands) and np.allclose(
        cands[["x", "y", "z"]].to_numpy(np.float64)[idx], rows[["x", "y", "z"]].to_numpy(np.float64), atol=1e-3))
    if not same:
        raise InputError(f"the rows of {table!r} are not the ones reviewed (the table was written again since): "
                         "review it again.")
    try:
        est = reviewed_threshold(rows["score"].to_numpy(np.float64), (rows["verdict"] == "accept").to_numpy(),
                                 weights=sample_weights(rows), target_precision=target_precision)
    except InputError as exc:
        earlier = len(table_verdicts(verdicts, table, None)) - len(rows)
        why = f" ({earlier} more were made on an earlier table of that name)" if earlier else ""
        raise InputError(f"{table!r} is not re-thresholded{why}: {exc}") from None
    est.update(table=table, run=run, candidates=cands,
               picks=cands[cands["score"] >= est["threshold"]].reset_index(drop=True))
    return est


def apply_rethreshold(col: Any, name: str = "review", *, table: str = "picks-reviewed", source: str | None = None,
                      target_precision: float | None = None) -> dict[str, Any]:
    """Write the reviewed picks at the threshold their verdicts choose (:func:`rethreshold`) to ``table``.

    Parameters
    ----------
    col
        The collection.
    name
        Review name (its verdict tables).
    table
        Store table to write (not the reviewed table itself: its rows are what the verdicts point at).
    source
        The reviewed picks table (default: the table of the latest verdict).
    target_precision
        Passed to :func:`reviewed_threshold`.

    Returns
    -------
    dict
        :func:`rethreshold`'s result.
    """
    res = rethreshold(col, VerdictLog(col, name).frame(), table=source, target_precision=target_precision)
    if table == res["table"]:
        raise InputError(f"{table!r} is the reviewed table (its verdicts point at its rows): write to another table.")
    src = col.table_params(res["table"])
    params = {"threshold": float(res["threshold"]), "run": res["run"], "checkpoint": src.get("checkpoint"),
              "review": name, "source": res["table"], "estimate": _plain(res)}
    col.write_table(table, res["picks"], params=params, written_only=True)
    return res


def _plain(est: dict[str, Any]) -> dict[str, Any]:
    """An estimate without its tables (``candidates``, ``picks``)."""
    return {k: v for k, v in est.items() if k not in ("candidates", "picks")}


def retrain(col: Any, run: str | os.PathLike[str], *, name: str = "review", out: str | os.PathLike[str] | None = None,
            train_on_sample: bool = False, floor: float = 0.05, table: str | None = "picks",
            target_precision: float | None = None, device: str | None = "cpu", write_heatmaps: bool = True,
            **overrides: Any) -> dict[str, Any]:
    """One more round: fine-tune the picker of ``run`` with the review's verdicts and pick again.

    Parameters
    ----------
    col
        The collection.
    run
        The previous picker (run folder or checkpoint).
    name
        Review name (tables ``labels-<name>``, ``negatives-<name>``).
    out
        New run folder (default ``<store>/runs/<run>-r<k>``).
    train_on_sample
        Also train on the random-sample verdicts. Default ``False``: they are held out, so the
        threshold and the precision estimate of the new picker stay unbiased.
    floor
        Lowest score kept when picking again (the candidates of the next review).
    table
        Store table for the new picks at the reviewed threshold (``None``: none); the candidates down
        to ``floor`` go to ``<table>-all`` (the next round's review table).
    target_precision
        Passed to :func:`reviewed_threshold`.
    device
        Training and prediction device.
    write_heatmaps
        Store the new picker's heatmaps (the review page's overlay).
    **overrides
        Recipe overrides for :func:`milotile.refine.train.train` (e.g. ``epochs``).

    Returns
    -------
    dict
        ``run`` (new run folder), ``picks`` (DataFrame at the threshold), ``candidates``, ``threshold``,
        ``estimate`` (of the new picks, or ``None`` with too few sample verdicts), ``previous`` (the reviewed
        picks without training, :func:`rethreshold`: ``table``, ``threshold`` and ``estimate``; ``None`` where it
        raised: too few verdicts, a reviewed file, a table written again since), ``n_labels``, ``n_negatives``, ``train_s``, ``pick_s``.
    """
    from milotile.refine.picker import Picker
    from milotile.refine.predict import pick
    from milotile.refine.train import train

    old = Picker.load(run, device="cpu")
    contract = old.contract
    verdicts = VerdictLog(col, name).frame()
    try:  # the round without training, for comparison; read before the new picks may replace the reviewed table
        prev = rethreshold(col, verdicts, target_precision=target_precision)
    except InputError as exc:
        log.info("no re-threshold of the reviewed picks to compare with: %s", exc)
        prev = None
    labels, negs = round_labels(contract, verdicts, train_on_sample=train_on_sample)
    if out is None:
        base = Path(old.path).parent
        k = 1
        while (base.parent / f"{base.name}-r{k}").exists():
            k += 1
        out = base.parent / f"{base.name}-r{k}"
    t0 = time.perf_counter()
    picker = train(col, labels, negatives=negs if len(negs) else None, init_from=old.path, out=out, device=device,
                   **overrides)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cands = pick(col, picker, threshold=floor, write_heatmaps=write_heatmaps, table=None)
    pick_s = time.perf_counter() - t0
    est = sample_threshold(cands, verdicts, float(contract["bbox"]) / 4.0, target_precision=target_precision)
    if est is not None:
        threshold = float(est["threshold"])
    else:
        from milotile.refine.threshold import apply_auto_threshold

        smp = verdicts[verdicts["sample"].astype(bool) & verdicts["verdict"].isin(["accept", "reject"])]
        log.warning("%d reviewed sample picks, %d accepted: threshold chosen automatically (the sample chooses it "
                    "from %d reviewed, %d of them accepted)", len(smp), int((smp["verdict"] == "accept").sum()),
                    MIN_SAMPLE, MIN_ACCEPTED)
        _, info = apply_auto_threshold(cands, picker.contract)
        threshold = float(min(v["threshold"] for v in info.values())) if info else floor
    picks = cands[cands["score"] >= threshold].reset_index(drop=True)
    previous = None if prev is None else {"table": prev["table"], "threshold": float(prev["threshold"]),
                                          "estimate": _plain(prev)}
    run_id = Path(picker.path).parent.name
    if table:
        params = {"threshold": threshold, "checkpoint": str(picker.path), "run": run_id, "review": name,
                  "estimate": None if est is None else {k: v for k, v in est.items()}}
        col.write_table(table, picks, params=params, written_only=True)
        col.write_table(f"{table}-all", cands, params={**params, "floor": float(floor)}, written_only=True)
    return {"run": str(Path(picker.path).parent), "picks": picks, "candidates": cands, "threshold": threshold,
            "estimate": est, "previous": previous, "n_labels": int(len(labels)), "n_negatives": int(len(negs)),
            "train_s": round(train_s, 1), "pick_s": round(pick_s, 1)}
