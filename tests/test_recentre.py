"""Labels moved onto their particle's density centre and merged (milotile.ops.recentre, refine.labels)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import milotile as mt
from milotile.ops.recentre import (
    contrast_sign,
    density_centre_tasks,
    density_centres,
    gather_centres,
    merge_close,
)
from milotile.refine.labels import recentre_labels


def _blobs(shape, centres, radius, value, noise, seed=0):
    """A noisy volume with solid spheres of ``value`` (the solvent is 0), each with a lump on one side."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, noise, shape).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    for c in centres:
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        vol[d2 <= radius**2] += value
        lump = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2] - radius) ** 2
        vol[lump <= (radius / 3) ** 2] += value  # a DoG detector would peak here
    return vol


@pytest.mark.parametrize("value", [-1.0, 1.0])
def test_offset_points_move_to_the_particle_centre(value):
    centres = np.array([[24, 24, 24], [24, 24, 64], [40, 56, 40]], float)
    vol = _blobs((64, 88, 88), centres, 8, value, noise=0.5)
    rng = np.random.default_rng(1)
    offsets = rng.normal(size=(3, 3))
    offsets *= 5.0 / np.linalg.norm(offsets, axis=1, keepdims=True)  # 5 voxels off, in random directions
    start = centres + offsets
    assert contrast_sign(vol, start, 8) == (-1 if value < 0 else 1)
    out, info = density_centres(vol, start, 8)
    err = np.linalg.norm(out - centres, axis=1)
    assert (err < 1.5).all(), err
    assert info["contrast"] == ("dark" if value < 0 else "bright") and info["moved"] == 3 and info["kept"] == 0
    # the wrong contrast runs away from the particles: the cap leaves those points where they were
    wrong, winfo = density_centres(vol, start, 8, contrast="bright" if value < 0 else "dark", max_shift=3)
    assert (np.linalg.norm(wrong - centres, axis=1) > 1.5).any() or winfo["kept"] > 0


def test_a_point_on_empty_background_is_left_in_place():
    vol = np.zeros((40, 40, 40), np.float32)
    out, info = density_centres(vol, np.array([[20.0, 20, 20]]), 6, contrast="dark")
    assert np.array_equal(out, [[20.0, 20, 20]]) and info["kept"] == 1 and info["moved"] == 0
    with pytest.raises(ValueError, match="contrast"):
        density_centres(vol, np.array([[20.0, 20, 20]]), 6, contrast="grey")
    with pytest.raises(ValueError, match="radius"):
        density_centres(vol, np.array([[20.0, 20, 20]]), 0)


def test_dask_tasks_give_the_points_of_the_reader_mean_shift():
    import dask
    import dask.array as da

    centres = np.array([[24, 24, 24], [24, 24, 64], [40, 56, 40], [6, 80, 84]], float)
    vol = _blobs((64, 88, 88), centres, 8, -1.0, noise=0.5)
    rng = np.random.default_rng(2)
    # points around every particle (several per storage chunk, groups cut at 3) and one outside the volume
    start = np.concatenate([centres + rng.normal(0, 3, (4, 3)) for _ in range(4)] + [[[70.0, 95, 95]]])
    ref, rinfo = density_centres(vol, start, 8, contrast="dark")
    darr = da.from_array(vol, chunks=(32, 40, 40))
    tasks = density_centre_tasks(darr, start, 8, contrast="dark", group=3)
    assert len(tasks) > 4 and sorted(np.concatenate([i for i, _ in tasks]).tolist()) == list(range(len(start)))
    got, ginfo = gather_centres(start, tasks, dask.compute(*[t for _, t in tasks]), "dark")
    np.testing.assert_allclose(got, ref, atol=0.1)  # the sub-volume is smoothed as a whole, not window by window
    assert ginfo["kept"] == rinfo["kept"] >= 1 and ginfo["moved"] == rinfo["moved"]  # the outside point stays
    with pytest.raises(ValueError, match="contrast"):
        density_centre_tasks(darr, start, 8, contrast="auto")


