"""Per-crop PU heatmap targets."""

from __future__ import annotations

import numpy as np
import pytest

from milotile.refine.targets import UNLABELED, crop_targets, gaussian_radius, target_geometry


@pytest.mark.parametrize("bbox,r", [(12, 1), (16, 2), (22, 3), (32, 4), (36, 4)])
def test_centernet_radius_matches_milopyp_table(bbox, r):
    h = bbox // 2
    assert int(gaussian_radius(h, h, 0.7)) == r


def test_single_particle_target():
    geom = target_geometry(16, 2, compress=False)
    assert geom.sigma == pytest.approx(5 / 6 * 2)
    # particle at level-0 (z, y, x) = (5, 20, 30): output voxel (5, 10, 15) exactly
    t = crop_targets(np.array([[5.0, 20.0, 30.0]]), None, (0, 0, 0), (10, 24, 32), geom, thresh=0.9)
    assert t.shape == (1, 10, 24, 32)
    assert t[0, 5, 10, 15] == 1.0
    soft = (t > 0) & (t < 1)
    assert soft.sum() > 0
    assert np.all(t[~(t > 0)] == UNLABELED)
    # everything labelled lies within the radius of the particle
    kz, ky, kx = np.nonzero(t[0] > 0)
    d = np.sqrt((kz - 5.0) ** 2 + (2 * ky - 20.0) ** 2 + (2 * kx - 30.0) ** 2)
    assert d.max() <= geom.radius
    # validation targets keep 0 as background
    tv = crop_targets(np.array([[5.0, 20.0, 30.0]]), None, (0, 0, 0), (10, 24, 32), geom, unlabeled=False)
    assert tv.min() == 0.0 and np.array_equal(tv > 0, t > 0)


def test_translation_and_origin():
    geom = target_geometry(16)
    p = np.array([[6.0, 21.0, 17.0]])
    a = crop_targets(p, None, (0, 0, 0), (12, 20, 20), geom)
    b = crop_targets(p + np.array([3, 8, 4]), None, (3, 8, 4), (12, 20, 20), geom)
    assert np.array_equal(a, b)
    c = crop_targets(p, None, (0, -4, 0), (12, 20, 20), geom)  # crop starts 4 voxels earlier in y
    assert np.array_equal(c[:, :, 2:], a[:, :, :-2])


def test_multi_class_channels_and_compression():
    geom = target_geometry(16, compress=True)
    assert geom.stride == (2, 2, 2) and geom.offset[0] == 0.5
    pts = np.array([[9.0, 10.0, 10.0], [9.0, 30.0, 30.0]])
    t = crop_targets(pts, np.array([0, 2]), (0, 0, 0), (8, 20, 20), geom, n_classes=3)
    assert t.shape == (3, 8, 20, 20)
    assert t[0, 4, 5, 5] == 1.0 and t[2, 4, 15, 15] == 1.0  # z 9 -> compressed slice 4 (covers 8, 9)
    assert np.all(t[1] == UNLABELED)
    assert t[0, 4, 15, 15] == UNLABELED and t[2, 4, 5, 5] == UNLABELED


def test_particles_outside_the_crop_contribute_their_tails_only():
    geom = target_geometry(16)
    t = crop_targets(np.array([[5.0, -3.0, 10.0], [5.0, 500.0, 10.0]]), None, (0, 0, 0), (10, 16, 16), geom)
    assert (t[0, :, 0] > 0).any()  # the tail of the first particle reaches row 0
    assert t.max() < 1.0  # no hard positive: its centre is outside
