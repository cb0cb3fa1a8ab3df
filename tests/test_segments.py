"""Segment clustering (issue 14): readers, ingest + index, connected components, features, clustering,
relabelled OME-NGFF labels, plots and the CLI, on small generated volumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from milotile.errors import InputError
from milotile.metrics import clustering_scores, matched_accuracy
from milotile.synth.segments import SHAPE_CLASSES, make_scene, render_block, synth_segments

CHUNKS = (24, 80, 80)  # not a multiple of the synthetic cell size: objects cross seams


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("segsyn")
    info = synth_segments(out / "data", shape=(64, 192, 192), radius=(2.5, 3.5), seed=3, noise=20)
    lab = np.asarray(__import__("h5py").File(info["labels"], "r")["labels"][:])
    return {**info, "dir": out, "labels_array": lab, "truth": pd.read_parquet(info["classes"])}


@pytest.fixture(scope="module")
def store(synth):
    from milotile.segments import compute_features, ingest_segments

    path = synth["dir"] / "s.zarr"
    ingest_segments(synth["em"], synth["labels"], path, classes=synth["classes"], chunks=CHUNKS)
    compute_features(path, crop_size=16, n_points=64)
    return path


# -- synthetic data -----------------------------------------------------------------------------
def test_scene_blocks_agree_at_seams_and_objects_cross_them():
    scene = make_scene((48, 96, 96), radius=(2.5, 3.5), seed=1)
    assert set(scene.objects["class_name"]) == set(SHAPE_CLASSES)
    em, lab = render_block(scene, (0, 0, 0), (48, 96, 96))
    assert em.dtype == np.uint8 and set(np.unique(lab)[1:]) == set(scene.objects["id"])
    # blocks rendered separately are identical to the whole
    for lo, hi in [((0, 0, 0), (24, 40, 40)), ((24, 40, 40), (48, 96, 96))]:
        _, part = render_block(scene, lo, hi)
        assert np.array_equal(part, lab[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
    sl = ndimage.find_objects(lab)
    crossing = sum(any((s.start // c) != ((s.stop - 1) // c) for s, c in zip(o, CHUNKS, strict=True)) for o in sl if o)
    assert crossing >= 5


# -- readers ------------------------------------------------------------------------------------
def test_readers_all_formats_and_natural_slice_order(tmp_path):
    import h5py
    import imageio.v3 as iio
    import mrcfile
    import tifffile
    import zarr

    from milotile.segments.io import open_volume

    rng = np.random.default_rng(0)
    vol = rng.integers(0, 60000, size=(12, 20, 24), dtype=np.uint16)
    with mrcfile.new(tmp_path / "v.mrc") as m:
        m.set_data(vol)
        m.voxel_size = 40.0
    tifffile.imwrite(tmp_path / "v.tif", vol)
    (tmp_path / "slices").mkdir()
    for z in range(12):  # z1..z12: lexicographic order would put z10 before z2
        iio.imwrite(tmp_path / "slices" / f"z{z + 1}.png", vol[z])
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["a/b"] = vol
        f["other"] = np.zeros((2, 2))
    zarr.save_array(str(tmp_path / "v.zarr"), vol)
    for p, ds in [("v.mrc", None), ("v.tif", None), ("slices", None), ("v.h5", None), ("v.h5", "a/b"), ("v.zarr", None)]:
        r = open_volume(tmp_path / p, ds)
        assert r.shape == vol.shape and r.dtype == vol.dtype, p
        assert np.array_equal(r[3:9, 2:17, 5:20], vol[3:9, 2:17, 5:20]), p
    assert open_volume(tmp_path / "v.mrc").voxel_size == (40.0, 40.0, 40.0)
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["x"] = vol
        f["y"] = vol
    with pytest.raises(InputError, match="--dataset"):
        open_volume(tmp_path / "two.h5")


# -- ingest + index -----------------------------------------------------------------------------
def test_index_matches_scipy_on_whole_volume(store, synth):
    from milotile.segments import open_segments

    vol = open_segments(store)
    ob = vol.objects()
    lab = synth["labels_array"]
    ids, counts = np.unique(lab, return_counts=True)
    assert np.array_equal(ob["id"].to_numpy(), ids[1:].astype(np.uint64))
    assert np.array_equal(ob["voxels"].to_numpy(), counts[1:])
    com = np.array(ndimage.center_of_mass(np.ones_like(lab), lab, ids[1:]))
    assert np.allclose(ob[["z", "y", "x"]].to_numpy(), com)
    sl = ndimage.find_objects(lab)
    assert np.array_equal(ob[["z0", "y0", "x0"]].to_numpy(), [[s.start for s in o] for o in sl])
    assert np.array_equal(ob[["z1", "y1", "x1"]].to_numpy(), [[s.stop for s in o] for o in sl])
    assert np.allclose(ob["x_A"], ob["x"] * 80.0)
    assert np.array_equal(ob["class"].to_numpy(), synth["truth"]["class"].to_numpy())
    assert vol.label_array().dtype == np.uint32 and vol.label_array().chunks == CHUNKS
    assert np.array_equal(vol.labels().compute(), lab)
    assert vol.voxel_size == (80.0, 80.0, 80.0) and vol.unit == "angstrom"


def test_index_objects_recomputes_the_same_table(store):
    from milotile.segments import index_objects, open_segments

    before = open_segments(store).objects()
    after = index_objects(store)
    pd.testing.assert_frame_equal(before[after.columns].reset_index(drop=True), after.reset_index(drop=True),
                                  check_dtype=False)


def test_connected_components_across_seams(synth, tmp_path):
    import h5py

    from milotile.segments import ingest_segments

    mask = (synth["labels_array"] > 0).astype(np.uint8)
    with h5py.File(tmp_path / "mask.h5", "w") as f:
        f["mask"] = mask
    vol = ingest_segments(synth["em"], tmp_path / "mask.h5", tmp_path / "cc.zarr", connected_components=True,
                          chunks=(16, 48, 48))
    got = vol.labels().compute()
    ref = synth["labels_array"]
    assert len(vol.objects()) == len(np.unique(ref)) - 1
    # same partition: each reference object maps to exactly one new id and vice versa
    pairs = pd.DataFrame({"a": ref[ref > 0], "b": got[ref > 0]}).drop_duplicates()
    assert pairs["a"].is_unique and pairs["b"].is_unique
    assert np.array_equal(got > 0, ref > 0)


def test_reingest_is_skipped_when_unchanged_and_downstream_goes_stale(synth, tmp_path):
    from milotile.segments import compute_features, ingest_segments
    from milotile.store import open_collection

    store = tmp_path / "r.zarr"
    ingest_segments(synth["em"], synth["labels"], store, chunks=(32, 96, 96))
    col = open_collection(store)
    tok = col.source_token("segments/volume")
    mtime = (store / "segments/volume/labels/objects/0/zarr.json").stat().st_mtime_ns
    ingest_segments(synth["em"], synth["labels"], store, chunks=(32, 96, 96))  # same inputs: reused
    assert (store / "segments/volume/labels/objects/0/zarr.json").stat().st_mtime_ns == mtime
    with pytest.raises(InputError, match="overwrite"):
        ingest_segments(synth["em"], synth["labels"], store, chunks=(16, 96, 96))
    compute_features(store, crop_size=0, n_points=0)
    assert col.output_status("tables/segment-features") == "complete"
    ingest_segments(synth["em"], synth["labels"], store, chunks=(16, 96, 96), overwrite=True)
    assert col.source_token("segments/volume") != tok
    assert col.output_status("tables/segment-features") == "stale"


@pytest.mark.parametrize("case", ["shape", "float", "empty"])
def test_bad_input_one_sentence_nothing_written(synth, tmp_path, case):
    import h5py

    from milotile.segments import ingest_segments

    lab = synth["labels_array"]
    data = {"shape": lab[:-1], "float": lab.astype(np.float32), "empty": np.zeros_like(lab)}[case]
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["labels"] = data
    store = tmp_path / "bad.zarr"
    with pytest.raises(InputError, match={"shape": "shape", "float": "float", "empty": "no object"}[case]) as ei:
        ingest_segments(synth["em"], tmp_path / "bad.h5", store)
    assert "\n" not in str(ei.value)
    assert not store.exists()


def test_cli_bad_input_exit_2_without_traceback(synth, tmp_path, capsys, monkeypatch):
    import h5py

    from milotile.cli import main

    monkeypatch.setenv("MILOTILE_PROGRESS", "0")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["labels"] = synth["labels_array"].astype(np.float64)
    store = tmp_path / "bad.zarr"
    rc = main(["segments", "ingest", "--em", synth["em"], "--labels", str(tmp_path / "bad.h5"), "--store", str(store)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and "float" in err
    assert not store.exists()


# -- hand-crafted features ----------------------------------------------------------------------
def _ball(r: float, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    sp = np.asarray(spacing)
    n = np.ceil(r / sp).astype(int) + 2
    g = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(n, sp, strict=True)], indexing="ij")
    return (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) <= r * r


def test_measure_ball_rod_disc_and_anisotropy():
    from milotile.segments.shape import measure

    r = 10.0
    f = measure(_ball(r))
    assert f["volume"] == pytest.approx(4 / 3 * math.pi * r**3, rel=0.03)
    assert f["surface_area"] == pytest.approx(4 * math.pi * r**2, rel=0.08)
    assert 0.9 < f["sphericity"] <= 1.05 and f["elongation"] < 1.1 and f["circularity"] > 0.85
    assert f["thickness_max"] == pytest.approx(2 * r, rel=0.12)
    # the same physical ball sampled with anisotropic voxels (z twice as coarse)
    fa = measure(_ball(r, (2.0, 1.0, 1.0)), spacing=(2.0, 1.0, 1.0))
    assert fa["volume"] == pytest.approx(f["volume"], rel=0.05)
    assert fa["surface_area"] == pytest.approx(f["surface_area"], rel=0.1)
    rod = np.zeros((9, 9, 60), bool)
    rod[2:7, 2:7, 5:55] = True
    fr = measure(rod)
    assert fr["skeleton_length"] == pytest.approx(50, abs=8) and fr["elongation"] > 4
    assert fr["skeleton_endpoints"] == 2
    disc = np.zeros((5, 40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    disc[1:4] = (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2
    assert measure(disc)["flatness"] > 3
    star = np.zeros((41, 41, 41), bool)
    star[18:23, 18:23, 2:39] = True
    star[18:23, 2:39, 18:23] = True
    star[2:21, 18:23, 18:23] = True
    assert measure(star)["skeleton_branches"] >= 4


def test_features_table_units_and_shape_classes(store, synth):
    from milotile.segments import open_segments
    from milotile.segments.volume import read_rows
    from milotile.store import open_collection

    col = open_collection(store)
    ft = read_rows(col, "segment-features", "volume")
    assert np.array_equal(ft["id"].to_numpy(), synth["truth"]["id"].to_numpy().astype(np.uint64))
    assert np.array_equal(ft["row"].to_numpy(), np.arange(len(ft)))
    assert np.allclose(ft["volume"], ft["voxels"] * 80.0**3)
    units = col.table_params("segment-features")["units"]
    assert units["volume"] == "Å^3" and units["sphericity"] == "1" and units["skeleton_length"] == "Å"
    ft["cls"] = synth["truth"]["class_name"].to_numpy()
    med = ft.groupby("cls").median(numeric_only=True)
    assert med.loc["round", "sphericity"] > med.loc[["elongated", "branched", "flat"], "sphericity"].max()
    assert med.loc["branched", "skeleton_branches"] >= 3
    assert med.loc["elongated", "elongation"] > 2 and med.loc["flat", "flatness"] > 2
    vol = open_segments(store)
    crops = vol.group["crops"]
    assert crops.shape == (len(ft), 16, 16, 16) and crops.dtype == np.uint8
    assert (np.asarray(crops[:]).reshape(len(ft), -1).max(axis=1) > 200).all()
    pts = np.asarray(vol.group["points"][:])
    assert pts.shape == (len(ft), 64, 3)
    assert np.allclose(np.sqrt((pts**2).sum(-1)).mean(1), 1.0, atol=0.35)


# -- clustering ---------------------------------------------------------------------------------
def test_cluster_handcrafted_beats_chance_and_writes_labels(store, synth):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from milotile.segments import cluster_objects, open_segments

    res = cluster_objects(store, features="size,sphericity,skeleton,axes", algorithm="kmeans", n_clusters=4)
    assert res.scores is not None and res.scores["accuracy"] > 0.6 and res.scores["ari"] > 0.3
    vol = open_segments(store)
    got = vol.labels("clusters").compute()
    lab = synth["labels_array"]
    lut = dict(zip(res.table["id"].astype(int), res.table["cluster"] + 1, strict=True))
    ids = np.unique(lab)[1:]
    for i in ids[:: max(1, len(ids) // 20)]:
        assert np.all(got[lab == i] == lut[int(i)])
    assert np.all(got[lab == 0] == 0)
    # read back with the OME-Zarr reference reader: the label image and its colour table
    nodes = list(Reader(parse_url(str(store / "segments" / "volume")))())
    lab_nodes = [n for n in nodes if "image-label" in n.metadata or n.metadata.get("color")]
    assert lab_nodes, [n.metadata for n in nodes]
    attrs = json.loads((store / "segments/volume/labels/clusters/zarr.json").read_text())["attributes"]["ome"]
    assert {c["label-value"] for c in attrs["image-label"]["colors"]} == set(range(1, res.n_clusters + 1))


@pytest.mark.parametrize("algorithm", ["affinity", "spectral", "agglomerative", "dbscan", "hdbscan"])
def test_other_algorithms_run_on_feature_rows(store, algorithm):
    from milotile.segments import cluster_objects

    res = cluster_objects(store, features="size,sphericity,skeleton", algorithm=algorithm, n_clusters=4,
                          relabel=False, **({"eps": 0.8} if algorithm == "dbscan" else {}))
    assert len(res.table) > 50 and res.n_clusters >= 2
    if algorithm in ("spectral", "agglomerative"):
        assert res.scores["nmi"] > 0.2


def test_affinity_refused_above_its_dense_limit(store, monkeypatch):
    from milotile.segments import cluster as sc

    monkeypatch.setattr(sc, "AFFINITY_MAX", 50)
    with pytest.raises(InputError, match="dense"):
        sc.cluster_objects(store, features="size", algorithm="affinity", relabel=False)


def test_bad_feature_names_and_weights(store):
    from milotile.segments import cluster_objects

    with pytest.raises(InputError, match="unknown feature group"):
        cluster_objects(store, features="size,colour", relabel=False)
    with pytest.raises(InputError, match="weights"):
        cluster_objects(store, features="size,sphericity", weights=[1.0], relabel=False)
    with pytest.raises(InputError, match="embed"):
        cluster_objects(store, features="size,vae", relabel=False)


def test_metrics_clustering_scores():
    t = np.array([0, 0, 1, 1, 2, 2])
    assert clustering_scores(t, [5, 5, 3, 3, 9, 9]) == {"ari": 1.0, "nmi": 1.0, "accuracy": 1.0, "n": 6}
    assert matched_accuracy(t, [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)
    assert matched_accuracy(t, [0, 1, 2, 3, 4, 5]) == pytest.approx(3 / 6)  # extra clusters count as wrong


def test_plots_written(store, tmp_path):
    from milotile.segments import cluster_objects, plot_clusters

    cluster_objects(store, features="size,sphericity,skeleton", n_clusters=4, relabel=False)
    out = plot_clusters(store, tmp_path / "plots", method="pca")
    assert set(out) == {"scatter", "map", "gallery"}
    assert all(Path(p).stat().st_size > 5000 for p in out.values())


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_synth_ingest_features_cluster(tmp_path, capsys):
    from milotile.cli import main

    data = tmp_path / "d"
    assert main(["synth", str(data), "--segments", "--size", "40,96,96", "--radius", "2.5,3.5", "--seed", "5"]) == 0
    store = str(tmp_path / "c.zarr")
    assert main(["segments", "ingest", "--em", str(data / "em.mrc"), "--labels", str(data / "labels.h5"),
                 "--classes", str(data / "objects.parquet"), "--store", store, "--chunks", "20,48,48"]) == 0
    from milotile.segments import (
        compute_features,  # (the CLI's `segments features` starts a cluster)
    )

    compute_features(store, crop_size=0, n_points=0)
    capsys.readouterr()
    assert main(["segments", "cluster", store, "--features", "sphericity,skeleton,axes", "--n-clusters", "4",
                 "--map", "pca"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["clusters"] == 4 and out["scores"]["accuracy"] > 0.4
    assert (Path(store) / "plots" / "segments-volume" / "map.png").is_file()
    assert not (Path(store) / "plots" / "segments-volume" / "gallery.png").exists()  # no crops were made


# -- learned features (tiny models; they must learn) ---------------------------------------------
def _knn_accuracy(X: np.ndarray, y: np.ndarray) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    X = (X - X.mean(0)) / (X.std(0) + 1e-9)
    return float(cross_val_score(KNeighborsClassifier(5), X, y, cv=4).mean())


@pytest.mark.slow
@pytest.mark.parametrize("kind,epochs", [("vae", 8), ("pointae", 15), ("simsiam", 12)])
def test_learned_features_learn_shape_classes(store, synth, tmp_path, kind, epochs):
    from milotile.nn.runlog import RunLog
    from milotile.segments import embed_objects, train_model

    ck = train_model(store, kind, epochs=epochs, batch_size=24, out=tmp_path / kind, seed=0, local=True)
    recs = RunLog(tmp_path / kind).records()
    assert len(recs) == epochs
    if kind == "simsiam":
        assert recs[-1]["loss"] < recs[0]["loss"] - 0.2  # negative cosine similarity falls towards -1
    else:
        key = "recon" if kind == "vae" else "chamfer"
        assert recs[-1][key] < 0.7 * recs[0][key]
    emb = embed_objects(store, kind, model=ck)
    assert np.array_equal(emb["id"].to_numpy(), synth["truth"]["id"].to_numpy().astype(np.uint64))
    X = emb.filter(like=f"{kind}_").to_numpy()
    acc = _knn_accuracy(X, synth["truth"]["class"].to_numpy())
    assert acc > 0.5, acc  # chance: 0.25 (four balanced classes)


@pytest.mark.slow
def test_training_resumes_on_a_dask_worker(store, tmp_path):
    from milotile.cluster import cluster
    from milotile.nn.checkpoint import load_checkpoint
    from milotile.nn.runlog import RunLog
    from milotile.segments import train_model

    out = tmp_path / "run"
    train_model(store, "pointae", epochs=1, batch_size=24, out=out, local=True)
    with pytest.raises(InputError, match="resume"):
        train_model(store, "pointae", epochs=2, batch_size=24, out=out, local=True)
    with cluster(workers=1, processes=False, dashboard_address=None):
        ck = train_model(store, "pointae", epochs=2, batch_size=24, out=out, resume=True)
    assert load_checkpoint(ck)["epoch"] == 2
    assert [r["epoch"] for r in RunLog(out).records()] == [1, 2]
    assert load_checkpoint(ck)["contract"]["kind"] == "pointae"


@pytest.mark.slow
def test_umap_map(store, tmp_path):
    from milotile.segments import cluster_objects
    from milotile.segments.plots import embedding_2d

    cluster_objects(store, features="size,sphericity,skeleton", n_clusters=4, relabel=False)
    from milotile.segments.cluster import feature_matrix
    from milotile.store import open_collection

    _, X, _ = feature_matrix(open_collection(store), "volume", "size,sphericity,skeleton")
    xy, used = embedding_2d(X, "auto")
    assert used == "umap" and xy.shape == (len(X), 2) and np.isfinite(xy).all()
