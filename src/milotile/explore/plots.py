"""Atlas plots (matplotlib PNG): the map with spaced thumbnails, the cluster map, a cluster gallery led by each
cluster's class average.

Thumbnails are cut from the patch bank on demand (only the rows shown are read). Spacing uses a
grid over the map (one thumbnail per occupied cell, the point nearest the cell centre), which is
O(N) instead of MiLoPYP's greedy all-pairs walk. ``export_thumbnails`` writes one PNG per candidate
only when asked (``--export-thumbnails``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["read_patches", "spaced_points", "plot_map", "plot_clusters", "cluster_averages", "plot_gallery", "plot_all",
           "export_thumbnails", "patch_png"]


def _bank(atlas: Any) -> Any | None:
    from milotile.explore.data import open_bank

    try:
        return open_bank(atlas.collection, atlas.bank_key)
    except InputError as exc:
        log.warning("atlas plots without thumbnails: %s", exc)
        return None


def read_patches(bank: Any, rows: np.ndarray) -> np.ndarray:
    """Patches ``(n, b, b)`` (shift 0, channel 0 for 3d, the slice channel for 2d3d) of ``rows``."""
    rows = np.asarray(rows, np.int64)
    if not len(rows):
        return np.zeros((0, bank.bbox, bank.bbox), np.float32)
    order = np.argsort(rows)
    ch = bank.channels - 1
    data = np.asarray(bank.array.get_orthogonal_selection((rows[order], 0, ch)), np.float32)
    out = np.empty_like(data)
    out[order] = data
    return out


def patch_png(patch: np.ndarray, size: int = 96) -> bytes:
    """PNG bytes of a patch ``(C, b, b)``: channels side by side, z-scored and clipped to ±3 σ."""
    import io

    from PIL import Image

    p = np.asarray(patch, np.float32)
    p = p.reshape((-1,) + p.shape[-2:])
    tiles = [(_norm(ch) * 255.0).astype(np.uint8) for ch in p]
    img = Image.fromarray(np.concatenate(tiles, axis=1))
    img = img.resize((size * len(tiles), size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _norm(p: np.ndarray) -> np.ndarray:
    z = (p - p.mean()) / max(float(p.std()), 1e-6)
    return np.clip((z + 3.0) / 6.0, 0, 1)


def spaced_points(xy: np.ndarray, n_cells: int = 12) -> np.ndarray:
    """Row indices of one point per occupied grid cell (the one nearest the cell centre)."""
    ok = np.isfinite(xy).all(axis=1)
    rows = np.flatnonzero(ok)
    if not len(rows):
        return rows
    p = xy[ok]
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    u = (p - lo) / span * n_cells
    cell = np.minimum(np.floor(u).astype(np.int64), n_cells - 1)
    d = np.hypot(*(u - cell - 0.5).T)
    df = pd.DataFrame({"c": cell[:, 0] * n_cells + cell[:, 1], "d": d, "r": rows})
    return np.sort(df.loc[df.groupby("c")["d"].idxmin(), "r"].to_numpy())


def _scatter(ax: Any, t: pd.DataFrame, colour: str) -> None:
    size = 12 if len(t) < 5000 else 3 if len(t) < 100000 else 0.5
    ax.scatter(t["map_x"], t["map_y"], c=t[colour].tolist(), s=size, linewidths=0, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")


def plot_map(atlas: Any, out: str | os.PathLike, *, n_cells: int = 12, colour: str = "color") -> Path:
    """The map coloured by the 2D colormap (or ``colour="cluster_color"``) with spaced thumbnails."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = atlas.table
    fig, ax = plt.subplots(figsize=(12, 12), dpi=100)
    _scatter(ax, t, colour)
    bank = _bank(atlas)
    if bank is not None:
        xy = t[["map_x", "map_y"]].to_numpy()
        rows = spaced_points(xy, n_cells)
        patches = read_patches(bank, t["id"].to_numpy()[rows])
        lo, hi = np.nanmin(xy, axis=0), np.nanmax(xy, axis=0)
        half = 0.42 * float(np.max(hi - lo)) / n_cells
        for r, p in zip(rows, patches, strict=True):
            x, y = xy[r]
            ax.imshow(_norm(p), cmap="gray", extent=(x - half, x + half, y - half, y + half), zorder=3,
                      interpolation="bilinear", vmin=0, vmax=1)
            ax.add_patch(plt.Rectangle((x - half, y - half), 2 * half, 2 * half, fill=False, lw=2.5,
                                       ec=t[colour].iloc[r], zorder=4))
        ax.set_xlim(lo[0] - 2 * half, hi[0] + 2 * half)
        ax.set_ylim(lo[1] - 2 * half, hi[1] + 2 * half)
    ax.set_title(f"atlas {atlas.key}: {len(t)} candidates")
    return _save(fig, out)