def test_merge_close_joins_within_the_distance_and_the_group_only():
    pts = np.array([[0, 0, 0], [0, 0, 2], [0, 0, 3.5], [0, 0, 20], [0, 0, 1]], float)
    centres, members = merge_close(pts, 2.0)
    # 0-1-2 chain (single linkage) and 4 joins them; 3 stays alone; order of first members kept
    assert members.tolist() == [0, 0, 0, 1, 0]
    assert np.allclose(centres[0], pts[[0, 1, 2, 4]].mean(axis=0)) and np.allclose(centres[1], [0, 0, 20])
    _, members = merge_close(pts, 2.0, groups=["a", "b", "b", "a", "a"])
    assert members.tolist() == [0, 1, 1, 2, 0]
    c, m = merge_close(np.zeros((0, 3)), 2.0)
    assert c.shape == (0, 3) and m.shape == (0,)


def test_recentre_labels_on_a_collection(tmp_path):
    from milotile.synth import synth

    res = synth(tmp_path / "synth", seed=4, n_tomograms=1, size=(48, 112, 112), n_particles=6, filament=False)
    col = mt.ingest(res.manifest, tmp_path / "store.zarr")
    gt = res.ground_truth
    r = float(gt["radius"].max())
    rng = np.random.default_rng(0)
    # two labels per particle, each r/2 off the centre in the x-y plane (a DoG peak on a lobe)
    rows = []
    for _, p in gt.iterrows():
        for _ in range(2):
            a = rng.uniform(0, 2 * np.pi)
            rows.append({"tomogram": p["tomogram"], "x": p["x"] + r / 2 * np.cos(a), "y": p["y"] + r / 2 * np.sin(a),
                         "z": p["z"], "class": "particle"})
    lab = pd.DataFrame(rows)
    out, info = recentre_labels(col, lab, r)
    assert info["n_before"] == len(lab) and info["contrast"] == "dark"
    assert list(out.columns) == list(lab.columns)
    d_before = np.linalg.norm(lab[["x", "y", "z"]].to_numpy() - np.repeat(gt[["x", "y", "z"]].to_numpy(), 2, axis=0),
                              axis=1)
    from scipy.spatial import cKDTree

    d_after, _ = cKDTree(gt[["x", "y", "z"]].to_numpy()).query(out[["x", "y", "z"]].to_numpy())
    assert np.median(d_after) < 0.5 * np.median(d_before), (np.median(d_after), np.median(d_before))
    # duplicates that met on one centre are one label each; the table never grows
    assert len(gt) <= info["n_after"] < len(lab)


def test_atlas_selections_are_told_apart_from_other_labels(tmp_path):
    from milotile.errors import InputError
    from milotile.refine.labels import is_atlas_selection
    from milotile.refine.recipe import PickerRecipe

    lab = pd.DataFrame({"tomogram": ["t"], "x": [1.0], "y": [2.0], "z": [3.0]})
    assert not is_atlas_selection(lab)
    assert is_atlas_selection(lab.assign(id=[7], cluster=[2]))
    plain = tmp_path / "manual.parquet"
    lab.to_parquet(plain)
    assert not is_atlas_selection(plain) and not is_atlas_selection(str(plain))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(lab.assign(id=[7], cluster=[2]), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"milotile": b'{"atlas": "a1", "n": 1}'})
    sel = tmp_path / "labels-sel.parquet"
    pq.write_table(table, sel)
    assert is_atlas_selection(sel)
    (tmp_path / "coords.tsv").write_text("tomogram\tx\ty\tz\nt\t1\t2\t3\n")
    assert not is_atlas_selection(tmp_path / "coords.tsv")
    assert not is_atlas_selection(tmp_path / "missing.parquet")
    assert PickerRecipe().recentre == "auto"
    with pytest.raises(InputError, match="recentre"):
        PickerRecipe(recentre=True)
