"""``segments cluster``: weighted multi-feature clustering of the objects, evaluated against classes.

Feature groups (``--features``) are read from the stored tables and aligned by object id (never by
row position, which misaligned EManalysis's feature files). Positive, heavy-tailed measures
(volumes, areas, lengths, scales) are log-transformed; every column is standardised; a group of
``d`` columns gets the weight ``w / sqrt(d)``, so a 32-dimensional embedding and a scalar weigh the
same at ``w = 1``. Algorithms run on these rows — never on rows of an N×N distance matrix as in
EManalysis. Dense N×N memory appears only where the algorithm itself needs it:

* ``kmeans``, ``dbscan``, ``hdbscan``: no N×N matrix (KD-tree / ball-tree neighbourhoods).
* ``spectral``: a sparse k-nearest-neighbour affinity graph (``affinity="nearest_neighbors"``).
* ``agglomerative``: Ward linkage; above :data:`AGGLO_DENSE_MAX` objects it is restricted to a
  sparse kNN connectivity graph (logged).
* ``affinity`` (affinity propagation): needs a dense N×N similarity matrix; refused above
  :data:`AFFINITY_MAX` objects with a message naming the limit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError, StoreError
from milotile.segments.features import FEATURES_TABLE
from milotile.segments.volume import open_segments, read_rows, write_rows

log = logging.getLogger(__name__)

__all__ = ["ALGORITHMS", "FEATURE_GROUPS", "LEARNED", "feature_matrix", "cluster_rows", "cluster_objects",
           "ClusterResult", "AFFINITY_MAX", "AGGLO_DENSE_MAX"]

ALGORITHMS = ("kmeans", "affinity", "spectral", "agglomerative", "dbscan", "hdbscan")
#: objects above which affinity propagation (dense N×N similarities) is refused
AFFINITY_MAX = 5000
#: objects above which Ward linkage is restricted to a kNN connectivity graph
AGGLO_DENSE_MAX = 15000

#: hand-crafted feature groups -> columns of ``tables/segment-features``
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "size": ("volume",),
    "surface": ("surface_area",),
    "sphericity": ("sphericity",),
    "circularity": ("circularity",),
    "skeleton": ("skeleton_length", "skeleton_branches", "skeleton_endpoints"),
    "axes": ("axis_major", "axis_mid", "axis_minor", "elongation", "flatness"),
    "thickness": ("thickness_max", "thickness_mean"),
    "nn": ("nn_distance",),
    "scale": ("crop_scale",),
}
#: learned feature groups (tables ``segment-<kind>``)
LEARNED = ("simsiam", "vae", "pointae")
_LOG = {"volume", "surface_area", "skeleton_length", "axis_major", "axis_mid", "axis_minor", "thickness_max",
        "thickness_mean", "nn_distance", "crop_scale", "elongation", "flatness", "skeleton_branches",
        "skeleton_endpoints"}


@dataclass
class ClusterResult:
    """Cluster labels of the objects of one volume, with the evaluation when classes are known."""

    table: pd.DataFrame
    algorithm: str
    features: list[str]
    weights: list[float]
    scores: dict[str, float] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        """Number of clusters found (noise ``-1`` not counted)."""
        c = self.table["cluster"].to_numpy()
        return int(len(np.unique(c[c >= 0])))


def _parse(features: Sequence[str] | str) -> list[str]:
    names = [f.strip() for f in (features.split(",") if isinstance(features, str) else features) if f.strip()]
    known = (*FEATURE_GROUPS, *LEARNED)
    bad = [f for f in names if f not in known]
    if bad or not names:
        raise InputError(f"unknown feature group {', '.join(bad) or '(none)'}; choose from {', '.join(known)}.")
    return names


def feature_matrix(
    col: Any, volume: str, features: Sequence[str] | str, weights: Sequence[float] | None = None
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Aligned raw feature table and the standardised, weighted matrix used for clustering.

    Returns
    -------
    raw : pandas.DataFrame
        ``id`` and the raw columns of every group, sorted by id.
    X : numpy.ndarray
        ``(N, D)`` float64 rows.
    columns : list of str
        Column names of ``X``.
    """
    names = _parse(features)
    w = [1.0] * len(names) if weights is None else [float(v) for v in weights]
    if len(w) != len(names):
        raise InputError(f"{len(w)} weights given for {len(names)} feature groups ({', '.join(names)}).")
    raw: pd.DataFrame | None = None
    blocks, cols = [], []
    for g in names:
        if g in LEARNED:
            try:
                t = read_rows(col, f"segment-{g}", volume)
            except StoreError:
                raise InputError(f"no {g} embeddings for volume {volume!r}; run `milotile segments embed --kind {g}`.") from None
            gcols = [c for c in t.columns if c.startswith(f"{g}_")]
        else:
            t = read_rows(col, FEATURES_TABLE, volume)
            gcols = list(FEATURE_GROUPS[g])
            missing = [c for c in gcols if c not in t]
            if missing:
                raise InputError(f"feature table lacks {', '.join(missing)}; rerun `milotile segments features`.")
        t = t[["id", *gcols]]
        raw = t if raw is None else raw.merge(t, on="id", how="inner")
    assert raw is not None
    raw = raw.sort_values("id").reset_index(drop=True)
    for g, wg in zip(names, w, strict=True):
        gcols = [c for c in raw.columns if c.startswith(f"{g}_")] if g in LEARNED else list(FEATURE_GROUPS[g])
        v = np.array(raw[gcols].to_numpy(np.float64), dtype=np.float64, copy=True)
        for j, c in enumerate(gcols):
            if c in _LOG:
                v[:, j] = np.log1p(np.maximum(v[:, j], 0))
        v = np.nan_to_num(v, nan=np.nanmean(v) if np.isfinite(v).any() else 0.0)
        sd = v.std(axis=0)
        v = (v - v.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        blocks.append(v * wg / np.sqrt(v.shape[1]))
        cols += gcols
    return raw, np.hstack(blocks), cols


def cluster_rows(
    X: np.ndarray, algorithm: str = "kmeans", n_clusters: int = 4, *, seed: int = 0, eps: float = 0.5,
    min_samples: int = 5, min_cluster_size: int = 10, n_neighbors: int = 10,
) -> np.ndarray:
    """Cluster the rows of ``X`` (see the module notes on memory); returns labels (``-1`` = noise)."""
    from sklearn import cluster as skc

    n = len(X)
    if algorithm not in ALGORITHMS:
        raise InputError(f"unknown clustering algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}.")
    needs_k = algorithm in ("kmeans", "spectral", "agglomerative")
    if needs_k and not (1 <= n_clusters <= n):
        raise InputError(f"--n-clusters must be between 1 and the number of objects ({n}), got {n_clusters}.")
    if algorithm == "kmeans":
        return skc.KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(X)
    if algorithm == "affinity":
        if n > AFFINITY_MAX:
            raise InputError(
                f"affinity propagation needs a dense {n}x{n} similarity matrix; it is limited to {AFFINITY_MAX} "
                "objects — use kmeans, spectral, agglomerative or hdbscan."
            )
        return skc.AffinityPropagation(random_state=seed).fit_predict(X)
    if algorithm == "spectral":
        k = max(2, min(n_neighbors, n - 1))
        return skc.SpectralClustering(n_clusters, affinity="nearest_neighbors", n_neighbors=k, random_state=seed,
                                      assign_labels="cluster_qr").fit_predict(X)
    if algorithm == "agglomerative":
        conn = None
        if n > AGGLO_DENSE_MAX:
            from sklearn.neighbors import kneighbors_graph

            log.info("agglomerative: %d objects > %d, Ward linkage on a %d-NN connectivity graph", n, AGGLO_DENSE_MAX, n_neighbors)
            conn = kneighbors_graph(X, n_neighbors, include_self=False)
        return skc.AgglomerativeClustering(n_clusters, linkage="ward", connectivity=conn).fit_predict(X)
    if algorithm == "dbscan":
        return skc.DBSCAN(eps=eps, min_samples=min_samples).fit_predict(X)
    return skc.HDBSCAN(min_cluster_size=max(2, min_cluster_size), min_samples=min_samples, copy=True).fit_predict(X)


def cluster_objects(
    store: Any,
    *,
    name: str | None = None,
    features: Sequence[str] | str = ("size", "sphericity", "skeleton", "axes"),
    weights: Sequence[float] | None = None,
    algorithm: str = "kmeans",
    n_clusters: int = 4,
    seed: int = 0,
    relabel: bool = True,
    **options: Any,
) -> ClusterResult:
    """Cluster the objects of a segment volume and write ``tables/segment-clusters`` (+ the label image).

    Parameters
    ----------
    store : Collection or path
    name : str, optional
        Segment volume.
    features : str or sequence
        Feature groups (:data:`FEATURE_GROUPS` and :data:`LEARNED`).
    weights : sequence of float, optional
        One weight per group (default 1).
    algorithm : str
        One of :data:`ALGORITHMS`.
    n_clusters : int
        For kmeans, spectral and agglomerative.
    seed : int
    relabel : bool
        Also write ``labels/clusters`` (cluster + 1 per voxel) with a colour table.
    **options
        ``eps``, ``min_samples`` (dbscan/hdbscan), ``min_cluster_size`` (hdbscan), ``n_neighbors``.

    Returns
    -------
    ClusterResult
    """
    from milotile.metrics import clustering_scores

    vol = open_segments(store, name)
    col = vol.collection
    names = _parse(features)
    raw, X, cols = feature_matrix(col, vol.name, names, weights)
    labels = np.asarray(cluster_rows(X, algorithm, n_clusters, seed=seed, **options), dtype=np.int64)
    table = raw.copy()
    table["cluster"] = labels
    objects = vol.objects()
    scores = None
    if "class" in objects:
        table = table.merge(objects[["id", "class", *(["class_name"] if "class_name" in objects else [])]], on="id", how="left")
        known = table["class"].fillna(-1).to_numpy() >= 0
        if known.any():
            scores = clustering_scores(table.loc[known, "class"].to_numpy(), labels[known])
    w = [1.0] * len(names) if weights is None else [float(v) for v in weights]
    params = {"stage": "segments-cluster", "algorithm": algorithm, "features": names, "weights": w,
              "n_clusters": n_clusters, "seed": seed, "options": options, "columns": cols, "scores": scores}
    write_rows(col, "segment-clusters", vol.name, table, params=params)
    res = ClusterResult(table, algorithm, names, w, scores, params)
    log.info("%s on %s (%d objects): %d clusters%s", algorithm, "+".join(names), len(table), res.n_clusters,
             "" if scores is None else f", ARI {scores['ari']:.3f} NMI {scores['nmi']:.3f} acc {scores['accuracy']:.3f}")
    if relabel:
        from milotile.segments.relabel import write_cluster_labels

        write_cluster_labels(vol, table["id"].to_numpy(np.uint64), labels)
    return res