def plot_clusters(atlas: Any, out: str | os.PathLike) -> Path:
    """The map coloured by cluster, each cluster annotated at its median position with id and size."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = atlas.table
    fig, ax = plt.subplots(figsize=(12, 12), dpi=100)
    _scatter(ax, t, "cluster_color")
    for c, g in t[t["cluster"] >= 0].groupby("cluster"):
        x, y = g["map_x"].median(), g["map_y"].median()
        ax.text(x, y, f"{c}\n({len(g)})", ha="center", va="center", fontsize=9, zorder=5,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": g["cluster_color"].iloc[0], "lw": 2, "alpha": 0.85})
    n_un = int((t["cluster"] < 0).sum())
    ax.set_title(f"atlas {atlas.key}: {t['cluster'].max() + 1} clusters, {n_un} unassigned (grey)")
    return _save(fig, out)


def cluster_averages(atlas: Any, *, level: str = "cluster", max_per: int = 200, seed: int = 0) -> dict[int, np.ndarray]:
    """The class average of every cluster (or ``level="subcluster"``): the mean of its patches (the
    :func:`read_patches` view), over at most ``max_per`` random members. Candidates are centred on their DoG
    peak, so a cluster of one species averages to that species' projection and a background cluster to noise.

    Parameters
    ----------
    atlas : Atlas
        The atlas (its patch bank must be in the store).
    level : str
        ``"cluster"`` or ``"subcluster"``.
    max_per : int
        Members averaged per cluster at most (a random sample beyond it).
    seed : int
        Seed of that sample.

    Returns
    -------
    dict
        ``{cluster id: (bbox, bbox) float32 average}``, unassigned (``-1``) included when present.
    """
    bank = _bank(atlas)
    if bank is None:
        raise InputError("class averages need the patch bank behind the embeddings; it is not in the store.")
    t = atlas.table
    if level not in t.columns:
        raise InputError(f"atlas {atlas.key!r} has no {level} column; re-run `milotile explore atlas --overwrite`.")
    rng = np.random.default_rng(seed)
    out = {}
    for c, g in t.groupby(level):
        ids = g["id"].to_numpy()
        if len(ids) > max_per:
            ids = rng.choice(ids, max_per, replace=False)
        out[int(c)] = read_patches(bank, ids).mean(axis=0)
    return out


def plot_gallery(atlas: Any, out: str | os.PathLike, *, per_cluster: int = 10, seed: int = 0) -> Path:
    """A grid of ``per_cluster`` random patches for every cluster (rows), unassigned last, each row led by the
    cluster's class average (:func:`cluster_averages`, column "average")."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = atlas.table
    bank = _bank(atlas)
    if bank is None:
        raise InputError("the gallery needs the patch bank behind the embeddings; it is not in the store.")
    rng = np.random.default_rng(seed)
    averages = cluster_averages(atlas, seed=seed)
    clusters = sorted(t["cluster"].unique(), key=lambda c: (c < 0, c))
    fig, axes = plt.subplots(len(clusters), per_cluster + 1, figsize=(per_cluster * 0.9 + 1.9, len(clusters) * 0.9 + 0.3),
                             squeeze=False, dpi=100)
    for i, c in enumerate(clusters):
        g = t[t["cluster"] == c]
        pick = g["id"].to_numpy()[rng.choice(len(g), size=min(per_cluster, len(g)), replace=False)]
        patches = [averages[int(c)], *read_patches(bank, pick)]
        for j in range(per_cluster + 1):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_edgecolor(g["cluster_color"].iloc[0])
                s.set_linewidth(4 if j == 0 else 2)
            if j < len(patches):
                ax.imshow(_norm(patches[j]), cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
        axes[i, 0].set_ylabel("unassigned" if c < 0 else f"{c} ({len(g)})", rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_title("average", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.12)
    return _save(fig, out)


def _save(fig: Any, out: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s", out)
    return out


def plot_all(atlas: Any, out: str | os.PathLike | None = None, *, per_cluster: int = 10) -> dict[str, Path]:
    """``map.png``, ``clusters.png`` and (with a patch bank) ``gallery.png`` in ``out``."""
    folder = Path(out) if out is not None else Path(atlas.run_dir) / "plots"
    res = {"map": plot_map(atlas, folder / "map.png"), "clusters": plot_clusters(atlas, folder / "clusters.png")}
    if _bank(atlas) is not None:
        res["gallery"] = plot_gallery(atlas, folder / "gallery.png", per_cluster=per_cluster)
    return res


def export_thumbnails(atlas: Any, out: str | os.PathLike, *, size: int = 64, block: int = 1024) -> int:
    """One PNG per candidate, ``<out>/<id>.png`` (MiLoPYP's ``imgs/``), read block by block."""
    bank = _bank(atlas)
    if bank is None:
        raise InputError("thumbnails need the patch bank behind the embeddings; it is not in the store.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = atlas.table["id"].to_numpy()
    for s in range(0, len(ids), block):
        rows = ids[s : s + block]
        data = np.asarray(bank.array[int(rows.min()) : int(rows.max()) + 1, 0], np.float32)
        for i in rows:
            (out / f"{int(i)}.png").write_bytes(patch_png(data[i - rows.min()], size))
    log.info("wrote %d thumbnails to %s", len(ids), out)
    return len(ids)
