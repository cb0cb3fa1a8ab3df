"""Patch extraction by coordinates (slab/slice/cube/tiltsum, shifts, padding) and the tilt-geometry check."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from milotile.errors import InputError
from milotile.ops.geometry import TiltGeometry, project_points
from milotile.ops.grid import Grid
from milotile.ops.patches import MILOPYP_SHIFTS, extract_patches, n_channels
from milotile.ops.tilt_check import check_tilt_geometry

SHAPE = (24, 64, 64)
ANGLES = np.arange(-60.0, 61.0, 3.0)
SIG = 1.8


def blobs(seed: int, n: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lo = np.array([4, 6, 6])
    return rng.uniform(lo, np.array(SHAPE) - lo, size=(n, 3))  # (z, y, x)


def blob_volume(centres: np.ndarray) -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE)
    v = np.zeros(SHAPE, np.float32)
    for c in centres:
        v += np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * SIG**2)).astype(np.float32)
    return v


def blob_tilts(centres: np.ndarray, sign: int, axis: float = 0.0) -> np.ndarray:
    """Analytic projections: a 3D Gaussian projects to a 2D Gaussian at the projected centre."""
    uv = project_points(centres[:, ::-1], ANGLES, SHAPE, SHAPE[1:], tilt_axis_angle=axis, sign=sign)
    yy, xx = np.indices(SHAPE[1:])
    out = np.zeros((len(ANGLES), *SHAPE[1:]), np.float32)
    for t in range(len(ANGLES)):
        for u, v in uv[:, t]:
            out[t] += np.sqrt(2 * np.pi) * SIG * np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2 * SIG**2))
    return out


@pytest.fixture(scope="module")
def scene():
    c = blobs(0)
    return c, blob_volume(c)


def test_volume_modes_match_numpy(scene):
    _, v = scene
    x = da.from_array(v, chunks=(12, 32, 32))
    xyz = np.array([[20, 30, 5], [40, 41, 12], [33, 32, 11], [31, 31, 12]], float)  # seams at 32 / 12
    res = extract_patches(x, xyz, 8, ("slab", "slice", "cube"), normalize=None, chunk_n=2)
    bank = res.data.compute()
    assert bank.shape == (4, 1, n_channels(("slab", "slice", "cube"), 8), 8, 8) == (4, 1, 10, 8, 8)
    for i, r in enumerate(res.order):
        cx, cy, cz = xyz[r].astype(int)
        ys, xs = slice(cy - 4, cy + 4), slice(cx - 4, cx + 4)
        np.testing.assert_allclose(bank[i, 0, 0], v[cz - 1 : cz + 2, ys, xs].sum(0), rtol=1e-5)
        np.testing.assert_array_equal(bank[i, 0, 1], v[cz, ys, xs])
        np.testing.assert_array_equal(bank[i, 0, 2:], v[cz - 4 : cz + 4, ys, xs])
    assert sorted(res.order.tolist()) == [0, 1, 2, 3]
    assert res.clipped.tolist() == [False] * 4


def test_shifts_normalisation_and_edges(scene):
    _, v = scene
    x = da.from_array(v, chunks=(12, 32, 32))
    xyz = np.array([[30, 30, 10], [2, 30, 10], [30, 30, 0]], float)
    res = extract_patches(x, xyz, 10, "slice", shifts=True)
    bank = res.data.compute()
    assert bank.shape == (3, 5, 1, 10, 10)
    assert bank.min() >= 0 and bank.max() <= 1
    i = int(np.flatnonzero(res.order == 0)[0])
    for s, (dx, dy, dz) in enumerate(MILOPYP_SHIFTS, start=1):
        ref = v[10 + dz, 25 + dy : 35 + dy, 25 + dx : 35 + dx].astype(np.float64)
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        np.testing.assert_allclose(bank[i, s, 0], ref, atol=1e-6)
    flags = dict(zip(res.order.tolist(), res.clipped.tolist(), strict=True))
    assert flags == {0: False, 1: True, 2: True}  # x=2 leaves in x; z=0 shifted to z=-1
    j = int(np.flatnonzero(res.order == 1)[0])
    raw = extract_patches(x, xyz[1:2], 10, "slice", normalize=None).data.compute()[0, 0, 0]
    np.testing.assert_array_equal(raw[:, 3:], v[10, 25:35, 0:7])
    for col in range(3):  # edge padding (the one boundary convention): repeats column 0
        np.testing.assert_array_equal(raw[:, col], v[10, 25:35, 0])
    assert np.isfinite(bank[j]).all()
    dropped = extract_patches(x, xyz, 10, "slice", shifts=True, out_of_bounds="drop")
    assert dropped.order.tolist() == [0] and dropped.data.shape[0] == 1


def test_compressed_grid_maps_coordinates(scene):
    _, v = scene
    comp = np.maximum(v[0::2], v[1::2])
    grid = Grid(scale=(2.0, 1.0, 1.0), offset=(0.5, 0.0, 0.0))
    res = extract_patches(da.from_array(comp, chunks=6), np.array([[30.0, 30.0, 10.5]]), 6, "slice", grid=grid, normalize=None)
    np.testing.assert_array_equal(res.data.compute()[0, 0, 0], comp[5, 27:33, 27:33])


@pytest.mark.parametrize("sign", [1, -1])
def test_tiltsum_matches_direct_bilinear(scene, sign):
    c, v = scene
    tilts = blob_tilts(c, sign)
    geom = TiltGeometry(da.from_array(tilts, chunks=(8, 64, 64)), ANGLES, SHAPE, sign=sign)
    inner = c[(c[:, 1:] > 14).all(axis=1) & (c[:, 1:] < 50).all(axis=1)]  # blobs away from the edges
    inner = inner[np.argmax(np.abs(inner[:, 0] - (SHAPE[0] - 1) / 2))]  # the one farthest from mid-depth
    xyz = np.array([[31.3, 30.7, 9.2], inner[::-1]])
    res = extract_patches(da.from_array(v, chunks=12), xyz, 12, ("tiltsum", "slice"), tilts=geom, normalize=None)
    bank = res.data.compute()
    assert bank.shape == (2, 1, 2, 12, 12)
    win = np.flatnonzero(np.abs(ANGLES) <= 20)
    assert len(win) == 13
    for i, r in enumerate(res.order):
        uv = project_points(xyz[r : r + 1], ANGLES[win], SHAPE, SHAPE[1:], sign=sign)[0]
        ref = np.zeros((12, 12))
        for t, (u, vv) in zip(win, uv, strict=True):
            yy, xx = np.mgrid[0:12, 0:12]
            from scipy.ndimage import map_coordinates

            ref += map_coordinates(tilts[t].astype(np.float64), [vv - 6 + yy, u - 6 + xx], order=1)
        np.testing.assert_allclose(bank[i, 0, 0], ref, rtol=1e-5, atol=1e-4)
    # one blob off mid-depth: the right handedness sums it in focus, the wrong one smears it
    one = np.array([[3.0, 30.0, 33.0]])
    centre = {}
    for s in (sign, -sign):
        g = TiltGeometry(da.from_array(blob_tilts(one, sign)), ANGLES, SHAPE, sign=s)
        p = extract_patches(da.from_array(blob_volume(one)), one[:, ::-1], 12, "tiltsum", tilts=g, normalize=None)
        centre[s] = p.data.compute()[0, 0, 0]
    assert np.unravel_index(np.argmax(centre[sign]), (12, 12)) == (6, 6)
    assert centre[sign][6, 6] > 1.5 * centre[-sign][6, 6]


def test_tilthalves_split_the_tilt_sum(scene):
    """Even- and odd-indexed tilts of the window: raw halves add up to the tilt sum; min-maxed as one
    unit, min-max of their sum is the min-maxed tilt sum; each half alone is a noisier tilt sum."""
    c, v = scene
    rng = np.random.default_rng(3)
    tilts = blob_tilts(c, 1) + rng.normal(0, 0.5, (len(ANGLES), *SHAPE[1:])).astype(np.float32)
    geom = TiltGeometry(da.from_array(tilts, chunks=(8, 64, 64)), ANGLES, SHAPE, sign=1)
    xyz = c[(c[:, 1:] > 14).all(axis=1) & (c[:, 1:] < 50).all(axis=1)][:3, ::-1]
    vol = da.from_array(v, chunks=12)
    raw = extract_patches(vol, xyz, 12, ("tilthalves", "slice"), tilts=geom, normalize=None, shifts=True)
    ref = extract_patches(vol, xyz, 12, ("tiltsum", "slice"), tilts=geom, normalize=None, shifts=True)
    assert n_channels(("tilthalves", "slice"), 12) == 3
    a, r = raw.data.compute(), ref.data.compute()
    assert a.shape == (len(xyz), 5, 3, 12, 12)
    np.testing.assert_allclose(a[:, :, 0] + a[:, :, 1], r[:, :, 0], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(a[:, :, 2], r[:, :, 1])
    win = np.flatnonzero(np.abs(ANGLES) <= 20)  # 13 tilts: 7 even-indexed, 6 odd-indexed
    even = extract_patches(vol, xyz, 12, "tiltsum", tilts=TiltGeometry(geom.data[win[0::2]], ANGLES[win[0::2]], SHAPE,
                                                                          sign=1), normalize=None)
    np.testing.assert_allclose(a[:, 0, 0], even.data.compute()[:, 0, 0], rtol=1e-5, atol=1e-4)
    mm = extract_patches(vol, xyz, 12, ("tilthalves", "slice"), tilts=geom).data.compute()
    mr = extract_patches(vol, xyz, 12, ("tiltsum", "slice"), tilts=geom).data.compute()
    s = mm[:, 0, 0] + mm[:, 0, 1]
    s = (s - s.min(axis=(1, 2), keepdims=True)) / np.ptp(s, axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(s, mr[:, 0, 0], atol=1e-5)
    assert mm[:, 0, :2].min() == 0.0 and mm[:, 0, :2].max() == 1.0
    one = TiltGeometry(geom.data, ANGLES, SHAPE, sign=1, window=(-1.0, 1.0))
    with pytest.raises(InputError, match="at least 2 tilts"):
        extract_patches(vol, xyz, 12, "tilthalves", tilts=one)
    with pytest.raises(InputError, match="tilthalves.*tilt series"):
        extract_patches(vol, xyz, 12, ("tilthalves", "slice"))


@pytest.mark.parametrize("sign", [1, -1])
def test_geometry_check_finds_sign(scene, sign):
    c, v = scene
    geom = TiltGeometry(da.from_array(blob_tilts(c, sign), chunks=(8, 64, 64)), ANGLES, SHAPE, sign=1)
    got = check_tilt_geometry(da.from_array(v, chunks=12), geom, name="t1", max_side=32)
    assert got["sign"] == sign
    assert got["correlation"] > 0.5
    assert got["correlation"] - min(got["correlation_plus"], got["correlation_minus"]) > 0.1


def test_geometry_check_rotated_axis():
    c = blobs(4)
    v = blob_volume(c)
    geom = TiltGeometry(da.from_array(blob_tilts(c, -1, axis=90.0)), ANGLES, SHAPE, tilt_axis_angle=90.0)
    assert check_tilt_geometry(da.from_array(v, chunks=12), geom, max_side=32)["sign"] == -1


def test_geometry_check_rejects_mismatched_tilts(scene):
    _, v = scene
    other = blob_tilts(blobs(99), 1)
    geom = TiltGeometry(da.from_array(other), ANGLES, SHAPE)
    with pytest.raises(InputError, match="'t9'.*does not match"):
        check_tilt_geometry(da.from_array(v, chunks=12), geom, name="t9", max_side=64)


def test_bad_inputs(scene):
    _, v = scene
    x = da.from_array(v, chunks=12)
    with pytest.raises(InputError, match="outside"):
        extract_patches(x, np.array([[70.0, 3, 3]]), 8)
    with pytest.raises(InputError, match="modes"):
        extract_patches(x, np.array([[7.0, 3, 3]]), 8, "bogus")
    with pytest.raises(InputError, match="tilt series"):
        extract_patches(x, np.array([[7.0, 3, 3]]), 8, "tiltsum")
