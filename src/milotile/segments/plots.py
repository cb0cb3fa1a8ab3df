"""Plots of a clustering: feature scatter, a 2-D map (UMAP or PCA) and a gallery of crops per cluster.

UMAP (umap-learn) compiles with numba on first use in a process (tens of seconds, more above 4096
rows; ``reference/environment.md`` §5), so ``method="auto"`` uses UMAP up to
:data:`UMAP_AUTO_MAX` objects and PCA above; ``method="umap"`` forces it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["scatter", "embedding_2d", "map_2d", "gallery", "plot_clusters", "UMAP_AUTO_MAX"]

UMAP_AUTO_MAX = 4000


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _colors(clusters: np.ndarray) -> list[Any]:
    from matplotlib import colormaps

    cm = colormaps["tab20"]
    return [(0.5, 0.5, 0.5, 1.0) if c < 0 else cm(int(c) % 20) for c in clusters]


def scatter(table: pd.DataFrame, x: str, y: str, path: str | os.PathLike[str], *, logx: bool = True,
            logy: bool = False) -> Path:
    """Scatter of two feature columns coloured by ``cluster``."""
    for c in (x, y, "cluster"):
        if c not in table:
            raise InputError(f"the cluster table has no column {c!r}.")
    fig = _figure(5.5, 4.5)
    ax = fig.subplots()
    ax.scatter(table[x], table[y], c=_colors(table["cluster"].to_numpy()), s=8, linewidths=0)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{len(table)} objects, {len(np.unique(table['cluster']))} clusters")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    return p


def embedding_2d(X: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``X`` by UMAP or PCA; returns them and the method used."""
    if method not in ("auto", "umap", "pca"):
        raise InputError(f"unknown 2-D map {method!r}; use auto, umap or pca.")
    if method == "auto":
        method = "umap" if 10 < len(X) <= UMAP_AUTO_MAX else "pca"
    if method == "umap":
        import umap

        nn = max(2, min(15, len(X) - 1))
        return umap.UMAP(n_neighbors=nn, min_dist=0.2, random_state=seed, n_jobs=1).fit_transform(X), "umap"
    from sklearn.decomposition import PCA

    k = min(2, X.shape[1], len(X))
    xy = PCA(n_components=k, random_state=seed).fit_transform(X)
    if xy.shape[1] < 2:
        xy = np.hstack([xy, np.zeros((len(xy), 2 - xy.shape[1]))])
    return xy, "pca"


def map_2d(X: np.ndarray, clusters: np.ndarray, path: str | os.PathLike[str], *, method: str = "auto",
           classes: Sequence[Any] | None = None, seed: int = 0) -> Path:
    """UMAP/PCA map of the feature rows coloured by cluster (and by class beside it when given)."""
    xy, used = embedding_2d(X, method, seed)
    panels = 2 if classes is not None else 1
    fig = _figure(5 * panels, 4.5)
    axes = np.atleast_1d(fig.subplots(1, panels))
    axes[0].scatter(xy[:, 0], xy[:, 1], c=_colors(clusters), s=8, linewidths=0)
    axes[0].set_title(f"{used.upper()} coloured by cluster")
    if classes is not None:
        codes = pd.factorize(pd.Series(list(classes)))[0]
        axes[1].scatter(xy[:, 0], xy[:, 1], c=_colors(codes), s=8, linewidths=0)
        axes[1].set_title(f"{used.upper()} coloured by class")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    return p


def gallery(crops: Any, rows: np.ndarray, clusters: np.ndarray, path: str | os.PathLike[str], *,
            per_cluster: int = 8, seed: int = 0) -> Path:
    """Maximum projections (along z) of up to ``per_cluster`` shape cubes of every cluster, one row each."""
    rng = np.random.default_rng(seed)
    labs = sorted(np.unique(clusters))
    fig = _figure(1.1 * per_cluster + 0.8, 1.1 * len(labs) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(labs), per_cluster, squeeze=False))
    for i, c in enumerate(labs):
        members = rows[clusters == c]
        pick = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        for j in range(per_cluster):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(pick):
                ax.imshow(np.asarray(crops[int(pick[j])]).max(axis=0), cmap="gray", vmin=0, vmax=255)
            elif j:
                ax.set_axis_off()
        axes[i, 0].set_ylabel("noise" if c < 0 else f"cluster {c}", fontsize=8)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=90)
    return p


def plot_clusters(store: Any, out: str | os.PathLike[str] | None = None, *, name: str | None = None,
                  method: str = "auto", seed: int = 0) -> dict[str, Path]:
    """Write ``scatter.png``, ``map.png`` and ``gallery.png`` for the last clustering of a volume.

    Returns
    -------
    dict
        Plot name -> path (default folder ``<store>/plots/segments-<name>``).
    """
    from milotile.segments.cluster import feature_matrix
    from milotile.segments.features import FEATURES_TABLE
    from milotile.segments.volume import open_segments, read_rows

    vol = open_segments(store, name)
    col = vol.collection
    table = read_rows(col, "segment-clusters", vol.name)
    params = col.table_params("segment-clusters")
    out = Path(out) if out is not None else Path(col.path) / "plots" / f"segments-{vol.name}"
    feats = read_rows(col, FEATURES_TABLE, vol.name)
    merged = table[["id", "cluster"]].merge(feats, on="id", how="left")
    res = {"scatter": scatter(merged, "volume", "sphericity", out / "scatter.png")}
    _, X, _ = feature_matrix(col, vol.name, params["features"], params["weights"])
    res["map"] = map_2d(X, table["cluster"].to_numpy(), out / "map.png", method=method,
                        classes=table["class"].tolist() if "class" in table else None, seed=seed)
    if "crops" in vol.group:
        res["gallery"] = gallery(vol.group["crops"], merged["row"].to_numpy(), merged["cluster"].to_numpy(),
                                 out / "gallery.png", seed=seed)
    log.info("plots in %s: %s", out, ", ".join(sorted(res)))
    return res
