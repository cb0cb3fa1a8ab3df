"""Distributed filters equal the whole-volume scipy computation on small odd-sized volumes."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from milotile.errors import InputError
from milotile.ops import blocks as B
from milotile.ops import filters as F
from milotile.ops import intensity as I  # noqa: E741
from milotile.ops import resample as R
from milotile.ops import stats as S


@pytest.fixture(scope="module")
def vol() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(23, 31, 37)).astype(np.float32)


@pytest.mark.parametrize("mode", ["nearest", "reflect"])
@pytest.mark.parametrize("sigma", [0.8, 2.5, (0.0, 1.0, 2.0)])
def test_gaussian_matches_scipy(vol, mode, sigma):
    x = da.from_array(vol, chunks=(8, 10, 12))  # chunks smaller than the halo get merged
    got = F.gaussian(x, sigma, mode=mode).compute()
    ref = ndi.gaussian_filter(vol, sigma, mode=mode)
    assert got.shape == vol.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_gaussian_halo_covers_scipy_radius():
    for s in (0.3, 0.8, 1.0, 1.125, 2.5, 3.0, 5.0):
        assert F.gaussian_halo(s, 1)[0] >= int(4.0 * s + 0.5)


def test_dog_levels_match_scipy(vol):
    x = da.from_array(vol, chunks=(12, 16, 16))
    sig = (1.0, 2.0, 3.0)
    got = F.dog(x, sig).compute()
    g = [ndi.gaussian_filter(vol, s, mode="nearest") for s in sig]
    ref = np.stack([g[1] - g[0], g[2] - g[1]])
    assert got.shape == (2, *vol.shape)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    np.testing.assert_allclose(F.dog(x, sig, invert=True).compute(), -ref, atol=1e-6)


def test_dog_positive_on_dark_blob():
    v = np.ones((21, 21, 21), np.float32)
    v[8:13, 8:13, 8:13] = 0.0  # dark cube
    d = F.dog(da.from_array(v, chunks=11), (1.0, 3.0)).compute()[0]
    assert d[10, 10, 10] > 0
    assert np.unravel_index(np.argmax(d), d.shape) == (10, 10, 10)


def test_dog_rejects_bad_sigmas():
    x = da.zeros((8, 8, 8), chunks=4)
    with pytest.raises(InputError, match="increasing"):
        F.dog(x, (5, 3))
    with pytest.raises(InputError, match="two sigmas"):
        F.dog(x, (3,))


def test_global_stats_float64(vol):
    shifted = vol + np.float32(1000.0)  # large offset: a float32 sum-of-squares would lose the std
    mean, std = S.global_stats(da.from_array(shifted, chunks=(7, 9, 11)))
    ref = shifted.astype(np.float64)
    assert mean == pytest.approx(ref.mean(), rel=1e-12)
    assert std == pytest.approx(ref.std(), rel=1e-9)


def test_global_stats_ignores_nan_and_rejects_empty():
    v = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    v[0, 0, 0] = np.nan
    mean, std = S.global_stats(da.from_array(v, chunks=2))
    finite = v[np.isfinite(v)].astype(np.float64)
    assert mean == pytest.approx(finite.mean()) and std == pytest.approx(finite.std())
    with pytest.raises(InputError, match="finite"):
        S.global_stats(da.full((2, 2, 2), np.nan, chunks=1))


def test_contrast_clip(vol):
    mean, std = float(vol.mean()), float(vol.std())
    y = I.contrast_clip(da.from_array(vol, chunks=10), mean, std).compute()
    z = np.clip((vol - mean) / std, -3, 3)
    np.testing.assert_allclose(y, (z + 3) / 6, atol=1e-6)
    assert y.min() >= 0 and y.max() <= 1
    q = I.contrast_clip(vol, mean, std, -2.5, 2.0, quantize=True)
    assert isinstance(q, np.ndarray)
    assert np.allclose(q * 255, np.round(q * 255), atol=1e-4)
    assert len(np.unique(q)) <= 256
    with pytest.raises(InputError):
        I.contrast_clip(vol, mean, 0.0)


@pytest.mark.parametrize("how", ["max", "mean"])
@pytest.mark.parametrize("depth", [22, 23])
def test_compress_z(how, depth):
    v = np.random.default_rng(1).random((depth, 9, 10)).astype(np.float32)
    got = R.compress_z(da.from_array(v, chunks=(5, 9, 10)), how).compute()
    red = np.maximum if how == "max" else (lambda a, b: (a + b) / 2)
    n = depth // 2
    assert got.shape == ((depth + 1) // 2, 9, 10)
    np.testing.assert_allclose(got[:n], red(v[0 : 2 * n : 2], v[1 : 2 * n : 2]), atol=1e-6)
    if depth % 2:
        np.testing.assert_array_equal(got[-1], v[-1])


def test_bin_volume_trims():
    v = np.random.default_rng(2).random((23, 31, 37)).astype(np.float32)
    got = R.bin_volume(da.from_array(v, chunks=(10, 10, 10)), 3).compute()
    ref = v[:21, :30, :36].reshape(7, 3, 10, 3, 12, 3).mean(axis=(1, 3, 5))
    assert got.shape == (7, 10, 12)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert R.bin_volume(da.from_array(v), 1).shape == v.shape
    with pytest.raises(InputError):
        R.bin_volume(da.from_array(v), 0)


def test_gaussian_crop_equals_cropped_filter(vol):
    crop = ((3, 20), (0, 31), (5, 30))
    got = F.gaussian_crop(vol, (1.0, 2.0, 1.5), crop)
    ref = ndi.gaussian_filter(vol, (1.0, 2.0, 1.5), mode="nearest")[3:20, 0:31, 5:30]
    np.testing.assert_allclose(got, ref, atol=1e-6)
    lv = F.dog_block(vol, (1.0, 2.0), crop=crop)
    assert lv.shape == (1, 17, 31, 25)


def test_halo_blocks_tile_the_array(vol):
    x = da.from_array(vol, chunks=(8, 10, 12))  # trailing chunks thinner than the halo get merged
    depth = (3, 0, 4)
    merged, blocks = B.halo_blocks(x, depth)
    assert len(blocks) == np.prod(merged.numblocks)
    seen = np.zeros(vol.shape, np.int32)
    for blk, hb in blocks:
        b = blk.compute()
        lo = hb.origin
        np.testing.assert_array_equal(b, vol[tuple(slice(o, o + s) for o, s in zip(lo, b.shape, strict=True))])
        inner = b[tuple(slice(a, z) for a, z in hb.interior)]
        np.testing.assert_array_equal(inner, vol[hb.location])
        for ax, (a, z) in enumerate(hb.interior):  # the halo is full wherever the array goes on
            assert a == min(depth[ax], hb.location[ax].start)
            assert b.shape[ax] - z == min(depth[ax], vol.shape[ax] - hb.location[ax].stop)
        seen[hb.location] += 1
    assert (seen == 1).all()


def test_regular_chunks(vol):
    x = da.from_array(vol, chunks=(5, 7, 37))
    assert B.regular_chunks(x, (16, -1, 64)).chunks == ((16, 7), (31,), (37,))
    same = da.from_array(vol, chunks=(16, 31, 37))
    assert B.regular_chunks(same, (16, 31, 37)) is same
    with pytest.raises(InputError):
        B.regular_chunks(x, (16, 16))


def test_dog_max_block_equals_level_stack(vol):
    sig = (1.0, 1.5, 2.5, 4.0)
    crop = ((2, 20), (3, 30), (0, 37))
    for invert in (False, True):
        levels = F.dog_block(vol, sig, invert=invert, crop=crop)
        score, lvl = F.dog_max_block(vol, sig, invert=invert, crop=crop)
        np.testing.assert_array_equal(score, levels.max(0))
        np.testing.assert_array_equal(lvl, levels.argmax(0))
        assert set(np.unique(lvl)) == {0, 1, 2}
    g = [ndi.gaussian_filter(vol, s, mode="nearest")[2:20, 3:30] for s in sig]
    np.testing.assert_allclose(levels[1], -(g[2] - g[1]), atol=1e-6)


def test_block_moments_views_and_nan(vol):
    view = (vol + np.float32(500.0))[::2, 3:, ::3]  # non-contiguous, large offset
    n, mean, m2 = S.block_moments(view)
    ref = view.astype(np.float64)
    assert n == view.size
    assert mean == pytest.approx(ref.mean(), rel=1e-13)
    assert m2 == pytest.approx(((ref - ref.mean()) ** 2).sum(), rel=1e-10)
    v = vol.copy()
    v[0, 0, :5] = np.nan
    v[1, 1, 1] = np.inf
    n, mean, _ = S.block_moments(v)
    assert n == v.size - 6 and mean == pytest.approx(v[np.isfinite(v)].astype(np.float64).mean(), rel=1e-12)
    assert S.block_moments(np.full((2, 2), np.nan, np.float32)).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("crop", [((6, 15), (9, 20), (10, 25)), ((0, 23), (0, 4), (30, 37)), ((11, 12), (0, 31), (0, 1))])
def test_gaussian_crop_is_exact(vol, crop):
    """Cutting the input to the window plus the kernel radius changes no bit of the window."""
    for sigma in (0.8, (2.0, 0.0, 3.5), 5.0):
        got = F.gaussian_crop(vol, sigma, crop)
        ref = ndi.gaussian_filter(vol, sigma, mode="nearest")[tuple(slice(*c) for c in crop)]
        np.testing.assert_array_equal(got, ref)
