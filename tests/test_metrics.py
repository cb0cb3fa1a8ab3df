"""Point matching (Hungarian on squared distances within a radius) and detection metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import linear_sum_assignment

from milotile.errors import InputError
from milotile.metrics import (
    average_precision,
    evaluate,
    fbeta,
    match_points,
    pr_curve,
    precision_recall_f1,
)


def test_radius_is_inclusive_and_squared_correctly():
    true = np.array([[0.0, 0.0, 0.0]])
    pi, ti, d = match_points([[3.0, 4.0, 0.0]], true, radius=5.0)  # distance exactly 5
    assert pi.tolist() == [0] and ti.tolist() == [0] and d[0] == pytest.approx(5.0)
    assert len(match_points([[3.0, 4.01, 0.0]], true, radius=5.0)[0]) == 0
    # MiLoPYP compared d**2 with r**3: r=10 matched up to 31.6 voxels; here 20 voxels is no match
    assert len(match_points([[20.0, 0.0, 0.0]], true, radius=10.0)[0]) == 0


def test_hungarian_beats_greedy_nearest():
    # greedy nearest-first pairs p0-t1 (distance 0.5) and leaves t0 unmatched (p1 too far from t0);
    # the optimal assignment matches both.
    true = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    pred = np.array([[1.5, 0, 0], [3.4, 0, 0]])
    pi, ti, _ = match_points(pred, true, radius=1.6)
    assert sorted(zip(pi.tolist(), ti.tolist(), strict=True)) == [(0, 0), (1, 1)]


def test_components_equal_dense_assignment():
    rng = np.random.default_rng(3)
    true = rng.uniform(0, 60, (120, 3))
    pred = np.concatenate([true[:90] + rng.normal(0, 1.5, (90, 3)), rng.uniform(0, 60, (40, 3))])
    r = 3.0
    pi, ti, d = match_points(pred, true, r)
    assert len(set(pi.tolist())) == len(pi) and len(set(ti.tolist())) == len(ti)
    assert np.all(d <= r)
    # dense reference: infeasible pairs cost more than any complete feasible set
    d2 = ((pred[:, None, :] - true[None, :, :]) ** 2).sum(-1)
    big = r * r * 200
    cost = np.where(d2 <= r * r, d2, big)
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] < big
    assert len(pi) == int(ok.sum())
    assert np.sum(d**2) == pytest.approx(cost[rows[ok], cols[ok]].sum())


def test_empty_and_bad_inputs():
    assert len(match_points(np.zeros((0, 3)), [[1, 2, 3]], 2.0)[0]) == 0
    with pytest.raises(InputError, match="NaN"):
        match_points([[np.nan, 0, 0]], [[0, 0, 0]], 1.0)
    with pytest.raises(InputError, match="radius"):
        match_points([[0, 0, 0]], [[0, 0, 0]], -1.0)


def test_precision_recall_f_beta():
    p, r, f1 = precision_recall_f1(3, 4, 6)
    assert (p, r) == (0.75, 0.5)
    assert f1 == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert fbeta(0.75, 0.5, 2.0) == pytest.approx(5 * 0.75 * 0.5 / (4 * 0.75 + 0.5))
    assert precision_recall_f1(0, 0, 0) == (0.0, 0.0, 0.0)


def _df(name, pts, scores=None):
    d = pd.DataFrame(np.asarray(pts, float), columns=["x", "y", "z"])
    d.insert(0, "tomogram", name)
    if scores is not None:
        d["score"] = scores
    return d


def test_evaluate_never_matches_across_tomograms():
    true = pd.concat([_df("a", [[0, 0, 0], [10, 0, 0]]), _df("b", [[50, 50, 50]])])
    pred = pd.concat([_df("a", [[0.5, 0, 0]]), _df("b", [[10, 0, 0]])])  # b's pick sits on a's particle
    res = evaluate(pred, true, 2.0).set_index("group")
    assert res.loc["a", "tp"] == 1 and res.loc["b", "tp"] == 0
    assert res.loc["all", "tp"] == 1 and res.loc["all", "n_true"] == 3 and res.loc["all", "n_pred"] == 2
    assert res.loc["all", "precision"] == 0.5 and res.loc["all", "recall"] == pytest.approx(1 / 3)


def test_pr_curve_and_average_precision():
    true = _df("a", [[0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0]])
    perfect = _df("a", [[0, 0, 0], [10, 0, 0], [20, 0, 0], [30, 0, 0]], scores=[0.9, 0.8, 0.7, 0.6])
    curve = pr_curve(perfect, true, 1.0)
    assert curve["recall"].is_monotonic_increasing
    assert average_precision(curve) == pytest.approx(1.0)
    # two false positives ranked first halve the precision at full recall
    noisy = pd.concat([_df("a", [[100, 0, 0], [200, 0, 0]], scores=[0.99, 0.95]), perfect])
    c2 = pr_curve(noisy, true, 1.0)
    ap2 = average_precision(c2)
    assert 0.3 < ap2 < 0.7
    best = c2.iloc[c2["f1"].idxmax()]
    assert best["recall"] == 1.0 and best["precision"] == pytest.approx(4 / 6)
