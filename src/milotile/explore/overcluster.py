"""Over-clustering of embeddings on CPU, as MiLoPYP's ``plot_2d.py`` does it, but scalable.

``spectral`` (MiLoPYP's recipe): k-means to many centroids (default 256) fitted on a sample, every
point assigned to its nearest centroid in row blocks, then spectral clustering of the centroids into
``n_clusters`` groups; a point inherits its centroid's group. Points far from their centroid
(distance z-score above ``outlier_z`` within that centroid's members) are "unassigned" (``-1``), as
nextPYP's ``--z_thresh`` does. ``hdbscan``: :class:`sklearn.cluster.HDBSCAN` on the 2D map of the
sample; other points take the label of their nearest sample point; noise is ``-1``.

Everything here is numpy + scikit-learn (no faiss, no GPU): k-means cost is O(sample · k · d) and
the assignment is a blocked matrix product, so 10⁶–10⁷ points need only one block in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["UNASSIGNED", "OverClusters", "fit_overclusters", "assign_centroids", "hdbscan_labels",
           "hdbscan_embedding_labels"]

#: cluster id of outliers / noise
UNASSIGNED = -1


@dataclass
class OverClusters:
    """A fitted over-clustering: k-means centroids and the group of each centroid.

    Attributes
    ----------
    centroids : numpy.ndarray
        ``(k, d)`` float32 k-means centroids.
    groups : numpy.ndarray
        ``(k,)`` int: the spectral cluster of each centroid.
    dist_mean, dist_std : numpy.ndarray
        ``(k,)`` mean and std of member distances to each centroid (for outlier z-scores).
    outlier_z : float or None
        Distance z-score above which a point is unassigned (``None``: never).
    """

    centroids: np.ndarray
    groups: np.ndarray
    dist_mean: np.ndarray
    dist_std: np.ndarray
    outlier_z: float | None = None

    def predict(self, x: np.ndarray, block: int = 65536) -> np.ndarray:
        """Cluster id per row of ``x`` (``-1`` for outliers), computed block by block."""
        return self.predict_levels(x, block)[0]

    def predict_levels(self, x: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """Cluster id and sub-cluster id (the nearest k-means centroid) per row of ``x``; ``-1`` in both for
        outliers."""
        near, dist = assign_centroids(x, self.centroids, block=block)
        labels = self.groups[near].astype(np.int32)
        sub = near.astype(np.int32)
        if self.outlier_z is not None:
            z = (dist - self.dist_mean[near]) / np.maximum(self.dist_std[near], 1e-12)
            labels[z > self.outlier_z] = UNASSIGNED
            sub[z > self.outlier_z] = UNASSIGNED
        return labels, sub


def assign_centroids(x: np.ndarray, centroids: np.ndarray, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and its Euclidean distance for every row of ``x`` (blocked, float32)."""
    c = np.asarray(centroids, np.float32)
    c2 = np.einsum("ij,ij->i", c, c)
    near = np.empty(len(x), np.int64)
    dist = np.empty(len(x), np.float32)
    for s in range(0, len(x), block):
        xb = np.asarray(x[s : s + block], np.float32)
        d2 = c2[None, :] - 2.0 * (xb @ c.T)
        j = np.argmin(d2, axis=1)
        near[s : s + len(xb)] = j
        best = d2[np.arange(len(xb)), j] + np.einsum("ij,ij->i", xb, xb)
        dist[s : s + len(xb)] = np.sqrt(np.maximum(best, 0.0))
    return near, dist


