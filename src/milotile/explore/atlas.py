"""The exploration atlas: a 2D map of every embedded candidate, over-clusters and colours.

``atlas(col, key)`` reads ``embeddings/<key>`` (N × D, written by ``explore embed``) and

1. prepares features (row L2 normalisation, then PCA to ``pca`` dimensions when D is larger),
   fitted on a random sample of ``fit_sample`` rows;
2. fits the 2D projection on that sample — UMAP (umap-learn), t-SNE (openTSNE, whose
   ``TSNEEmbedding.transform`` places new points into a fixed map) or PCA (linear, no compile) —
   and the over-clustering (:mod:`milotile.explore.overcluster`);
3. projects and assigns every other row block by block, as tasks on the Dask workers when a
   client is running (the fitted reducer is scattered once), so memory stays bounded by the
   sample plus one block per worker;
4. colours each point from a 2D colormap of its map position and each cluster from a palette;
5. writes ``tables/atlas-<key>.parquet`` (``id, tomogram, x, y, z, map_x, map_y, cluster, subcluster,
   color, cluster_color`` + the candidate's other columns) with the parameters, and the fitted
   reducer to ``runs/atlas-<key>/reducer.pkl``. A second call with the same parameters on the same
   embeddings reuses them.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import pickle
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import zarr

from milotile.errors import InputError
from milotile.explore.colors import UNASSIGNED_RGB, cluster_palette, colormap_2d, to_hex
from milotile.explore.overcluster import UNASSIGNED, OverClusters, fit_overclusters, hdbscan_labels
from milotile.runtime import active_client
from milotile.store import as_collection, missing_input
from milotile.store.stage_output import canonical

log = logging.getLogger(__name__)

__all__ = ["Atlas", "atlas", "load_atlas", "METHODS", "CLUSTER_METHODS", "embedding_keys"]

METHODS = ("umap", "tsne", "pca")
CLUSTER_METHODS = ("spectral", "hdbscan")
EMBEDDINGS = "embeddings"


@dataclass
class Reducer:
    """Everything fitted on the sample: feature preparation, 2D projection, over-clusters."""

    method: str
    pca: Any | None
    projector: Any
    lo: np.ndarray
    hi: np.ndarray
    overclusters: OverClusters | None
    transform: str = "model"
    anchors: np.ndarray | None = None  # sample features (``transform="knn"``)
    anchor_xy: np.ndarray | None = None  # their fitted map positions
    k: int = 10

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Row-L2-normalised (and PCA-reduced) float32 features."""
        x = np.asarray(x, np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self.pca is not None:
            x = self.pca.transform(x).astype(np.float32)
        return x

    def project(self, feats: np.ndarray) -> np.ndarray:
        """Map positions (normalised so the sample spans ``[0, 1]²``) of prepared features."""
        if self.transform == "knn" and self.method != "pca":
            raw = knn_interpolate(feats, self.anchors, self.anchor_xy, self.k, index=_nn_index(self.projector))
        else:
            raw = np.asarray(self.projector.transform(feats))
        return ((np.asarray(raw, np.float64) - self.lo) / (self.hi - self.lo)).astype(np.float32)


def _nn_index(projector: Any) -> Any | None:
    """The nearest-neighbour search index UMAP built on the sample while fitting (pynndescent), if any.

    Querying it finds the k nearest sample rows in O(log n) instead of comparing with every sample row:
    the exact search costs ``n_rest × n_sample`` distances (minutes for 8·10⁵ rows against a 2·10⁵ sample
    on 2 cores). ``None`` for other projections and small samples (UMAP then keeps no index).
    """
    index = getattr(projector, "_knn_search_index", None)
    return index if index is not None and hasattr(index, "query") else None


def knn_interpolate(x: np.ndarray, anchors: np.ndarray, anchor_xy: np.ndarray, k: int = 10,
                    block_bytes: int = 64 * 2**20, index: Any | None = None) -> np.ndarray:
    """Map positions of ``x`` as the inverse-distance-weighted mean of its ``k`` nearest anchors' positions.

    Exact nearest neighbours by blocked matrix products (no index, no numba): the fast alternative to
    the projection model's own ``transform`` (UMAP's optimisation / openTSNE's gradient steps start
    from this very placement). The distance block is kept under ``block_bytes``. With ``index`` (a
    search index over ``anchors`` with ``query(x, k) -> (indices, distances)``, e.g. the one UMAP built
    while fitting), the neighbours come from the index instead: approximate, and far faster for large
    anchor sets.
    """
    if index is not None:
        k = int(min(k, len(anchor_xy)))
        j, d = index.query(np.asarray(x, np.float32), k=k)
        w = 1.0 / (np.asarray(d, np.float64) + 1e-6)
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkc->nc", w, np.asarray(anchor_xy, np.float64)[j])
    a = np.asarray(anchors, np.float32)
    block = max(16, int(block_bytes // (4 * max(len(a), 1))))
    a2 = np.einsum("ij,ij->i", a, a)
    k = int(min(k, len(a)))
    out = np.empty((len(x), 2), np.float64)
    for s in range(0, len(x), block):
        xb = np.asarray(x[s : s + block], np.float32)
        d2 = a2[None, :] - 2.0 * (xb @ a.T) + np.einsum("ij,ij->i", xb, xb)[:, None]
        j = np.argpartition(d2, k - 1, axis=1)[:, :k]
        d = np.sqrt(np.maximum(np.take_along_axis(d2, j, axis=1), 0.0))
        w = 1.0 / (d + 1e-6)
        w /= w.sum(axis=1, keepdims=True)
        out[s : s + len(xb)] = np.einsum("nk,nkc->nc", w, anchor_xy[j])
    return out


@dataclass
class Atlas:
    """An atlas stored in a collection (``tables/atlas-<key>`` + ``runs/atlas-<key>/``)."""

    collection: Any
    key: str
    table: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def table_name(self) -> str:
        """``atlas-<key>``."""
        return f"atlas-{self.key}"

    @property
    def run_dir(self) -> str:
        """Folder (in the store) with the reducer, parameters and plots."""
        return self.collection._join("runs", f"atlas-{self.key}")

    @property
    def bank_key(self) -> str | None:
        """The patch bank the embeddings were computed from."""
        return self.params.get("params", {}).get("embeddings", {}).get("bank")

    def reducer(self) -> Reducer:
        """The fitted reducer (unpickled from ``runs/atlas-<key>/reducer.pkl``)."""
        with self.collection.fs.open(self.collection._join("runs", f"atlas-{self.key}", "reducer.pkl"), "rb") as fh:
            return pickle.load(fh)

    def clusters(self) -> pd.DataFrame:
        """One row per cluster: ``cluster, count, color`` (``-1`` = unassigned)."""
        t = self.table
        g = t.groupby("cluster").agg(count=("id", "size"), color=("cluster_color", "first")).reset_index()
        return g.sort_values("cluster").reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.table)


def embedding_keys(col: Any) -> list[str]:
    """Keys of complete embeddings in ``col``."""
    g = col.zarr_group
    if EMBEDDINGS not in g:
        return []
    return sorted(
        k for k, node in g[EMBEDDINGS].members()
        if isinstance(node, zarr.Array) and dict(node.attrs.get("milotile", {})).get("complete")
    )


def _resolve_key(col: Any, key: str | None) -> str:
    keys = embedding_keys(col)
    if not keys:
        raise missing_input(col.url, "embeddings", "embeddings")
    if key is None:
        if len(keys) != 1:
            raise InputError(f"store {col.url} holds embeddings {keys}; choose one with --key.")
        return keys[0]
    if key not in keys:
        raise InputError(f"store {col.url} has no embeddings {key!r}; available: {', '.join(keys)} "
                         "(`milotile explore embed` makes them).")
    return key


def load_atlas(col: Any, key: str | None = None) -> Atlas:
    """Open the atlas of embeddings ``key`` stored in ``col``."""
    col = as_collection(col)
    if key is None:
        names = [t[len("atlas-"):] for t in col.tables() if t.startswith("atlas-")]
        if not names:
            raise missing_input(col.url, "atlas", "atlas")
        if len(names) != 1:
            raise InputError(f"store {col.url} holds atlases {names}; choose one with --key.")
        key = names[0]
    name = f"atlas-{key}"
    if not col.has_table(name):
        raise missing_input(col.url, name, "atlas")
    return Atlas(col, key, col.read_table(name), col.table_params(name))


def _read_rows(arr: zarr.Array, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (sorted) of a 2D zarr array, read chunk by chunk."""
    out = np.empty((len(idx), arr.shape[1]), np.float32)
    step = int(arr.chunks[0])
    pos = 0
    for s in range(0, arr.shape[0], step):
        sel = idx[(idx >= s) & (idx < s + step)]
        if len(sel):
            block = np.asarray(arr[s : s + step], np.float32)
            out[pos : pos + len(sel)] = block[sel - s]
            pos += len(sel)
    return out


def _fit_projection(method: str, feats: np.ndarray, neighbors: int, min_dist: float, seed: int | None) -> tuple[Any, np.ndarray]:
    """Fit the 2D projection on the sample; returns ``(projector, sample_map)``."""
    n = len(feats)
    if method == "umap":
        import umap

        nn = int(max(2, min(neighbors, n - 1)))
        proj = umap.UMAP(n_neighbors=nn, min_dist=min_dist, random_state=seed, transform_seed=seed or 42)
        xy = proj.fit_transform(feats)
    elif method == "tsne":
        try:
            from openTSNE import TSNE
        except ImportError:
            raise InputError("method 'tsne' needs openTSNE; install it with `pip install milotile[tsne]`.") from None
        perplexity = float(max(2, min(neighbors, (n - 1) / 3)))
        proj = TSNE(perplexity=perplexity, random_state=seed, n_jobs=1, verbose=False).fit(feats)
        xy = np.asarray(proj)
    else:
        from sklearn.decomposition import PCA

        proj = PCA(n_components=2, random_state=seed).fit(feats)
        xy = proj.transform(feats)
    return proj, np.asarray(xy, np.float64)


def _block_task(
    url: str, so: dict, path: str, start: int, stop: int, skip: np.ndarray, reducer: Reducer, with_clusters: bool,
) -> tuple[int, np.ndarray, np.ndarray]:
    """Project (and assign) rows ``start:stop`` except the sample rows ``skip`` (one task)."""
    arr = zarr.open_array(url, path=path, mode="r", storage_options=so or None)
    x = np.asarray(arr[start:stop], np.float32)
    keep = np.ones(len(x), bool)
    keep[skip - start] = False
    feats = reducer.prepare(x[keep])
    xy = np.full((len(x), 2), np.nan, np.float32)
    lab = np.full((len(x), 2), UNASSIGNED, np.int32)
    if keep.any():
        xy[keep] = reducer.project(feats)
        if with_clusters and reducer.overclusters is not None:
            lab[keep] = np.stack(reducer.overclusters.predict_levels(feats), axis=1)
    return start, xy, lab


def _project_all(
    col: Any, key: str, n: int, sample: np.ndarray, reducer: Reducer, chunk_rows: int, with_clusters: bool,
    client: Any | None,
) -> tuple[np.ndarray, np.ndarray, str]:
    arr = col.zarr_group[EMBEDDINGS][key]
    step = max(int(arr.chunks[0]), -(-int(chunk_rows) // int(arr.chunks[0])) * int(arr.chunks[0]))
    starts = [s for s in range(0, n, step)]
    skips = [sample[(sample >= s) & (sample < s + step)] for s in starts]
    todo = [(s, min(s + step, n), sk) for s, sk in zip(starts, skips, strict=True) if len(sk) < min(s + step, n) - s]
    xy = np.full((n, 2), np.nan, np.float32)
    lab = np.full((n, 2), UNASSIGNED, np.int32)  # cluster, sub-cluster
    so = dict(getattr(col, "storage_options", {}) or {})
    path = f"{EMBEDDINGS}/{key}"
    if client is not None and todo:
        rfut = client.scatter(reducer, broadcast=True, hash=False)
        fn = functools.partial(_block_task, col.url, so, path)
        token = uuid.uuid4().hex[:8]
        futs = client.map(fn, [t[0] for t in todo], [t[1] for t in todo], [t[2] for t in todo], pure=False,
                          key=[f"atlas-{key}-{token}-{t[0]}" for t in todo], reducer=rfut,
                          with_clusters=with_clusters)
        from distributed import as_completed

        for fut in as_completed(futs):
            s, bxy, blab = fut.result()
            xy[s : s + len(bxy)] = bxy
            lab[s : s + len(blab)] = blab
            fut.release()
        where = f"{len(todo)} tasks on {len(client.scheduler_info().get('workers', {}))} workers"
    else:
        for s, e, sk in todo:
            _, bxy, blab = _block_task(col.url, so, path, s, e, sk, reducer, with_clusters)
            xy[s:e], lab[s:e] = bxy, blab
        where = f"{len(todo)} blocks in process"
    return xy, lab, where


def _get_client(client: Any | None) -> Any | None:
    if client is not None:
        return client
    return active_client()


def _params(emb_attrs: dict, n: int, **opts: Any) -> dict[str, Any]:
    return {"embeddings": {k: v for k, v in emb_attrs.items()}, "n": int(n), **opts, "version": 2}


def _sources(col: Any, key: str) -> dict[str, str | None]:
    """The atlas's input: the embeddings (their stage-output token)."""
    return {f"{EMBEDDINGS}/{key}": col.source_token(f"{EMBEDDINGS}/{key}")}


def _reusable(col: Any, key: str, params: dict[str, Any]) -> Atlas | None:
    name = f"atlas-{key}"
    if not col.has_table(name):
        return None
    old = col.table_params(name)
    if canonical(old.get("params")) != canonical(params):
        return None
    if canonical(col.table_sources(name).get("sources")) != canonical(_sources(col, key)):
        return None
    if col.output_status(f"tables/{name}") != "complete":
        return None
    if not col.fs.exists(col._join("runs", name, "reducer.pkl")):
        return None
    log.info("atlas %s is up to date; reusing it (overwrite=True recomputes)", key)
    return Atlas(col, key, col.read_table(name), old)


def atlas(
    col: Any,
    key: str | None = None,
    *,
    method: str = "umap",
    n_clusters: int = 48,
    overcluster: int = 256,
    cluster_method: str = "spectral",
    neighbors: int = 40,
    min_dist: float = 0.3,
    fit_sample: int = 50_000,
    pca: int | None = 50,
    outlier_z: float | None = 3.0,
    seed: int = 42,
    transform: str = "knn",
    chunk_rows: int = 50_000,
    client: Any | None = None,
    overwrite: bool = False,
) -> Atlas:
    """Build (or reuse) the atlas of embeddings ``key``: 2D map, clusters and colours.

    Parameters
    ----------
    col : Collection or path
        The store holding ``embeddings/<key>``.
    key : str, optional
        Embeddings key (default: the only one).
    method : {"umap", "tsne", "pca"}
        2D projection: UMAP (``neighbors``, ``min_dist``), openTSNE (perplexity ``neighbors``) or PCA.
    n_clusters : int
        Final clusters (spectral clustering of the k-means centroids).
    overcluster : int
        k-means centroids (MiLoPYP: 256). Each is a *sub-cluster* (column ``subcluster``, the centroid's
        index): the finer level of a two-level atlas. Background candidates outnumber each species, so the
        spectral merge of centroids into ``n_clusters`` mixes them into the species' clusters; a selection of
        sub-clusters is purer (``benchmarks/atlas_findable.py``).
    cluster_method : {"spectral", "hdbscan"}
        MiLoPYP's k-means + spectral recipe, or HDBSCAN on the sample's map.
    neighbors, min_dist : UMAP options (``neighbors`` is the t-SNE perplexity).
    fit_sample : int
        Rows the projection, the PCA and k-means are fitted on; the rest is transformed in blocks.
        UMAP with a seed runs on one thread, so the default (5·10⁴) keeps the seeded atlas faster than one
        unseeded, multi-threaded ``umap.UMAP().fit_transform`` of every row: at 10⁵ rows 78.8 s against
        122 s, the map's 10-NN neighbourhoods 99.5 % as faithful to the mixture as the full fit's; 10⁶ rows
        in 114 s and 1.31 GiB (``benchmarks/atlas.py``, ``results/atlas_scale_fit50k.json``).
    pca : int or None
        PCA dimensions after L2 normalisation (``None``: keep all).
    outlier_z : float or None
        Distance z-score (to the k-means centroid) above which a point is unassigned (``-1``).
    seed : int
        Random seed (sample, PCA, projection, k-means, spectral clustering).
    transform : {"knn", "model"}
        How rows outside the sample are placed: the projection's own ``transform`` (umap-learn /
        openTSNE), or ``"knn"``: inverse-distance-weighted mean of the 10 nearest sample points'
        positions (UMAP's search index finds them; the default): UMAP's transform
        cost 1.4 ms per row on 2 cores (``benchmarks/atlas.py``: 116 s for 8·10⁴ rows, more than a fit
        of all 10⁵), which would be 20 minutes for the 8·10⁵ rows outside the default sample of a
        10⁶-row collection. Up to ``fit_sample`` rows there is nothing to place: the map is one fit of
        every row. The clusters do not depend on it.
    chunk_rows : int
        Rows per transform task.
    client : distributed.Client, optional
        Default: the running client, if any; otherwise blocks run in this process.
    overwrite : bool
        Recompute even when a stored atlas has the same parameters.

    Returns
    -------
    Atlas
    """
    col = as_collection(col)
    if method not in METHODS:
        raise InputError(f"unknown atlas method {method!r}; use one of {', '.join(METHODS)}.")
    if cluster_method not in CLUSTER_METHODS:
        raise InputError(f"unknown cluster method {cluster_method!r}; use one of {', '.join(CLUSTER_METHODS)}.")
    if transform not in ("model", "knn"):
        raise InputError(f"unknown transform {transform!r}; use 'knn' or 'model'.")
    if fit_sample < 10:
        raise InputError(f"fit_sample must be at least 10, got {fit_sample}.")
    key = _resolve_key(col, key)
    arr = col.zarr_group[EMBEDDINGS][key]
    n, d = int(arr.shape[0]), int(arr.shape[1])
    emb_attrs = dict(dict(arr.attrs.get("milotile", {})).get("params", {}))
    params = _params(emb_attrs, n, method=method, n_clusters=int(n_clusters), overcluster=int(overcluster),
                     cluster_method=cluster_method, neighbors=int(neighbors), min_dist=float(min_dist),
                     fit_sample=int(fit_sample), pca=pca, outlier_z=outlier_z, seed=int(seed),
                     transform=transform)
    if not overwrite and (old := _reusable(col, key, params)) is not None:
        return old
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(int(fit_sample), n), replace=False)) if n > fit_sample else np.arange(n)
    raw = _read_rows(arr, sample)
    x = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    pca_model = None
    if pca is not None and d > pca and len(sample) > pca:
        from sklearn.decomposition import PCA

        pca_model = PCA(n_components=int(pca), random_state=seed).fit(x)
    reducer = Reducer(method, pca_model, None, np.zeros(2), np.ones(2), None)
    feats = reducer.prepare(raw)
    del raw, x
    t1 = time.perf_counter()
    reducer.projector, xy_s = _fit_projection(method, feats, neighbors, min_dist, seed)
    lo, hi = xy_s.min(axis=0), xy_s.max(axis=0)
    reducer.lo, reducer.hi = lo, np.where(hi > lo, hi, lo + 1.0)
    if transform == "knn" and len(sample) < n:
        reducer.transform, reducer.anchors, reducer.anchor_xy = "knn", feats, xy_s
    t2 = time.perf_counter()
    if cluster_method == "spectral":
        reducer.overclusters = fit_overclusters(feats, n_clusters, overcluster, outlier_z=outlier_z, seed=seed)
    t3 = time.perf_counter()
    xy, lab, where = _project_all(col, key, n, sample, reducer, chunk_rows, cluster_method == "spectral",
                                  _get_client(client))
    xy[sample] = ((xy_s - reducer.lo) / (reducer.hi - reducer.lo)).astype(np.float32)
    if cluster_method == "spectral":
        lab[sample] = np.stack(reducer.overclusters.predict_levels(feats), axis=1)
    else:  # HDBSCAN's clusters have no finer level
        lab = np.repeat(hdbscan_labels(xy[sample], xy, sample)[:, None], 2, axis=1)
    t4 = time.perf_counter()
    table = _atlas_table(col, key, n, xy, lab[:, 0], lab[:, 1])
    timings = {"prepare_s": t1 - t0, "fit_projection_s": t2 - t1, "fit_clusters_s": t3 - t2,
               "transform_s": t4 - t3, "sample": int(len(sample)), "where": where}
    _save(col, key, table, params, reducer, timings)
    log.info("atlas %s: %d points, %d clusters (%d unassigned); fit %.1f s on %d rows, rest %s in %.1f s",
             key, n, int(table["cluster"].max()) + 1, int((table["cluster"] < 0).sum()),
             t2 - t1, len(sample), where, t4 - t3)
    return Atlas(col, key, table, {"params": params, "timings": timings})


def _atlas_table(col: Any, key: str, n: int, xy: np.ndarray, lab: np.ndarray, sub: np.ndarray) -> pd.DataFrame:
    tname = f"embeddings-{key}"
    base = col.read_table(tname).reset_index(drop=True) if col.has_table(tname) else pd.DataFrame(index=range(n))
    if len(base) != n:
        raise InputError(f"table {tname!r} has {len(base)} rows but embeddings/{key} has {n}.")
    rgb = colormap_2d(xy[:, 0], xy[:, 1])
    n_cl = int(lab.max()) + 1 if (lab >= 0).any() else 0
    pal = cluster_palette(max(n_cl, 1))
    crgb = np.where((lab >= 0)[:, None], pal[np.clip(lab, 0, None)], np.asarray(UNASSIGNED_RGB, np.uint8))
    out = pd.DataFrame({"id": np.arange(n, dtype=np.int64)})
    for c in ("tomogram", "x", "y", "z"):
        if c in base.columns:
            out[c] = base[c].to_numpy()
    out["map_x"], out["map_y"] = xy[:, 0], xy[:, 1]
    out["cluster"] = lab.astype(np.int32)
    out["subcluster"] = sub.astype(np.int32)
    out["color"] = to_hex(rgb)
    out["cluster_color"] = to_hex(crgb)
    rest = [c for c in base.columns if c not in out.columns]
    for c in rest:
        out[c] = base[c].to_numpy()
    return out


def _save(col: Any, key: str, table: pd.DataFrame, params: dict, reducer: Reducer, timings: dict) -> None:
    run = col.runs_dir(f"atlas-{key}")  # the opaque runs/ node (zarr never lists its files)
    col.fs.makedirs(run, exist_ok=True)
    buf = io.BytesIO()
    pickle.dump(reducer, buf, protocol=pickle.HIGHEST_PROTOCOL)
    tmp = col._join("runs", f"atlas-{key}", "reducer.pkl.tmp")
    with col.fs.open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
    col.fs.mv(tmp, col._join("runs", f"atlas-{key}", "reducer.pkl"))
    with col.fs.open(col._join("runs", f"atlas-{key}", "params.json"), "w") as fh:
        fh.write(json.dumps({"params": params, "timings": timings}, indent=2, default=str))
    col.write_table(f"atlas-{key}", table, params={"params": params, "timings": timings}, sources=_sources(col, key))

