"""Stages on a tiny synthetic collection: preprocess -> mine -> patches, wired to the store and the CLI."""

from __future__ import annotations

import importlib

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

import milotile as mt
from milotile.errors import InputError
from milotile.stages import extract_patches, mine, preprocess

pre_mod = importlib.import_module("milotile.stages.preprocess")  # the package re-exports the function

SIZE = (40, 96, 96)
CHUNKS = (16, 48, 48)
MINE = dict(dog=(2.0, 4.0), nms_distance=5, border=6, border_z=3)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from milotile.synth import synth

    return synth(tmp_path_factory.mktemp("syn"), seed=0, n_tomograms=1, size=SIZE, snr=2.0, angles=(-60, 60, 3))


@pytest.fixture()
def col(synth_dir, tmp_path):
    return mt.ingest(synth_dir.manifest, tmp_path / "s.zarr", chunks=CHUNKS)


def test_preprocess_matches_whole_volume_and_is_reused(col, monkeypatch):
    name = col.names[0]
    meta = preprocess(col, gauss=0.8)[name]
    got = np.asarray(col.zarr_group[f"derived/preprocessed/{name}/0"][:])
    raw = np.asarray(col[name].data(0).compute())
    g = ndi.gaussian_filter(raw, 0.8, mode="nearest")
    mean, std = g.astype(np.float64).mean(), g.astype(np.float64).std()
    ref = np.clip(((g - mean) / std + 3) / 6, 0, 1)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert meta["complete"] and meta["params"]["gauss"] == 0.8 and meta["grid"]["scale"] == [1.0, 1.0, 1.0]
    tilts = np.asarray(col.zarr_group[f"derived/preprocessed_tilts/{name}/0"][:])
    assert tilts.shape == col[name].tilt_series.shape and 0 <= tilts.min() and tilts.max() <= 1
    # unchanged parameters: nothing is recomputed; changed ones: recomputed
    calls = []
    monkeypatch.setattr(pre_mod, "_preprocess_volume", lambda *a, **k: calls.append(a) or {})
    preprocess(col, gauss=0.8)
    assert calls == []
    preprocess(col, gauss=1.0)
    assert len(calls) == 1


def test_compress_and_bin_grid(col):
    name = col.names[0]
    meta = preprocess(col, gauss=0.0, compress=True, bin=2)[name]
    assert meta["shape"] == [10, 48, 48]
    assert meta["grid"] == {"scale": [4.0, 2.0, 2.0], "offset": [1.5, 0.5, 0.5]}
    assert meta["params"]["clip"] == [-2.5, 2.0]  # MiLoPYP's no-Gaussian branch
    raw = np.asarray(col[name].data(0).compute())
    comp = np.maximum(raw[0::2], raw[1::2])
    binned = comp.reshape(10, 2, 48, 2, 48, 2).mean(axis=(1, 3, 5))
    got = np.asarray(col.zarr_group[f"derived/preprocessed/{name}/0"][:])
    mean, std = binned.astype(np.float64).mean(), binned.astype(np.float64).std()
    np.testing.assert_allclose(got, np.clip(((binned - mean) / std + 2.5) / 4.5, 0, 1), atol=1e-5)
    with pytest.raises(InputError, match="--bin"):
        preprocess(col, bin=0)