def fit_overclusters(
    sample: np.ndarray,
    n_clusters: int = 48,
    overcluster: int = 256,
    *,
    outlier_z: float | None = 3.0,
    seed: int = 0,
) -> OverClusters:
    """Fit k-means (``overcluster`` centroids) on ``sample`` and spectral-cluster the centroids.

    Parameters
    ----------
    sample : numpy.ndarray
        ``(n, d)`` features of the fitting sample.
    n_clusters : int
        Final number of clusters (MiLoPYP's ``--n_cluster``).
    overcluster : int
        k-means centroids (MiLoPYP: 256); reduced to the sample size when larger.
    outlier_z : float or None
        Distance z-score above which a point is unassigned.
    seed : int
        Random seed of k-means and spectral clustering.

    Returns
    -------
    OverClusters
    """
    from sklearn.cluster import KMeans, SpectralClustering

    n = len(sample)
    if n_clusters < 1 or overcluster < 1:
        raise InputError(f"n_clusters and overcluster must be positive, got {n_clusters} and {overcluster}.")
    if n < n_clusters:
        raise InputError(f"{n} embeddings cannot make {n_clusters} clusters; lower --n-clusters.")
    k = int(min(overcluster, n))
    k = max(k, n_clusters)
    km = KMeans(n_clusters=k, n_init=1, max_iter=300, random_state=seed).fit(np.asarray(sample, np.float32))
    centroids = km.cluster_centers_.astype(np.float32)
    if n_clusters >= k:
        groups = np.arange(k)
    elif n_clusters == 1:
        groups = np.zeros(k, np.int64)
    else:
        n_neighbors = int(min(max(10, k // 10), k - 1))
        sc = SpectralClustering(
            n_clusters=n_clusters, assign_labels="discretize", random_state=seed,
            affinity="nearest_neighbors", n_neighbors=n_neighbors,
        )
        groups = sc.fit_predict(centroids)
    groups = _relabel_by_size(groups, km.labels_)
    near, dist = assign_centroids(sample, centroids)
    dmean = np.zeros(k, np.float32)
    dstd = np.zeros(k, np.float32)
    for j in range(k):
        d = dist[near == j]
        if len(d):
            dmean[j], dstd[j] = d.mean(), d.std()
    log.info("over-clustering: %d k-means centroids -> %d clusters", k, len(np.unique(groups)))
    return OverClusters(centroids, groups.astype(np.int64), dmean, dstd, outlier_z)


def _relabel_by_size(groups: np.ndarray, point_centroid: np.ndarray) -> np.ndarray:
    """Renumber groups 0..m-1 by decreasing number of sample points (stable, deterministic ids)."""
    return _size_rank(np.bincount(groups[point_centroid], minlength=int(groups.max()) + 1))[groups]


def _size_rank(sizes: np.ndarray) -> np.ndarray:
    """New id of each old id: 0 for the largest group, 1 for the next (ties keep their order)."""
    order = np.argsort(-sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank


def hdbscan_labels(
    map_sample: np.ndarray,
    map_all: np.ndarray,
    sample_index: np.ndarray,
    *,
    min_cluster_size: int | None = None,
) -> np.ndarray:
    """HDBSCAN on the sample's 2D map; the rest take their nearest sample point's label.

    Noise points (and points whose nearest sample point is noise) are ``-1``. Cluster ids are
    renumbered by decreasing size.
    """
    from scipy.spatial import cKDTree
    from sklearn.cluster import HDBSCAN

    n = len(map_sample)
    mcs = int(min_cluster_size or max(5, n // 200))
    lab = HDBSCAN(min_cluster_size=mcs, copy=True).fit_predict(np.asarray(map_sample, np.float64))
    out = np.full(len(map_all), UNASSIGNED, np.int32)
    rest = np.ones(len(map_all), bool)
    rest[sample_index] = False
    out[sample_index] = lab
    if rest.any():
        _, j = cKDTree(map_sample).query(map_all[rest], k=1)
        out[rest] = lab[j]
    ok = out >= 0
    if ok.any():
        out[ok] = _size_rank(np.bincount(out[ok]))[out[ok]]
    log.info("HDBSCAN (min_cluster_size %d): %d clusters, %d unassigned", mcs, int(out.max()) + 1, int((~ok).sum()))
    return out


def hdbscan_embedding_labels(
    feats: np.ndarray,
    *,
    min_cluster_size: int | None = None,
    dims: int | None = 10,
    seed: int = 0,
) -> np.ndarray:
    """HDBSCAN in the embedding space (prepared features, optionally PCA-reduced to ``dims``), not on the map.

    Dense groups of candidates become clusters; the diffuse rest (background of every kind) is noise
    (``-1``), so it cannot dilute a cluster. Cluster ids are renumbered by decreasing size.
    """
    from sklearn.cluster import HDBSCAN

    x = np.asarray(feats, np.float32)
    if dims is not None and x.shape[1] > dims and len(x) > dims:
        from sklearn.decomposition import PCA

        x = PCA(int(dims), random_state=seed).fit_transform(x)
    mcs = int(min_cluster_size or max(5, len(x) // 200))
    lab = HDBSCAN(min_cluster_size=mcs, copy=True).fit_predict(np.asarray(x, np.float64)).astype(np.int32)
    ok = lab >= 0
    if ok.any():
        lab[ok] = _size_rank(np.bincount(lab[ok]))[lab[ok]]
    log.info("HDBSCAN in %d dims (min_cluster_size %d): %d clusters, %d noise", x.shape[1], mcs,
             int(lab.max()) + 1, int((~ok).sum()))
    return lab
