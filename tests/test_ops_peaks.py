"""Distributed peak finding equals a whole-volume single-process computation of the same definitions."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from milotile.errors import InputError
from milotile.ops.peaks import dog_peaks, find_peaks, greedy_nms


def reference_peaks(score, min_distance, *, threshold=None, threshold_std=None, border=0, footprint=3, top_k=None):
    """Whole-volume numpy version of the documented definitions (brute-force NMS, no KD-tree)."""
    fp = (footprint,) * 3 if np.isscalar(footprint) else tuple(footprint)
    bd = (border,) * 3 if np.isscalar(border) else tuple(border)
    mask = score == ndi.maximum_filter(score, size=fp, mode="nearest")
    inner = np.zeros_like(mask)
    inner[tuple(slice(b, s - b) for b, s in zip(bd, score.shape, strict=True))] = True
    mask &= inner
    idx = np.argwhere(mask)
    vals = score[mask].astype(np.float64)
    t = -np.inf
    if threshold is not None:
        t = threshold
    if threshold_std is not None:
        pos = vals[vals > 0]
        t = max(t, pos.mean() + threshold_std * pos.std())
    sel = vals > t
    idx, vals = idx[sel], vals[sel]
    order = np.lexsort((idx[:, 2], idx[:, 1], idx[:, 0], -vals))
    acc = []
    for i in order:
        if all(np.sum((idx[i] - idx[j]) ** 2) > min_distance**2 for j in acc):
            acc.append(i)
    if top_k:
        acc = acc[:top_k]
    return idx[acc][:, ::-1].astype(float), vals[acc]


def blob_volume(shape, n, seed, sigma=2.0):
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, np.float32)
    pos = (rng.random((n, 3)) * np.array(shape)).astype(int)
    v[tuple(pos.T)] = rng.uniform(0.5, 1.5, n)
    v = ndi.gaussian_filter(v, sigma) + rng.normal(scale=0.002, size=shape).astype(np.float32)
    return v.astype(np.float32)


@pytest.mark.parametrize("chunks", [(9, 11, 13), (16, 16, 16), (33, 41, 47)])
def test_find_peaks_matches_whole_volume(chunks):
    v = blob_volume((33, 41, 47), 60, seed=3)
    got = find_peaks(da.from_array(v, chunks=chunks), 4.0, threshold_std=0.5, border=(2, 3, 3))
    ref_xyz, ref_s = reference_peaks(v, 4.0, threshold_std=0.5, border=(2, 3, 3))
    assert len(got) > 10
    np.testing.assert_array_equal(got[["x", "y", "z"]].to_numpy(), ref_xyz)
    np.testing.assert_allclose(got["score"].to_numpy(), ref_s, rtol=1e-6)


def test_peaks_on_chunk_seams():
    """Isolated peaks placed exactly on both sides of chunk boundaries are each found once."""
    v = np.zeros((20, 30, 30), np.float32)
    seeds = [(9, 9, 9), (10, 10, 20), (9, 19, 10), (10, 20, 19), (0, 0, 0), (19, 29, 29)]
    for k, p in enumerate(seeds):
        v[p] = 1.0 + 0.1 * k
    v = ndi.gaussian_filter(v, 1.0)
    got = find_peaks(da.from_array(v, chunks=10), 0.0, threshold=1e-3)
    found = set(map(tuple, got[["z", "y", "x"]].to_numpy().astype(int)))
    assert found == set(seeds)
    # a pair straddling a seam: NMS keeps only the stronger one
    w = np.zeros((20, 20, 20), np.float32)
    w[9, 9, 9], w[10, 10, 10] = 1.0, 2.0
    got = find_peaks(da.from_array(w, chunks=10), 3.0, threshold=0.0, footprint=1)
    assert got[["x", "y", "z"]].to_numpy().tolist() == [[10.0, 10.0, 10.0]]


def test_threshold_topk_border():
    v = blob_volume((25, 27, 29), 30, seed=5)
    x = da.from_array(v, chunks=(8, 9, 10))
    got = find_peaks(x, 3.0, threshold=0.01, top_k=5, border=4)
    ref_xyz, _ = reference_peaks(v, 3.0, threshold=0.01, border=4, top_k=5)
    np.testing.assert_array_equal(got[["x", "y", "z"]].to_numpy(), ref_xyz)
    assert len(got) == 5 and got["score"].is_monotonic_decreasing
    assert (got[["x", "y", "z"]].to_numpy() >= 4).all()
    rel = find_peaks(x, 3.0, threshold_rel=0.5)
    assert (rel["score"] > 0.5 * rel["score"].max() - 1e-9).all() and len(rel) >= 1


def test_dog_peaks_matches_whole_volume_and_finds_dark_blobs():
    rng = np.random.default_rng(7)
    shape = (31, 45, 43)  # odd sizes
    v = np.ones(shape, np.float32)
    centres = [(8, 12, 11), (15, 30, 20), (22, 14, 31), (15, 22, 22)]
    zz, yy, xx = np.indices(shape)
    for c in centres:
        v -= 0.8 * np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * 2.0**2)).astype(np.float32)
    v += rng.normal(scale=0.02, size=shape).astype(np.float32)
    sig = (1.5, 2.5)
    got = dog_peaks(da.from_array(v, chunks=(12, 15, 14)), sig, threshold_std=0.5, min_distance=5, border=(2, 4, 4))
    g = [ndi.gaussian_filter(v, s, mode="nearest") for s in sig]
    ref_xyz, _ = reference_peaks(g[1] - g[0], 5, threshold_std=0.5, border=(2, 4, 4), footprint=(1, 3, 3))
    np.testing.assert_array_equal(got[["x", "y", "z"]].to_numpy(), ref_xyz)
    top = got.head(len(centres))[["z", "y", "x"]].to_numpy()
    for c in centres:
        assert np.min(np.linalg.norm(top - np.array(c), axis=1)) <= 1.5
    inv = dog_peaks(da.from_array(v, chunks=16), sig, invert=True, min_distance=5, border=(2, 4, 4))
    assert not set(map(tuple, inv.head(4)[["z", "y", "x"]].to_numpy().astype(int))) & set(centres)


def test_dog_peaks_levels():
    shape = (24, 48, 48)
    v = np.ones(shape, np.float32)
    zz, yy, xx = np.indices(shape)
    for c, r in [((12, 14, 14), 1.2), ((12, 34, 34), 3.5)]:
        v -= np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * r**2)).astype(np.float32)
    got = dog_peaks(da.from_array(v, chunks=24), (1.0, 2.0, 5.0), min_distance=6, border=0, threshold_std=0.0)
    small = got.iloc[np.argmin(np.hypot(got.x - 14, got.y - 14))]
    large = got.iloc[np.argmin(np.hypot(got.x - 34, got.y - 34))]
    assert small.level == 0 and large.level == 1


def test_greedy_nms_and_inputs():
    pts = np.array([[0, 0, 0], [0, 0, 7], [0, 0, 8], [0, 0, 15.0]])
    keep = greedy_nms(pts, np.array([4.0, 3.0, 2.0, 1.0]), 7.0)
    assert keep.tolist() == [0, 2]  # distance 7 is suppressed (MiLoPYP sphere includes r = 7)
    assert greedy_nms(pts, np.array([1.0, 2, 3, 4]), 0).tolist() == [3, 2, 1, 0]
    with pytest.raises(InputError):
        find_peaks(da.zeros((4, 4), chunks=2))
    with pytest.raises(InputError):
        find_peaks(da.zeros((4, 4, 4), chunks=2), footprint=2)
    empty = find_peaks(da.zeros((6, 6, 6), chunks=3), 2.0, threshold_std=0.5)
    assert len(empty) == 0 and list(empty.columns) == ["x", "y", "z", "score", "level"]


@pytest.mark.parametrize("size", [(1, 3, 3), (3, 1, 5), (5, 5, 5), (1, 1, 1)])
def test_box_max_equals_scipy(size):
    from milotile.ops.peaks import box_max

    rng = np.random.default_rng(11)
    a = rng.integers(0, 6, size=(7, 2, 9)).astype(np.float32)  # many ties, an axis shorter than the box
    np.testing.assert_array_equal(box_max(a, size), ndi.maximum_filter(a, size=size, mode="nearest"))
    b = rng.normal(size=(1, 12, 13)).astype(np.float32)
    np.testing.assert_array_equal(box_max(b, size), ndi.maximum_filter(b, size=size, mode="nearest"))
    assert box_max(b, size) is not b


def test_processing_blocks_do_not_change_the_peaks():
    v = blob_volume((33, 41, 47), 60, seed=9)
    x = da.from_array(v, chunks=(9, 11, 13))
    ref = find_peaks(x, 4.0, threshold_std=0.5, border=(2, 3, 3))
    for chunks in [(16, 16, 16), (-1, 20, 24), (33, 41, 47)]:
        got = find_peaks(x, 4.0, threshold_std=0.5, border=(2, 3, 3), chunks=chunks)
        pd.testing.assert_frame_equal(got, ref)
    sig = (1.0, 2.0)
    d_ref = dog_peaks(x, sig, min_distance=4, border=(2, 3, 3))
    d_big = dog_peaks(x, sig, min_distance=4, border=(2, 3, 3), chunks=(-1, 21, -1))
    pd.testing.assert_frame_equal(d_big, d_ref)
    assert len(d_ref) > 5


def test_blocks_inside_the_border_band_are_skipped_exactly():
    """Borders wider than a chunk: whole blocks are skipped, the window of the others shrinks."""
    rng = np.random.default_rng(21)
    shape = (30, 44, 40)
    v = ndi.gaussian_filter(rng.normal(size=shape), 1.5).astype(np.float32)
    sig, border = (1.0, 2.0), (9, 12, 3)
    got = dog_peaks(da.from_array(v, chunks=(8, 10, 12)), sig, threshold_std=0.3, min_distance=3, border=border)
    g = [ndi.gaussian_filter(v, s, mode="nearest") for s in sig]
    ref_xyz, ref_s = reference_peaks(g[1] - g[0], 3, threshold_std=0.3, border=border, footprint=(1, 3, 3))
    assert len(got) > 10
    np.testing.assert_array_equal(got[["x", "y", "z"]].to_numpy(), ref_xyz)
    np.testing.assert_allclose(got["score"].to_numpy(), ref_s, rtol=1e-6)
    none = dog_peaks(da.from_array(v, chunks=8), sig, border=(15, 0, 0))  # nothing outside the band
    assert len(none) == 0
