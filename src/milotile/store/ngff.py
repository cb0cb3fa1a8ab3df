"""OME-NGFF pieces the viewers and other tools need: channel colours, labels, NGFF 0.4 export.

* :func:`omero_metadata` - the ``omero`` block napari needs to open a multichannel image
  (napari-ome-zarr takes one colour map per channel from ``color``; without it napari fails).
* label images are written by :mod:`milotile.store.labels` (the one owner).
* :func:`write_ngff04` - a multiscale image as OME-NGFF 0.4 in **Zarr v2** (copick 1.x, the CryoET
  Data Portal and every zarr-2 reader), written chunk by chunk from dask arrays (bounded memory).
"""

from __future__ import annotations

import colorsys
import logging
import os
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from milotile.store.arrays import AXES_ZYX, clip_chunks

log = logging.getLogger(__name__)

__all__ = [
    "NGFF04_CHUNKS",
    "distinct_colors",
    "export_tomograms_ngff04",
    "omero_metadata",
    "write_ngff04",
]

#: Chunk shape of copick / portal volumes (``256³``, clipped to small volumes).
NGFF04_CHUNKS = (256, 256, 256)


def distinct_colors(n: int, *, seed: int = 0) -> list[tuple[int, int, int]]:
    """``n`` well separated RGB colours (golden-ratio hue steps, fixed saturation and value)."""
    out = []
    h = (0.13 + 0.07 * seed) % 1.0
    for _ in range(int(n)):
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
        h = (h + 0.618033988749895) % 1.0
    return out


def omero_metadata(
    labels: Sequence[str],
    *,
    window: tuple[float, float] = (0.0, 1.0),
    colors: Sequence[str] | None = None,
) -> dict:
    """The ``omero`` block of a multichannel image: one channel per label with colour and window.

    Parameters
    ----------
    labels : sequence of str
        Channel names (e.g. the classes of a heatmap).
    window : (float, float)
        Display range ``(start, end)``; also used as ``min``/``max``.
    colors : sequence of str, optional
        Hex colours ``"RRGGBB"``; default distinct colours.

    Returns
    -------
    dict
        ``{"channels": [{"label", "color", "window", "active"}, ...], "rdefs": {...}}``.
    """
    if colors is None:
        colors = ["".join(f"{v:02X}" for v in c) for c in distinct_colors(len(labels))]
    lo, hi = float(window[0]), float(window[1])
    return {
        "channels": [
            {
                "label": str(lab),
                "color": str(col),
                "window": {"start": lo, "end": hi, "min": lo, "max": hi},
                "active": True,
            }
            for lab, col in zip(labels, colors, strict=True)
        ],
        "rdefs": {"model": "color"},
    }


def grey_channel(label: str, window: tuple[float, float], *, active: bool = True) -> dict:
    """The ``omero`` block of a one-channel (greyscale) image, so viewers name its layer.

    napari-ome-zarr 0.10 names an image layer ``"<multiscales name>: <channel label>"`` only when an
    ``omero`` channel exists (else ``data``, ``data [1]``, ...): tomograms get ``"<name>: tomogram"``,
    preprocessed volumes ``"<name>: preprocessed"``, colour maps ``"<tomogram>: <colour map>"``.
    """
    block = omero_metadata([label], window=window, colors=["FFFFFF"])
    block["channels"][0]["active"] = bool(active)
    block["rdefs"] = {"model": "greyscale"}
    return block


def _level_transforms(scale: Sequence[float], translation: Sequence[float] | None) -> list[dict]:
    t: list[dict] = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if translation is not None and any(float(v) for v in translation):
        t.append({"type": "translation", "translation": [float(v) for v in translation]})
    return t


def _store_aligned(darr: da.Array, target: Any) -> Any:
    """Lazy store of ``darr`` into ``target`` with dask chunks equal to the target's chunks."""
    aligned = darr.astype(target.dtype).rechunk(tuple(target.chunks))
    return da.store(aligned, target, lock=False, compute=False, return_stored=False)


def write_ngff04(
    levels: Sequence[da.Array],
    dest: str | os.PathLike,
    *,
    voxel_size: float,
    name: str = "image",
    factor: int = 2,
    chunks: Sequence[int] = NGFF04_CHUNKS,
    attributes: dict | None = None,
    dtype: Any = np.float32,
) -> zarr.Group:
    """Write a multiscale volume as OME-NGFF 0.4 in Zarr v2 (Blosc-LZ4, numeric level paths).

    Level ``i`` gets scale ``voxel_size * factor**i`` Å and the translation that keeps its voxel
    centres on level 0 (as in the collection store). Every dask task writes whole zarr chunks, so
    the memory used is a few chunks whatever the volume size.

    Parameters
    ----------
    levels : sequence of dask arrays
        ``(z, y, x)`` volumes, finest first (e.g. the store's pyramid ``0, 1, 2``).
    dest : path
        Output ``.zarr`` folder (replaced when it exists).
    voxel_size : float
        Level-0 voxel size in Å.
    name : str
        Multiscale name.
    factor : int
        Down-sampling factor between levels.
    chunks : (z, y, x)
        Zarr chunk shape (clipped to each level's shape).
    attributes : dict, optional
        Extra root attributes (e.g. ``{"milotile": {...}}``).
    dtype : dtype
        Stored dtype.

    Returns
    -------
    zarr.Group
        The written (Zarr v2) root group.
    """
    import numcodecs

    root = zarr.open_group(str(dest), mode="w", zarr_format=2)
    tasks = []
    datasets = []
    for i, lvl in enumerate(levels):
        f = factor**i
        arr = root.create_array(
            str(i), shape=lvl.shape, chunks=clip_chunks(lvl.shape, chunks), dtype=dtype,
            compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
            fill_value=0,
            # "/"-separated chunk keys (0/0/0) like ome-zarr's writer: copick 1.x opens volumes through a
            # zarr-2 FSStore whose key separator is "/", and reads "."-separated chunks as empty
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        tasks.append(_store_aligned(lvl, arr))
        trans = [0.5 * voxel_size * (f - 1)] * 3 if f > 1 else None
        datasets.append({"path": str(i), "coordinateTransformations": _level_transforms([voxel_size * f] * 3, trans)})
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "name": name,
            "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in AXES_ZYX],
            "datasets": datasets,
        }
    ]
    if attributes:
        root.attrs.update(attributes)
    dask.compute(*tasks)
    log.info("wrote NGFF 0.4 (zarr v2) %s: %d levels", dest, len(levels))
    return root


def export_tomograms_ngff04(col: Any, out: str | os.PathLike, names: Sequence[str] | None = None) -> list[str]:
    """Write tomograms of a collection as ``<out>/<name>.zarr`` (OME-NGFF 0.4, Zarr v2, all pyramid levels).

    This is the layout of the CryoET Data Portal's volumes (multiscale ``0, 1, 2`` in Å, 256³ chunks,
    Blosc-LZ4) and of copick's ``<tomo_type>.zarr``; every zarr-2 tool reads it.

    Parameters
    ----------
    col : Collection
        The collection store.
    out : path
        Output folder (created).
    names : sequence of str, optional
        Tomograms to write (default all).

    Returns
    -------
    list of str
        The ``.zarr`` folders written.
    """
    out_dir = os.fspath(out)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name in names if names is not None else col.names:
        t = col[name]
        dest = os.path.join(out_dir, f"{name}.zarr")
        write_ngff04([t.data(level) for level in t.levels], dest, voxel_size=t.voxel_size, name=name,
                     attributes={"milotile": {"tomogram": name, "source": t.meta.get("source", "")}})
        written.append(dest)
    return written
