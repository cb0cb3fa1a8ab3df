"""Fiber mode on synthetic filament centre lines, in every orientation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from milotile.errors import InputError
from milotile.refine.fiber import curvature, fit_curve, trace_fibers
from milotile.synth.phantom import filament_centreline


def _noisy_picks(line: np.ndarray, rng: np.random.Generator, every: float = 4.0, noise: float = 0.8) -> np.ndarray:
    """Picks every ``every`` voxels along a centre line sampled at 0.25 voxels, with jitter."""
    step = max(1, int(round(every / 0.25)))
    pts = line[::step]
    return pts + rng.normal(0, noise, size=pts.shape)


def _frame(pts: np.ndarray, tomo: str = "t0") -> pd.DataFrame:
    return pd.DataFrame({"tomogram": tomo, "x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2],
                         "score": 0.8, "class": "filament"})


def _clutter(rng: np.random.Generator, shape: tuple[int, int, int], n: int) -> np.ndarray:
    z, y, x = shape
    return rng.uniform([0, 0, 0], [x, y, z], size=(n, 3))


@pytest.mark.parametrize("axis", ["x-plane", "y", "z"])
def test_trace_synthetic_filament_any_orientation(axis):
    rng = np.random.default_rng(3)
    shape = (48, 128, 128)
    line = filament_centreline(shape, rng, along_y=axis != "x-plane", radius=3.0)
    if axis == "z":  # the same filament turned to run along z: swap y and z
        line = line[:, [0, 2, 1]]
        shape = (128, 48, 128)
    picks = _noisy_picks(line, rng)
    clutter = _clutter(rng, shape, 6)
    # clutter far from the line only (isolated points must not join the fibre)
    d, _ = cKDTree(line).query(clutter)
    clutter = clutter[d > 20]
    df = _frame(np.concatenate([picks, clutter]))
    out = trace_fibers(df, link_distance=15, min_points=7, spacing=2)
    assert out["fiber_id"].nunique() == 1
    res = out[["x", "y", "z"]].to_numpy()
    # resampled points lie on the true centre line ...
    dist, _ = cKDTree(line).query(res)
    assert np.sqrt(np.mean(dist**2)) < 1.0, np.sqrt(np.mean(dist**2))
    # ... at the requested arc-length spacing ...
    steps = np.linalg.norm(np.diff(res, axis=0), axis=1)
    np.testing.assert_allclose(steps, 2.0, atol=0.15)
    # ... and cover the picked stretch
    span = np.linalg.norm(picks[0] - picks[-1])
    assert out["arc_length"].max() > 0.9 * span
    assert set(out["class"]) == {"filament"} and (out["tomogram"] == "t0").all()


def test_curvature_formula_on_a_circle_arc():
    # r(t) = (R cos t, R sin t, 0) has curvature 1/R; fit a degree-6 polynomial to a quarter circle
    R = 25.0
    t = np.linspace(0, np.pi / 2, 200)
    pts = np.stack([R * np.cos(t), R * np.sin(t), np.zeros_like(t)], axis=1)
    fit = fit_curve(pts, degree=6)
    s = np.linspace(fit["s0"], fit["s1"], 50)[5:-5]
    np.testing.assert_allclose(curvature(fit["coef"], s), 1 / R, rtol=0.02)
    assert fit["length"] == pytest.approx(R * np.pi / 2, rel=0.01)


def test_rejects_by_curvature_and_residual_and_size():
    rng = np.random.default_rng(0)
    # tight arc (bend radius 8 voxels) -> curvature 0.125 > 0.05
    t = np.linspace(0, np.pi, 40)
    arc = np.stack([8 * np.cos(t) + 50, 8 * np.sin(t) + 50, np.full_like(t, 20)], axis=1)
    # a straight stretch that is 2 voxels thick and noisy -> residual ~ noise
    line = np.stack([np.linspace(10, 90, 30), np.full(30, 10.0), np.full(30, 30.0)], axis=1)
    fuzzy = line + rng.normal(0, 4.0, size=line.shape)
    small = np.array([[80.0, 80, 5], [82, 80, 5], [84, 80, 5]])
    df = pd.concat([_frame(arc, "a"), _frame(fuzzy, "b"), _frame(small, "c")], ignore_index=True)
    out = trace_fibers(df, link_distance=15, min_points=7, max_residual=2.0, max_curvature=0.05)
    assert out.empty
    only_curv = trace_fibers(_frame(arc, "a"), max_residual=None, max_curvature=0.05)
    assert only_curv.empty
    only_res = trace_fibers(_frame(fuzzy, "b"), max_residual=2.0, max_curvature=None)
    assert only_res.empty
    relaxed = trace_fibers(df, link_distance=15, min_points=3, max_residual=None, max_curvature=None)
    assert sorted(relaxed["tomogram"].unique()) == ["a", "b", "c"]
    assert relaxed.groupby("fiber_id")["tomogram"].nunique().max() == 1


def test_two_fibres_get_distinct_ids_and_angstrom():
    a = np.stack([np.arange(0, 60, 3.0), np.full(20, 10.0), np.full(20, 10.0)], axis=1)
    b = a + [0, 40, 0]
    df = _frame(np.concatenate([a, b]))
    df["x_A"], df["y_A"], df["z_A"] = df["x"] * 5, df["y"] * 5, df["z"] * 5
    out = trace_fibers(df, link_distance=5, min_points=7, spacing=3)
    assert out["fiber_id"].nunique() == 2
    np.testing.assert_allclose(out["x_A"], out["x"] * 5)
    assert sorted(out.groupby("fiber_id")["y"].mean().round()) == [10, 50]


def test_bad_parameters():
    df = _frame(np.zeros((3, 3)))
    with pytest.raises(InputError):
        trace_fibers(df, link_distance=0)
    with pytest.raises(InputError):
        trace_fibers(df.drop(columns="z"))