def test_mine_recall_and_table(col, synth_dir):
    preprocess(col, gauss=0.8)
    cands = mine(col, **MINE, recentre="off")  # MiLoPYP's DoG peaks (the default recentres them, tested below)
    assert list(cands.columns) == ["tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "score", "level"]
    assert col.has_table("candidates") and len(col.read_table("candidates")) == len(cands)
    params = col.table_params("candidates")  # the mining parameters travel with the table
    assert params["dog"] == [float(s) for s in MINE["dog"]] and params["threshold_std"] == pytest.approx(0.5)
    vs = col[col.names[0]].voxel_size
    np.testing.assert_allclose(cands["x_A"], cands["x"] * vs)
    assert cands["score"].is_monotonic_decreasing and (cands["score"] > 0).all()
    gt = synth_dir.ground_truth
    d, _ = cKDTree(cands[["x", "y", "z"]].to_numpy()).query(gt[["x", "y", "z"]].to_numpy())
    assert (d <= gt["radius"].to_numpy()).mean() >= 0.8
    # the same candidates when the volume is cut into other chunks (seams elsewhere)
    vol = col.zarr_group[f"derived/preprocessed/{col.names[0]}/0"]
    from milotile.ops.peaks import dog_peaks

    other = dog_peaks(da.from_array(vol[:], chunks=(7, 20, 33)), MINE["dog"], min_distance=5, border=(3, 6, 6))
    np.testing.assert_array_equal(other[["x", "y", "z"]].to_numpy(), cands[["x", "y", "z"]].to_numpy())


def test_mine_compressed_returns_full_resolution(col):
    preprocess(col, gauss=0.8)
    full = mine(col, **MINE)
    preprocess(col, gauss=0.8, compress=True)
    comp = mine(col, **{**MINE, "border_z": 2}, table="cand_c")
    assert comp["z"].max() <= SIZE[0] - 1 and comp["z"].max() > SIZE[0] / 2
    d, _ = cKDTree(full[["x", "y", "z"]].to_numpy()).query(comp[["x", "y", "z"]].head(5).to_numpy())
    assert np.median(d) <= 3.0  # the strongest compressed candidates sit on full-resolution ones


def test_patch_bank_layout_and_alignment(col):
    preprocess(col, gauss=0.8)
    cands = mine(col, **MINE)
    key = extract_patches(col, bbox=12, modes="slab", shifts=True, chunk_n=16)
    arr = col.zarr_group[f"patches/{key}/data"]
    assert arr.shape == (len(cands), 5, 1, 12, 12) and arr.chunks == (16, 5, 1, 12, 12)
    attrs = col.zarr_group[f"patches/{key}"].attrs["milotile"]
    assert attrs["complete"] and attrs["params"]["modes"] == ["slab"] and attrs["n"] == len(cands)
    assert set(attrs["sources"]) == {"tables/candidates", f"derived/preprocessed/{col.names[0]}"}
    assert attrs["params"]["dog"] == [float(s) for s in MINE["dog"]]  # for the explorer's contract
    table = col.read_table(f"patches-{key}")
    assert table["patch_index"].tolist() == list(range(len(cands)))
    assert sorted(table["source_index"]) == list(range(len(cands)))
    vol = col.zarr_group[f"derived/preprocessed/{col.names[0]}/0"][:]
    row = table[~table["clipped"]].iloc[3]
    x, y, z = (int(round(row[c])) for c in "xyz")
    ref = vol[z - 1 : z + 2, y - 6 : y + 6, x - 6 : x + 6].astype(np.float64).sum(0)
    np.testing.assert_allclose(arr[int(row["patch_index"]), 0, 0], (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-5)
    pd.testing.assert_series_equal(
        table["x"].reset_index(drop=True), cands["x"].iloc[table["source_index"]].reset_index(drop=True)
    )
    # same parameters: reused, not rewritten
    arr[0, 0, 0, 0, 0] = -1.0
    assert extract_patches(col, bbox=12, modes="slab", shifts=True, chunk_n=16) == key
    assert col.zarr_group[f"patches/{key}/data"][0, 0, 0, 0, 0] == -1.0


def test_tiltsum_sign_auto_override_and_mismatch(col, synth_dir):
    name = col.names[0]
    mine(col, **MINE)  # raw volume: no preprocessed tilts, so the bank uses the stored tilts
    key = extract_patches(col, bbox=12, modes=("tiltsum", "slice"))
    params = col.zarr_group[f"patches/{key}"].attrs["milotile"]  # what the stage recorded while writing
    assert params["tilt_sign"] == {name: 1} and params["geometry"][name]["correlation"] > 0.5
    assert col.zarr_group[f"patches/{key}/data"].shape[2] == 2
    # reversing the tilt order mirrors the handedness
    tilts = col.zarr_group[f"tilts/{name}/0"]
    original = tilts[:]
    tilts[:] = original[::-1]
    key2 = extract_patches(col, bbox=12, modes=("tiltsum",), key="mirrored")
    assert col.zarr_group[f"patches/{key2}"].attrs["milotile"]["tilt_sign"] == {name: -1}
    key3 = extract_patches(col, bbox=12, modes=("tiltsum",), key="forced", tilt_sign=1)
    assert col.zarr_group[f"patches/{key3}"].attrs["milotile"]["tilt_sign"] == {name: 1}
    # a tilt series of another specimen is refused, naming the tomogram
    rng = np.random.default_rng(0)
    tilts[:] = ndi.gaussian_filter(rng.normal(size=original.shape), (0, 2, 2)).astype(np.float32)
    with pytest.raises(InputError, match=f"{name}.*does not match"):
        extract_patches(col, bbox=12, modes=("tiltsum",), key="wrong")


def test_tilthalves_window_checked_before_anything_is_written(col):
    """Too few tilts in the window for two halves: a clear error, and a bank already under that key stays intact."""
    mine(col, **MINE)
    key = extract_patches(col, bbox=12, modes=("tilthalves", "slice"), key="halves")
    grp = col.zarr_group[f"patches/{key}"]
    assert grp["data"].shape[2] == 3 and grp.attrs["milotile"]["complete"] is True
    before = grp["data"][:]
    with pytest.raises(InputError, match=r"tilthalves' needs at least 2 tilts inside the window \[-1, 1\]"):
        extract_patches(col, bbox=12, modes=("tilthalves", "slice"), key="halves", tilt_window=(-1.0, 1.0))
    with pytest.raises(InputError, match="no tilt angle lies inside the window"):
        extract_patches(col, bbox=12, modes=("tiltsum",), key="halves", tilt_window=(80.0, 85.0))
    grp = col.zarr_group[f"patches/{key}"]
    assert grp.attrs["milotile"]["complete"] is True
    np.testing.assert_array_equal(grp["data"][:], before)


def test_cli_handlers(col):
    from milotile.cli import build_parser

    parser = build_parser()
    for argv in (
        ["preprocess", col.url, "--gauss", "0.8"],
        ["mine", col.url, "--dog", "2,4", "--min-distance", "5", "--border", "6", "--border-z", "3"],
        ["patches", col.url, "--bbox", "10", "--mode", "slice,slab", "--tilt-window", "-20,20"],
    ):
        args = parser.parse_args(argv)
        assert args.needs_cluster is True
        assert args.handler(args) == 0
    assert col.has_table("patches-candidates-slice+slab-b10")
    with pytest.raises(InputError, match="modes"):
        args = parser.parse_args(["patches", col.url, "--mode", "slab,bogus"])
        args.handler(args)


def test_blur_with_stats_single_pass_matches_scipy(tmp_path):
    import zarr

    v = np.random.default_rng(4).normal(5.0, 2.0, size=(23, 50, 41)).astype(np.float32)
    target = zarr.create_array(tmp_path / "t.zarr", shape=v.shape, chunks=(8, 24, 24), dtype=np.float32)
    x = da.from_array(v, chunks=(7, 20, 33))  # misaligned with the target: rechunked first
    mean, std = pre_mod.blur_with_stats(x, 1.2, target)
    g = ndi.gaussian_filter(v, 1.2, mode="nearest")
    np.testing.assert_array_equal(target[:], g)
    assert mean == pytest.approx(g.astype(np.float64).mean(), rel=1e-10)
    assert std == pytest.approx(g.astype(np.float64).std(), rel=1e-9)
    mean0, std0 = pre_mod.blur_with_stats(x, 0.0, target)  # no Gaussian: a plain copy
    np.testing.assert_array_equal(target[:], v)
    assert std0 == pytest.approx(v.astype(np.float64).std(), rel=1e-9)


def test_preprocess_store_layout(col):
    name = col.names[0]
    preprocess(col, gauss=0.8)
    group = col.zarr_group[f"derived/preprocessed/{name}"]
    assert sorted(group.array_keys()) == ["0"]  # the temporary array of pass 1 is gone
    arr = group["0"]
    assert arr.chunks == (40, 96, 96) and arr.dtype == np.float32  # (64, 256, 256) clipped
    # reading back through preprocessed_volume gives the store chunks (what mine and patches use)
    vol, grid, meta = pre_mod.preprocessed_volume(col, name)
    assert vol.chunksize == arr.chunks and meta["complete"]


def test_mine_block_shape_does_not_change_candidates(col):
    preprocess(col, gauss=0.8)
    ref = mine(col, **MINE)
    for chunks in [(8, 24, 24), (-1, 40, 56)]:
        got = mine(col, **MINE, chunks=chunks, table="cand_blocks")
        pd.testing.assert_frame_equal(got, ref)


def test_mine_recentre_moves_candidates_onto_particle_centres(col, synth_dir):
    preprocess(col, gauss=0.8)
    gt = synth_dir.ground_truth
    plain = mine(col, **MINE, recentre="off", table="plain")
    r = float(gt["radius"].max())
    moved = mine(col, **MINE, recentre=r, table="centred")
    assert col.table_params("centred")["recentre"] == pytest.approx(r) and col.table_params("plain")["recentre"] is None
    assert len(moved) <= len(plain) and moved["score"].is_monotonic_decreasing

    def off_centre(c: pd.DataFrame) -> np.ndarray:  # per particle with a candidate on it: the nearest one's distance
        d, _ = cKDTree(c[["x", "y", "z"]].to_numpy()).query(gt[["x", "y", "z"]].to_numpy())
        return d[d <= gt["radius"].to_numpy()]

    with pytest.raises(InputError, match="recentre"):
        mine(col, **MINE, recentre=0, table="never")
    assert not col.has_table("never")
    before, after = off_centre(plain), off_centre(moved)
    assert len(after) >= 0.9 * len(before)  # particles keep their candidate
    assert np.median(after) < np.median(before) and np.median(after) < 1.5, (np.median(before), np.median(after))
    # auto: 2.4 x the largest sigma in level-0 voxels (the preprocessed grid is unbinned in x/y here)
    auto = mine(col, **MINE, table="auto")  # the default
    assert col.table_params("auto")["recentre"] == pytest.approx(2.4 * 4.0)
    pd.testing.assert_frame_equal(auto, mine(col, **MINE, recentre=9.6, table="nine"))
    with pytest.raises(InputError, match="'auto' or 'off'"):
        mine(col, **MINE, recentre="big", table="never")
    assert mine(col, **MINE, recentre="off", table="off").equals(plain)
