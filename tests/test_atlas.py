"""Tests of the exploration atlas: over-clustering, projection, storage, selection, plots, 3D colour map,
the app's HTTP API and the CLI (the real-browser test is in test_atlas_browser.py)."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pandas as pd
import pytest
from atlas_data import write_embedding_store
from sklearn.metrics import adjusted_rand_score

from milotile.errors import InputError
from milotile.explore.atlas import atlas, load_atlas
from milotile.explore.overcluster import UNASSIGNED, fit_overclusters
from milotile.explore.select import points_in_box, points_in_polygon, select, selection_ids


def _blobs(n=900, d=24, k=4, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, k, n)
    c = rng.normal(0, 1, (k, d))
    return (c[lab] + rng.normal(0, spread, (n, d))).astype(np.float32), lab


def test_overclusters_recover_groups_and_flag_outliers():
    x, lab = _blobs()
    far = np.full((5, x.shape[1]), 25.0, np.float32)  # far from every group
    oc = fit_overclusters(x, n_clusters=4, overcluster=60, outlier_z=4.0, seed=0)
    pred = oc.predict(np.concatenate([x, far]), block=128)  # several blocks
    assert adjusted_rand_score(lab, pred[: len(x)]) > 0.95
    assert (pred[len(x):] == UNASSIGNED).all()
    sizes = np.bincount(pred[pred >= 0])
    assert (np.diff(sizes) <= 0).all()  # ids ordered by size
    with pytest.raises(InputError, match="cannot make"):
        fit_overclusters(x[:3], n_clusters=4)


def test_atlas_fits_on_sample_transforms_rest_and_is_reused(tmp_path):
    col, sp = write_embedding_store(tmp_path / "s.zarr", n=1200, d=32, species=3)
    a = atlas(col, method="pca", n_clusters=3, overcluster=40, fit_sample=400, chunk_rows=256)
    t = a.table
    assert len(t) == 1200 and t["id"].tolist() == list(range(1200))
    assert {"tomogram", "x", "y", "z", "map_x", "map_y", "cluster", "color", "cluster_color", "species"} <= set(t.columns)
    assert np.isfinite(t[["map_x", "map_y"]].to_numpy()).all()
    ok = t["cluster"] >= 0
    assert ok.mean() > 0.95 and adjusted_rand_score(sp[ok], t["cluster"][ok]) > 0.9
    # same species -> nearby on the map (clusters separate in 2D too)
    cent = t.groupby("species")[["map_x", "map_y"]].median().to_numpy()
    spread = t.groupby("species")[["map_x", "map_y"]].std().to_numpy().max()
    assert np.min([np.hypot(*(cent[i] - cent[j])) for i in range(3) for j in range(i)]) > 3 * spread
    assert t["color"].str.match(r"^#[0-9a-f]{6}$").all()
    assert (t.loc[~ok, "cluster_color"] == "#969696").all()
    # stored + reused unchanged; a changed parameter recomputes
    before = col.fs.info(col._table_path("atlas-k"))["mtime"] if hasattr(col.fs, "info") else None
    b = atlas(col, method="pca", n_clusters=3, overcluster=40, fit_sample=400, chunk_rows=256)
    pd.testing.assert_frame_equal(b.table, t)
    if before is not None:
        assert col.fs.info(col._table_path("atlas-k"))["mtime"] == before
    assert load_atlas(str(tmp_path / "s.zarr")).params["params"]["fit_sample"] == 400
    c = atlas(col, method="pca", n_clusters=2, overcluster=40, fit_sample=400)
    assert c.table["cluster"].max() == 1
    # the reducer round-trips and maps the sample rows where the table put them
    r = c.reducer()
    emb = np.asarray(col.zarr_group["embeddings"]["k"][:50])
    np.testing.assert_allclose(r.project(r.prepare(emb)), c.table[["map_x", "map_y"]].to_numpy()[:50], atol=1e-5)


def test_atlas_on_dask_client_matches_in_process(tmp_path):
    from distributed import Client, LocalCluster

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=900, d=16, bank=False)
    local = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=300, chunk_rows=256).table
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc, Client(lc) as cl:
        dist = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=300, chunk_rows=256,
                     client=cl, overwrite=True)
    assert "on 2 workers" in dist.params["timings"]["where"]
    np.testing.assert_allclose(dist.table[["map_x", "map_y"]], local[["map_x", "map_y"]], atol=1e-6)
    assert (dist.table["cluster"] == local["cluster"]).all()


def test_atlas_hdbscan_and_errors(tmp_path):
    col, sp = write_embedding_store(tmp_path / "s.zarr", n=700, d=16, bank=False)
    a = atlas(col, method="pca", cluster_method="hdbscan", fit_sample=500)
    ok = a.table["cluster"] >= 0
    assert adjusted_rand_score(sp[ok], a.table["cluster"][ok]) > 0.9
    with pytest.raises(InputError, match="unknown atlas method"):
        atlas(col, method="mds")
    with pytest.raises(InputError, match="no embeddings 'zz'"):
        atlas(col, "zz")


@pytest.mark.slow
def test_atlas_umap_and_tsne_transform_new_points(tmp_path):
    col, sp = write_embedding_store(tmp_path / "s.zarr", n=1500, d=32, bank=False)
    for method in ("umap", "tsne"):
        a = atlas(col, method=method, n_clusters=3, overcluster=40, fit_sample=600, neighbors=15, overwrite=True,
                  transform="model")
        t = a.table
        assert np.isfinite(t[["map_x", "map_y"]].to_numpy()).all()
        # transformed (non-sample) points land next to fitted points of their own species
        from scipy.spatial import cKDTree

        sample = np.zeros(len(t), bool)
        sample[np.sort(np.random.default_rng(42).choice(len(t), 600, replace=False))] = True
        tree = cKDTree(t.loc[sample, ["map_x", "map_y"]].to_numpy())
        _, j = tree.query(t.loc[~sample, ["map_x", "map_y"]].to_numpy())
        agree = (sp[sample][j] == sp[~sample]).mean()
        assert agree > 0.95, (method, agree)


def test_polygon_box_and_cluster_selection_match_brute_force():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 1, (5000, 2))
    tri = [(0.1, 0.1), (0.9, 0.2), (0.3, 0.8)]
    # brute force: barycentric point-in-triangle
    (x1, y1), (x2, y2), (x3, y3) = tri
    den = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
    a = ((y2 - y3) * (xy[:, 0] - x3) + (x3 - x2) * (xy[:, 1] - y3)) / den
    b = ((y3 - y1) * (xy[:, 0] - x3) + (x1 - x3) * (xy[:, 1] - y3)) / den
    inside = (a > 0) & (b > 0) & (1 - a - b > 0)
    assert (points_in_polygon(xy, tri) == inside).all()
    box = points_in_box(xy, (0.7, 0.6, 0.2, 0.3))  # corners in any order
    assert (box == ((xy[:, 0] >= 0.2) & (xy[:, 0] <= 0.7) & (xy[:, 1] >= 0.3) & (xy[:, 1] <= 0.6))).all()
    table = pd.DataFrame({"id": np.arange(5000), "map_x": xy[:, 0], "map_y": xy[:, 1],
                          "cluster": rng.integers(-1, 4, 5000)})
    ids = selection_ids(table, polygon=tri, clusters=[0, 2])
    assert (ids == np.flatnonzero(inside & np.isin(table["cluster"], [0, 2]))).all()
    with pytest.raises(InputError, match="at least 3"):
        points_in_polygon(xy, [(0, 0), (1, 1)])


def test_select_clusters_writes_labels_refine_reads(tmp_path):
    from milotile.formats import read_labels
    from milotile.formats.milopyp import read_coordinate_tsv

    col, sp = write_embedding_store(tmp_path / "s.zarr", n=500, d=16)
    a = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=500)
    labels = select(col, clusters=[0, 2])
    t = a.table
    want = t[t["cluster"].isin([0, 2])]
    assert len(labels) == len(want) and (labels["id"].to_numpy() == want["id"].to_numpy()).all()
    path = tmp_path / "s.zarr" / "tables" / "labels-clusters-0-2.parquet"
    back = read_labels(path, col)  # what `refine train --labels` does
    np.testing.assert_allclose(back[["x", "y", "z"]].to_numpy(), want[["x", "y", "z"]].to_numpy())
    assert set(back["class"]) == {"clusters-0-2"}
    assert col.table_params("labels-clusters-0-2")["clusters"] == [0, 2]
    assert col.table_params("labels-clusters-0-2")["candidates_recentred"] is None  # no mined candidates here
    tsv = read_coordinate_tsv(tmp_path / "s.zarr" / "runs" / "atlas-k" / "selections" / "clusters-0-2.tsv")
    np.testing.assert_allclose(tsv["x"], np.round(want["x"]))
    info = pd.read_parquet(tmp_path / "s.zarr" / "runs" / "atlas-k" / "interactive_info_parquet.gzip")
    assert list(info.columns) == ["name", "coord", "embeddings", "label", "image"]
    assert len(info) == 500 and len(info["embeddings"].iloc[0]) == 16 and isinstance(info["coord"].iloc[0][0], str)
    # a Phoenix/nextPYP export (name, coord as integer strings) maps back onto the same candidates
    phoenix = info[info["label"] == 1].iloc[:20]
    phoenix.to_parquet(tmp_path / "export.parquet")
    again = select(col, parquet=tmp_path / "export.parquet", interactive_info=False)
    assert sorted(again["id"]) == sorted(t[t["cluster"] == 1]["id"].iloc[:20])
    with pytest.raises(InputError, match="no cluster 9"):
        select(col, clusters=[9])
    with pytest.raises(InputError, match="exactly one"):
        select(col)


def test_select_writes_negatives_from_other_clusters(tmp_path):
    from milotile.formats import read_labels

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=400, d=16)
    a = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=400)
    labels = select(col, clusters=[0], negatives=[1, 2], name="target", interactive_info=False)
    neg = labels.attrs["negatives"]
    t = a.table
    assert sorted(neg["id"]) == sorted(t[t["cluster"].isin([1, 2])]["id"])
    assert not set(neg["id"]) & set(labels["id"])
    back = read_labels(tmp_path / "s.zarr" / "tables" / "negatives-target.parquet", col)  # refine train --negatives
    assert len(back) == len(neg) and set(back["class"]) == {"negative"}
    assert col.table_params("negatives-target")["negative_clusters"] == [1, 2]
    before = col.read_table("labels-target")
    with pytest.raises(InputError, match="both as --clusters and as --negatives"):
        select(col, clusters=[0], negatives=[0, 1], name="target")
    with pytest.raises(InputError, match="no cluster 7"):
        select(col, clusters=[0], negatives=[7], name="target")
    pd.testing.assert_frame_equal(col.read_table("labels-target"), before)  # a refused call changes nothing


def test_select_negatives_rest_takes_every_cluster_holding_none_of_the_selection(tmp_path):
    from milotile.cli import main

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=400, d=16)
    a = atlas(col, method="pca", n_clusters=4, overcluster=30, fit_sample=400)
    t = a.table
    sub = int(t["subcluster"].iloc[0])
    home = int(t.loc[t["subcluster"] == sub, "cluster"].iloc[0])  # the cluster the sub-cluster lies in
    labels = select(col, subclusters=[sub], negatives="rest", name="lf", interactive_info=False)
    neg = labels.attrs["negatives"]
    known = set(t["cluster"].tolist()) - {-1}
    assert len(known) == 4
    assert sorted(neg["id"]) == sorted(t[(t["cluster"] != home) & (t["cluster"] >= 0)]["id"])  # not its own cluster
    assert col.table_params("negatives-lf")["negative_clusters"] == sorted(known - {home})
    assert main(["explore", "select", str(tmp_path / "s.zarr"), "--clusters", "0,1", "--negatives", "rest",
                 "--name", "cli"]) == 0
    assert sorted(col.read_table("negatives-cli")["id"]) == sorted(t[t["cluster"].isin([2, 3])]["id"])
    with pytest.raises(InputError, match="no cluster is left"):
        select(col, clusters=[0, 1, 2, 3], negatives="rest", name="all")
    with pytest.raises(InputError, match="cluster ids or 'rest'"):
        select(col, clusters=[0], negatives="others", name="x")


def test_plots_and_thumbnails(tmp_path):
    from PIL import Image

    from milotile.explore.plots import export_thumbnails, plot_all, spaced_points

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=300, d=16)
    a = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=300)
    res = plot_all(a, tmp_path / "plots", per_cluster=4)
    assert set(res) == {"map", "clusters", "gallery"}
    for p in res.values():
        im = Image.open(p)
        assert im.size[0] > 300 and np.asarray(im.convert("L")).std() > 10
    rows = spaced_points(a.table[["map_x", "map_y"]].to_numpy(), 5)
    assert 3 <= len(rows) <= 25 and len(set(rows)) == len(rows)
    assert export_thumbnails(a, tmp_path / "imgs", block=64) == 300
    assert Image.open(tmp_path / "imgs" / "299.png").size == (64, 64)


def test_cluster_averages_are_the_mean_of_each_clusters_patches(tmp_path):
    from milotile.explore.plots import _bank, cluster_averages, read_patches

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=300, d=16)
    a = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=300)
    t, bank = a.table, _bank(a)
    for level in ("cluster", "subcluster"):
        av = cluster_averages(a, level=level)
        assert sorted(av) == sorted(t[level].unique().tolist())
        for c, g in t.groupby(level):
            np.testing.assert_allclose(av[int(c)], read_patches(bank, g["id"].to_numpy()).mean(0), rtol=1e-5, atol=1e-6)
    big = int(t["cluster"].value_counts().idxmax())
    few = cluster_averages(a, max_per=3)[big]  # a sample of 3 members: the mean of 3 of them, not of all
    members = read_patches(bank, t[t["cluster"] == big]["id"].to_numpy())
    assert not np.allclose(few, members.mean(0))
    assert few.shape == members.shape[1:]
    with pytest.raises(InputError, match="no leaf"):
        cluster_averages(a, level="leaf")


def test_colour_map_3d_is_ngff_labels(tmp_path):
    import zarr
    from ome_zarr_models import open_ome_zarr

    from milotile.explore.colormap3d import colour_map_3d, label_colors

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=120, d=16, tomograms=True, shape=(32, 64, 64))
    a = atlas(col, method="pca", n_clusters=3, overcluster=20, fit_sample=120)
    res = colour_map_3d(a, radius=3.0, slices=[10, 20])
    assert set(res) == {"tomo_a", "tomo_b"}
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    lab = np.asarray(g["tomograms/tomo_a/labels/atlas-k/0"][:])
    t = a.table[a.table["tomogram"] == "tomo_a"]
    colors = label_colors(a)
    n_cl = int(a.table["cluster"].max()) + 1
    for _, r in t.iloc[:10].iterrows():  # each candidate centre carries a cluster label (last painted wins)
        v = lab[int(round(r.z)), int(round(r.y)), int(round(r.x))]
        assert 1 <= v <= n_cl + 1
    row = t.iloc[0]
    assert lab[int(round(row.z)), int(round(row.y)), int(round(row.x)) + 6] in (0, *range(1, n_cl + 2))
    assert lab.any() and (lab == 0).mean() > 0.3
    ome = dict(g["tomograms/tomo_a/labels/atlas-k"].attrs)["ome"]
    assert ome["image-label"]["source"] == {"image": "../../"}
    assert {c["label-value"] for c in ome["image-label"]["colors"]} == set(colors)
    open_ome_zarr(g["tomograms/tomo_a/labels/atlas-k"])  # validates against the NGFF 0.5 schema
    assert len(res["tomo_a"]["slices"]) == 2


def _get(url, data=None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read(), r.headers


def test_app_http_api_select_export_download(tmp_path):
    import hashlib
    import io

    import starfile

    from milotile.explore.serve import make_server
    from milotile.store import open_collection

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=400, d=16, tomograms=True)
    a = atlas(col, method="pca", n_clusters=3, overcluster=20, fit_sample=400)
    assert (tmp_path / "s.zarr" / "runs" / "zarr.json").is_file()  # the atlas run folder sits in a marked runs/
    srv = make_server(load_atlas(open_collection(col.url, mode="r")), port=0)  # as `explore serve`: read-only

    def digest():
        return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in (tmp_path / "s.zarr").rglob("*") if p.is_file()}

    before = digest()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        assert b"<canvas" in _get(base + "/")[0] and b"webgl2" in _get(base + "/static/app.js")[0]
        meta = json.loads(_get(base + "/api/meta")[0])
        assert meta["n"] == 400 and meta["thumbnails"] and sum(c["count"] for c in meta["clusters"]) == 400
        pts = np.frombuffer(_get(base + "/api/points.bin")[0], np.float32).reshape(-1, 3)
        np.testing.assert_allclose(pts[:, :2], a.table[["map_x", "map_y"]].to_numpy())
        assert (pts[:, 2] == a.table["cluster"].to_numpy() + 1).all()
        png, h = _get(base + "/thumb/7.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and h["Content-Type"] == "image/png"
        near = json.loads(_get(f"{base}/api/nearest?x={pts[5, 0]}&y={pts[5, 1]}&r=0.001")[0])
        assert near["id"] == 5 or np.allclose(pts[near["id"], :2], pts[5, :2])
        x0, x1 = np.quantile(pts[:, 0], [0.2, 0.8])
        y0, y1 = np.quantile(pts[:, 1], [0.1, 0.9])
        poly = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        info = json.loads(_get(base + "/api/select", {"polygon": poly, "clusters": [0, 1, -1]})[0])
        ids = np.frombuffer(_get(f"{base}/api/selection/{info['selection']}.bin")[0], np.uint32)
        t = a.table
        want = t[(t.map_x.between(x0, x1)) & (t.map_y.between(y0, y1)) & t.cluster.isin([0, 1, -1])]["id"].to_numpy()
        assert info["n"] == len(want) > 0 and (np.sort(ids) == np.sort(want)).all()
        assert sum(info["per_tomogram"].values()) == info["n"]
        assert digest() == before  # serving, thumbnails and selections write nothing into the store
        out = json.loads(_get(base + "/api/export", {"selection": info["selection"], "name": "pick-a"})[0])
        assert out["n"] == len(want)
        stored = col.read_table("labels-pick-a")
        assert (np.sort(stored["id"]) == np.sort(want)).all()
        assert col.table_params("labels-pick-a")["polygon"] == poly
        pq_bytes = _get(base + out["downloads"]["parquet"])[0]
        assert len(pd.read_parquet(io.BytesIO(pq_bytes))) == len(want)
        tsv = _get(base + out["downloads"]["tsv"])[0].decode()
        assert tsv.startswith("image_name\tx_coord\ty_coord\tz_coord") and tsv.count("\n") == len(want) + 1
        star = _get(base + out["downloads"]["star"])[0]
        (tmp_path / "p.star").write_bytes(star)
        assert len(starfile.read(tmp_path / "p.star")) == len(want)
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "/api/export", {"selection": "nope", "name": "x"})
        assert e.value.code == 400
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "/static/../app.py")
        assert e.value.code == 404
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_atlas_select_and_errors(tmp_path, capsys):
    from milotile.cli import main

    write_embedding_store(tmp_path / "s.zarr", n=300, d=16, tomograms=True)
    store = str(tmp_path / "s.zarr")
    rc = main(["--workers", "1", "--threads-per-worker", "1", "explore", "atlas", store, "--method", "pca",
               "--n-clusters", "3", "--overcluster", "20", "--slices", "10"])
    assert rc == 0
    assert (tmp_path / "s.zarr" / "runs" / "atlas-k" / "plots" / "gallery.png").exists()
    assert (tmp_path / "s.zarr" / "runs" / "atlas-k" / "colormap3d" / "tomo_a_z0010.png").exists()
    assert main(["explore", "select", store, "--clusters", "1", "--tsv", str(tmp_path / "c1.tsv")]) == 0
    assert (tmp_path / "c1.tsv").read_text().startswith("image_name")
    assert main(["explore", "select", store, "--clusters", "42"]) == 2
    assert "no cluster 42" in capsys.readouterr().err
    assert main(["explore", "serve", store, "--key", "nope"]) == 2


def test_knn_transform_places_new_points_with_their_group(tmp_path):
    from scipy.spatial import cKDTree

    from milotile.explore.atlas import knn_interpolate

    anchors = np.eye(4, dtype=np.float32)
    xy = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], float)
    np.testing.assert_allclose(knn_interpolate(anchors, anchors, xy, k=3), xy, atol=1e-4)

    class ExactIndex:  # an index over the anchors, as UMAP's pynndescent one (query -> indices, distances)
        def __init__(self, a):
            self.tree = cKDTree(a)

        def query(self, q, k):
            d, j = self.tree.query(q, k=k)
            return j, d

    rng = np.random.default_rng(0)
    many, q = rng.normal(size=(300, 5)).astype(np.float32), rng.normal(size=(50, 5)).astype(np.float32)
    many_xy = rng.uniform(size=(300, 2))
    np.testing.assert_allclose(knn_interpolate(q, many, many_xy, k=10, index=ExactIndex(many)),
                               knn_interpolate(q, many, many_xy, k=10), atol=1e-4)
    col, sp = write_embedding_store(tmp_path / "s.zarr", n=1000, d=16, bank=False)
    a = atlas(col, method="tsne", transform="knn", n_clusters=3, overcluster=30, fit_sample=400, neighbors=15)
    t = a.table
    assert a.params["params"]["transform"] == "knn"
    sample = np.zeros(len(t), bool)
    sample[np.sort(np.random.default_rng(42).choice(len(t), 400, replace=False))] = True
    _, j = cKDTree(t.loc[sample, ["map_x", "map_y"]].to_numpy()).query(t.loc[~sample, ["map_x", "map_y"]].to_numpy())
    assert (sp[sample][j] == sp[~sample]).mean() > 0.95


def test_app_thumbnail_of_a_tilt_halves_bank_shows_tilt_sum_and_slice(tmp_path):
    """A 2d3d halves bank holds 3 channels (even tilts, odd tilts, slice); the gallery shows what the model sees."""
    import io

    from PIL import Image

    from milotile.explore.serve.app import AtlasApp

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=60, d=8, bank=False)
    rng = np.random.default_rng(0)
    data = rng.random((60, 1, 3, 16, 16)).astype(np.float32)
    pg = col.zarr_group.require_group("patches").require_group("k")
    pg.create_array("data", shape=data.shape, chunks=(60, 1, 3, 16, 16), dtype="float32")[:] = data
    pg.attrs["milotile"] = {"complete": True, "params": {"bbox": 16, "shifts": [], "modes": ["tilthalves", "slice"]}}
    a = atlas(col, method="pca", n_clusters=2, overcluster=6, fit_sample=60)
    png = AtlasApp(a, thumb_px=32).thumbnail(3)
    img = Image.open(io.BytesIO(png))
    assert img.size == (2 * 32, 32)  # two panels (tilt sum, slice), not three


def test_subclusters_nest_in_clusters_and_can_be_selected(tmp_path):
    """Two-level atlas: each point's sub-cluster is its k-means over-cluster, which lies inside one cluster;
    ``select(subclusters=...)`` takes exactly their points, and unassigned points have neither level."""
    col, sp = write_embedding_store(tmp_path / "s.zarr", n=600, d=16, species=3)
    a = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=400, chunk_rows=128)
    t = a.table
    ok = t["cluster"] >= 0
    assert ((t["subcluster"] >= 0) == ok).all()
    assert t.loc[ok, "subcluster"].nunique() > 3 * t.loc[ok, "cluster"].nunique()
    assert (t[ok].groupby("subcluster")["cluster"].nunique() == 1).all()  # a sub-cluster never straddles clusters
    subs = sorted(t.loc[ok, "subcluster"].unique()[:2].tolist())
    labels = select(col, subclusters=subs, interactive_info=False)
    want = t[t["subcluster"].isin(subs)]
    assert (labels["id"].to_numpy() == want["id"].to_numpy()).all()
    assert col.table_params(f"labels-subclusters-{subs[0]}-{subs[1]}")["subclusters"] == subs
    with pytest.raises(InputError, match="no subcluster 999"):
        select(col, subclusters=[999])
