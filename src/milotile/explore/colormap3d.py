"""3D colour map of the atlas: cluster spheres as an NGFF labels image under each tomogram.

MiLoPYP's ``visualize_3dhm.py`` paints fixed 12-px discs slice by slice into an RGB ``.npy`` of the
whole volume. Here every candidate becomes a sphere (radius from the patch box) whose label value
is its cluster id + 1 (unassigned candidates get the value after the last cluster), painted chunk by
chunk on the Dask workers and written as ``tomograms/<name>/labels/atlas-<key>`` with the NGFF
``image-label`` colour table, so napari overlays it on the tomogram with the atlas colours. An RGB
rendering of chosen slices (tomogram grey blended with the label colours) is written as PNGs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from milotile.errors import InputError
from milotile.explore.colors import UNASSIGNED_RGB, cluster_palette
from milotile.ops.paint import paint_block
from milotile.store.labels import write_tomogram_labels

log = logging.getLogger(__name__)

__all__ = ["colour_map_3d", "label_colors", "render_slices"]


def label_colors(atlas: Any) -> dict[int, tuple[int, int, int, int]]:
    """``{label value: rgba}``: cluster ``c`` -> ``c + 1``; unassigned -> ``n_clusters + 1``."""
    n = int(atlas.table["cluster"].max()) + 1
    pal = cluster_palette(max(n, 1))
    out = {c + 1: (int(pal[c][0]), int(pal[c][1]), int(pal[c][2]), 255) for c in range(n)}
    out[n + 1] = (*UNASSIGNED_RGB, 255)
    return out


def _label_values(atlas: Any, clusters: np.ndarray) -> np.ndarray:
    n = int(atlas.table["cluster"].max()) + 1
    return np.where(clusters >= 0, clusters + 1, n + 1).astype(np.uint16)


def colour_map_3d(
    atlas: Any,
    names: Sequence[str] | None = None,
    *,
    radius: float | None = None,
    slices: int | Sequence[int] = 3,
    out: str | os.PathLike | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the 3D colour map of every tomogram (or ``names``) and RGB renderings of slices.

    Parameters
    ----------
    atlas : Atlas
        The atlas (its table has ``tomogram, x, y, z, cluster``).
    names : sequence of str, optional
        Tomograms (default: all with candidates).
    radius : float, optional
        Sphere radius in voxels (default: a quarter of the patch box, at least 2).
    slices : int or sequence of int
        RGB renderings: a number of evenly spaced slices through the candidates, or z indices.
    out : path, optional
        Folder of the PNG renderings (default ``runs/atlas-<key>/colormap3d``).

    Returns
    -------
    dict
        Per tomogram: ``{"labels": store path, "slices": [png paths], "spheres": n}``.
    """
    col = atlas.collection
    t = atlas.table
    if not {"tomogram", "x", "y", "z"} <= set(t.columns):
        raise InputError("the atlas has no candidate coordinates; cannot paint a 3D colour map.")
    if radius is None:
        bbox = _bank_bbox(atlas)
        radius = max(2.0, bbox / 4.0)
    todo = list(names) if names is not None else [n for n in col.names if n in set(t["tomogram"].astype(str))]
    colors = label_colors(atlas)
    folder = Path(out) if out is not None else Path(atlas.run_dir) / "colormap3d"
    result: dict[str, dict[str, Any]] = {}
    for name in todo:
        if name not in col.names:
            raise InputError(f"store {col.url} has no tomogram {name!r}.")
        sub = t[t["tomogram"].astype(str) == name]
        zyx = sub[["z", "y", "x"]].to_numpy(np.float64)
        vals = _label_values(atlas, sub["cluster"].to_numpy())
        radii = np.full(len(sub), float(radius))
        img = col[name].data(0)
        template = da.zeros(img.shape, dtype=np.uint16, chunks=img.chunks)
        lab = template.map_blocks(paint_block, zyx, radii, vals, dtype=np.uint16)
        path = write_tomogram_labels(col, name, f"atlas-{atlas.key}", lab, colors=colors,
                                     properties=[{"label-value": v, "cluster": (v - 1 if v <= len(colors) - 1 else -1)}
                                                 for v in sorted(colors)],
                                     params={"atlas": atlas.key, "radius": float(radius)},
                                     sources={f"tables/{atlas.table_name}": col.source_token(f"tables/{atlas.table_name}")})
        zs = _choose_slices(sub["z"].to_numpy(), img.shape[0], slices)
        pngs = render_slices(col, name, path, zs, colors, folder)
        result[name] = {"labels": path, "slices": [str(p) for p in pngs], "spheres": int(len(sub))}
        log.info("3D colour map of %s: %d spheres (r=%.1f) -> %s", name, len(sub), radius, path)
    if todo:
        col.consolidate()  # once at the stage end (each consolidation walks the whole store)
    return result


def _bank_bbox(atlas: Any) -> int:
    from milotile.explore.data import open_bank

    try:
        return open_bank(atlas.collection, atlas.bank_key).bbox
    except InputError:
        return 24


def _choose_slices(z: np.ndarray, depth: int, slices: int | Sequence[int]) -> list[int]:
    if isinstance(slices, int):
        if not len(z) or slices < 1:
            return []
        qs = np.quantile(z, np.linspace(0.2, 0.8, slices)) if slices > 1 else [np.median(z)]
        return sorted({int(np.clip(round(q), 0, depth - 1)) for q in qs})
    bad = [s for s in slices if not 0 <= int(s) < depth]
    if bad:
        raise InputError(f"slice {bad[0]} is outside the tomogram (depth {depth}).")
    return [int(s) for s in slices]


def render_slices(
    col: Any, name: str, label_path: str, zs: Sequence[int], colors: dict[int, tuple[int, ...]],
    folder: str | os.PathLike, alpha: float = 0.55,
) -> list[Path]:
    """PNG per slice: the tomogram in grey with the label colours blended in."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lut = np.zeros((max(colors) + 1, 3), np.float32)
    for v, rgba in colors.items():
        lut[v] = rgba[:3]
    labels = col.zarr_group[label_path]["0"]
    tomo = col[name].data(0)
    out = []
    for z in zs:
        g = np.asarray(tomo[z], np.float32)
        lo, hi = np.percentile(g, [1, 99])
        grey = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)[..., None] * 255.0
        lab = np.asarray(labels[z])
        rgb = np.where(lab[..., None] > 0, (1 - alpha) * grey + alpha * lut[lab], grey)
        p = folder / f"{name}_z{z:04d}.png"
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(p)
        out.append(p)
    return out
