"""Crops streamed from dask/zarr: chunk reader, per-crop preprocessing, augmentation keeps targets aligned."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from milotile.errors import InputError
from milotile.ops.intensity import contrast_clip
from milotile.ops.preprocess import block_halo, preprocess_block
from milotile.ops.resample import compress_z
from milotile.refine.data import CropDataset, VolumeReader
from milotile.refine.targets import target_geometry


@pytest.fixture()
def vol():
    rng = np.random.default_rng(0)
    return rng.normal(size=(20, 40, 36)).astype(np.float32)


def test_reader_matches_array_and_pads_outside_with_the_edge(vol):
    r = VolumeReader(da.from_array(vol, chunks=(8, 16, 16)), "v", max_chunks=3)
    assert np.array_equal(r.read((3, 5, 7), (10, 20, 25)), vol[3:13, 5:25, 7:32])
    ref = np.pad(vol, ((4, 4), (6, 6), (5, 5)), mode="edge")
    assert np.array_equal(r.read((-4, -6, 30), (12, 20, 11)), ref[0:12, 0:20, 35:46])
    assert len(r._cache) <= 3


def test_crop_gaussian_with_halo_equals_whole_volume(vol):
    r = VolumeReader(da.from_array(vol, chunks=(8, 16, 16)), "v")
    sigma = 1.2
    h = block_halo(sigma)[0]
    whole = ndimage.gaussian_filter(vol, sigma, mode="nearest")
    start, size = (2, 0, 10), (8, 12, 14)  # touches the y border: edge padding equals scipy nearest
    block = r.read([s - h for s in start], [n + 2 * h for n in size])
    filt = ndimage.gaussian_filter(block, sigma, mode="nearest")[h:-h, h:-h, h:-h]
    np.testing.assert_allclose(filt, whole[2:10, 0:12, 10:24], atol=1e-5)


def test_preprocessing_steps():
    x = np.array([-10.0, 0.0, 1.0, 10.0], np.float32).reshape(1, 1, 4)
    np.testing.assert_allclose(contrast_clip(x, 0.0, 2.0), [[[0.0, 0.5, 3.5 / 6, 1.0]]], atol=1e-6)  # clip +-3 std -> [0, 1]
    z = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 2, 2)
    c = compress_z(z)
    assert c.shape == (3, 2, 2) and np.array_equal(c[0], z[1]) and np.array_equal(c[2], z[4])
    out = preprocess_block(z, mean=10.0, std=5.0, compress=True)
    assert out.shape == (3, 2, 2) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(InputError):
        contrast_clip(x, 0.0, 0.0)


def test_nan_voxels_are_reported_with_the_tomogram(vol):
    bad = vol.copy()
    bad[5, 6, 7] = np.nan
    r = VolumeReader(da.from_array(bad, chunks=(8, 16, 16)), "tomo_x")
    with pytest.raises(InputError, match="tomo_x"):
        r.read((0, 0, 0), (10, 10, 10))


def test_augmented_targets_follow_the_particles():
    # bright cubes at the labelled positions: after any flip/rot90 the hard positives must sit on them
    shape = (12, 64, 64)
    vol = np.zeros(shape, np.float32)
    pts = np.array([[6, 20, 14], [6, 40, 47], [5, 13, 50]])
    for z, y, x in pts:
        vol[z - 1 : z + 2, y - 1 : y + 2, x - 1 : x + 2] = 10.0
    labels = pd.DataFrame({"tomogram": "t", "x": pts[:, 2], "y": pts[:, 1], "z": pts[:, 0], "cls": 0})
    reader = VolumeReader(da.from_array(vol, chunks=(12, 32, 32)), "t")
    ds = CropDataset({"t": reader}, {"t": (0.0, 1.0)}, labels, target_geometry(8), crop=(8, 48, 48),
                     random_fraction=0.0, augment=True, seed=5, repeats=4)
    assert len(ds) == 12
    for i in range(len(ds)):
        item = ds[i]
        x, t = item["input"].numpy(), item["target"].numpy()
        assert x.shape == (8, 49, 49) and t.shape == (1, 8, 25, 25)
        kz, ky, kx = np.nonzero(t[0] == 1.0)
        assert len(kz) > 0
        # output voxel k sits on input voxel 2k: the cube there is bright
        assert np.all(x[kz, 2 * ky, 2 * kx] > 0.8)


def test_negative_crops_bound_the_epoch_and_rotate_through_the_negatives(vol):
    # 2 labels and 30 negatives, 2 repeats: uncapped every negative anchors 2 crops per epoch (64 anchors);
    # capped at 1x the labelled crops, 4 negative anchors per epoch, drawn anew each epoch
    rng = np.random.default_rng(1)
    labels = pd.DataFrame({"tomogram": "t", "x": [10, 25], "y": [12, 28], "z": [8, 10], "cls": 0})
    neg = pd.DataFrame({"tomogram": "t", "x": rng.integers(0, 36, 30), "y": rng.integers(0, 40, 30),
                        "z": rng.integers(0, 20, 30)})
    reader = VolumeReader(da.from_array(vol, chunks=(8, 16, 16)), "t")
    kw = dict(crop=(8, 32, 32), random_fraction=0.25, seed=3, repeats=2, negatives=neg)
    full = CropDataset({"t": reader}, {"t": (0.0, 1.0)}, labels, target_geometry(8), **kw)
    assert len(full.anchors) == 64 and len(full) == 64 + 16
    capped = CropDataset({"t": reader}, {"t": (0.0, 1.0)}, labels, target_geometry(8), negative_crops=1.0, **kw)
    assert len(capped.anchors) == 8 and len(capped) == 8 + 2
    seen = set()
    for epoch in range(1, 9):
        capped.set_epoch(epoch)
        assert len(capped) == 10  # the same length every epoch (the DataLoader's sampler)
        np.testing.assert_array_equal(capped.anchors[:4, 1:].astype(float), full._pos_anchors[:, 1:].astype(float))
        seen |= {tuple(a) for a in capped.anchors[4:, 1:].astype(float)}
    assert len(seen) > 8  # other negatives each epoch
    # every negative's voxels are still marked in a crop that holds it, anchored or not
    assert len(capped._neg["t"]) == 30
