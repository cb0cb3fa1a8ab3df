"""Heatmap decoding: grid convention, threshold, NMS in level-0 voxels, top-K, border, chunk seams."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from milotile.errors import InputError
from milotile.ops.grid import Grid
from milotile.refine.decode import decode_heatmap


def _heatmap(shape, peaks, sigma=1.0):
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    hm = np.zeros(shape, np.float32)
    for kz, ky, kx, s in peaks:
        hm = np.maximum(hm, s * np.exp(-((x - kx) ** 2 + (y - ky) ** 2 + (z - kz) ** 2) / (2 * sigma**2)))
    return hm.astype(np.float32)


def test_model_grid_centre_convention():
    k = np.array([[0, 0, 0], [3, 5, 7]])
    np.testing.assert_allclose(Grid.model_output((1, 2, 2)).to_level0(k), [[0, 0.5, 0.5], [3, 10.5, 14.5]])
    g = Grid.model_output((2, 2, 2))
    np.testing.assert_allclose(g.to_level0(k), [[0.5, 0.5, 0.5], [6.5, 10.5, 14.5]])
    np.testing.assert_allclose(g.from_level0(g.to_level0(k)), k)
    # composition: preprocessing grid (compress, then bin 2) equals the two steps applied in turn
    p = Grid.processed(compress=True, binning=2)
    two = Grid.compressed().to_level0(Grid.binned(2).to_level0(k))
    np.testing.assert_allclose(p.to_level0(k), two)
    np.testing.assert_allclose(g.shifted((10, 20, 30)).to_level0(k), g.to_level0(k) + [10, 20, 30])


def test_decode_positions_scores_and_angstrom():
    hm = _heatmap((16, 20, 24), [(5, 6, 7, 0.9), (10, 14, 18, 0.6), (8, 3, 20, 0.2)])
    df = decode_heatmap(hm, tomogram="t", shape=(16, 40, 48), voxel_size=4.0, threshold=0.25)
    assert list(df["tomogram"]) == ["t", "t"]
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[14.5, 12.5, 5], [36.5, 28.5, 10]])
    np.testing.assert_allclose(df["score"], [0.9, 0.6], rtol=1e-6)
    np.testing.assert_allclose(df["z_A"], df["z"] * 4.0)


def test_nms_in_level0_voxels_and_top_k():
    # two peaks 3 model voxels apart in x = 6 level-0 voxels; and 3 apart in z = 3 level-0 voxels
    hm = _heatmap((20, 20, 20), [(5, 10, 5, 0.9), (5, 10, 8, 0.8), (12, 10, 10, 0.7), (15, 10, 10, 0.6)], sigma=0.6)
    kw = dict(tomogram="t", shape=(20, 40, 40), voxel_size=1.0, threshold=0.25)
    assert len(decode_heatmap(hm, nms_distance=0, **kw)) == 4
    df = decode_heatmap(hm, nms_distance=5, **kw)  # suppresses the z pair (3) but not the x pair (6)
    assert len(df) == 3 and sorted(df["score"].round(2)) == [0.7, 0.8, 0.9]
    assert len(decode_heatmap(hm, nms_distance=7, **kw)) == 2
    top = decode_heatmap(hm, nms_distance=0, max_picks=2, **kw)
    np.testing.assert_allclose(top["score"], [0.9, 0.8], rtol=1e-6)


def test_border_margin():
    hm = _heatmap((20, 20, 20), [(1, 10, 10, 0.9), (10, 1, 10, 0.8), (10, 10, 10, 0.7)])
    df = decode_heatmap(hm, tomogram="t", shape=(20, 40, 40), voxel_size=1.0, border=(3, 4, 4))
    np.testing.assert_allclose(df["score"], [0.7], rtol=1e-6)


def test_correct_across_chunk_seams():
    rng = np.random.default_rng(0)
    shape = (24, 32, 32)
    # peaks right on and next to the chunk seams at 8, 16, 24
    peaks = [(8, 8, 8, 0.9), (7, 16, 15, 0.8), (16, 23, 24, 0.85), (15, 24, 8, 0.7)]
    peaks += [(*rng.integers(2, 22, 3), rng.uniform(0.3, 0.6)) for _ in range(10)]
    hm = np.stack([_heatmap(shape, peaks), _heatmap(shape, peaks[::2])])
    kw = dict(tomogram="t", shape=(24, 64, 64), voxel_size=2.0, threshold=0.25, nms_distance=4,
              classes=["a", "b"])
    whole = decode_heatmap(hm, **kw)
    tiled = decode_heatmap(da.from_array(hm, chunks=(1, 8, 8, 8)), **kw)
    pd.testing.assert_frame_equal(whole, tiled)
    assert set(whole["class"]) == {"a", "b"}
    assert (whole["class"] == "b").sum() < (whole["class"] == "a").sum()


def test_bad_arguments():
    hm = np.zeros((2, 4, 4, 4), np.float32)
    with pytest.raises(InputError, match="class names"):
        decode_heatmap(hm, tomogram="t", shape=(4, 8, 8), voxel_size=1.0, classes=["a"])
    with pytest.raises(InputError, match="max_picks"):
        decode_heatmap(hm, tomogram="t", shape=(4, 8, 8), voxel_size=1.0, max_picks=0)
    assert decode_heatmap(hm, tomogram="t", shape=(4, 8, 8), voxel_size=1.0).empty
