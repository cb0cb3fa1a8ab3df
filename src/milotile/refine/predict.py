"""Tiled heatmap prediction on Dask and collection-wide picking.

MiLoPYP ran each tomogram through the network in one forward pass (GPU memory grows with the
volume) after loading every test tomogram into RAM. Here a tomogram is cut into tiles (its Zarr
chunks, or ``tile``), each task reads its tile plus a halo of ``picker.halo`` level-0 voxels
(at least the receptive field, rounded to the model's alignment), predicts, and keeps the output
voxels its tile owns. Interior outputs never see the tile border, so the assembled heatmap equals
a whole-volume pass within float tolerance (tested), and memory per task is bounded by the tile
size.

* The model is loaded **once per worker process**: tasks carry the checkpoint path and a
  process-local cache (guarded by a lock) loads it on first use; a picker that has no checkpoint
  path travels once through the graph instead.
* Tasks ask for ``resources={"GPU": 1}`` when the running cluster has GPU workers.
* Heatmaps are written as OME-Zarr (NGFF 0.5, axes ``c, z, y, x``) to
  ``derived/heatmaps/<run>/<name>``; the scale is ``voxel_size * stride`` Å and the translation
  ``offset * voxel_size`` Å, so napari overlays them on the tomogram.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.refine.decode import PICK_COLUMNS, decode_heatmap, default_offset, empty_picks
from milotile.store.ngff import omero_metadata

log = logging.getLogger(__name__)

__all__ = ["pick", "predict_heatmap", "heatmap_metadata", "clear_picker_cache", "picker_cache_info"]

_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()
_LOADS = {"n": 0}


# ------------------------------------------------------------------------------------ picker cache
def clear_picker_cache() -> None:
    """Forget the pickers cached in this process."""
    with _LOCK:
        _CACHE.clear()
        _LOADS["n"] = 0


def picker_cache_info() -> dict[str, int]:
    """``{"cached": ..., "loads": ...}`` for this process (loads since the last clear)."""
    with _LOCK:
        return {"cached": len(_CACHE), "loads": _LOADS["n"]}


def _cache_key(cls: type, path: str) -> tuple[str, str]:
    return (f"{cls.__module__}.{cls.__qualname__}", os.path.abspath(path))


def _cached_picker(cls: type, path: str) -> Any:
    key = _cache_key(cls, path)
    with _LOCK:
        picker = _CACHE.get(key)
        if picker is None:
            t0 = time.perf_counter()
            picker = cls.load(path)
            _CACHE[key] = picker
            _LOADS["n"] += 1
            log.info("loaded picker %s in %.2f s (pid %d)", path, time.perf_counter() - t0, os.getpid())
    return picker


class _PickerRef:
    """What a task needs to get the picker: a class + checkpoint path, or the object itself."""

    def __init__(self, picker: Any):
        path = getattr(picker, "path", None) or getattr(picker, "ckpt_path", None)
        if path is not None and hasattr(type(picker), "load"):
            self.cls: type | None = type(picker)
            self.path: str | None = str(path)
            self.obj = None
            with _LOCK:  # the driver process already holds it: seed the cache
                _CACHE.setdefault(_cache_key(self.cls, self.path), picker)
        else:
            self.cls, self.path, self.obj = None, None, picker

    def get(self) -> Any:
        if self.obj is not None:
            return self.obj
        assert self.cls is not None and self.path is not None
        return _cached_picker(self.cls, self.path)


def _resolve_picker(picker: Any) -> Any:
    if isinstance(picker, (str, os.PathLike)):
        from milotile.refine.picker import Picker

        p = Path(picker)
        if not p.exists():
            raise InputError(f"Picker checkpoint {p} does not exist.")
        return Picker.load(p)
    if not hasattr(picker, "predict_block"):
        raise InputError(f"{picker!r} is not a picker (no predict_block); pass a checkpoint path or a Picker.")
    return picker


# ------------------------------------------------------------------------------------ geometry
def _geometry(picker: Any) -> tuple[tuple[int, int, int], tuple[float, float, float], tuple[int, int, int]]:
    """(stride, offset, halo) of a picker, all per axis ``(z, y, x)``."""
    c = getattr(picker, "contract", {}) or {}
    if "out_stride" in c:
        stride = tuple(int(s) for s in c["out_stride"])
    else:
        dr = int(c.get("down_ratio", 2))
        stride = (2 if c.get("compress") else 1, dr, dr)
    offset = tuple(float(o) for o in c["out_offset"]) if "out_offset" in c else default_offset(stride)
    halo = tuple(int(h) for h in picker.halo)
    # tile origins must stay on the output grid (and on the model's alignment, folded into halo)
    halo = tuple(int(math.ceil(h / s) * s) for h, s in zip(halo, stride, strict=True))
    return stride, offset, halo  # type: ignore[return-value]


def _tile_chunks(darr: da.Array, tile: Sequence[int] | None, stride: Sequence[int], align: int) -> da.Array:
    if tile is not None:
        tile = tuple(int(t) for t in tile)
        if len(tile) != 3 or any(t < 1 for t in tile):
            raise InputError(f"tile must be three positive sizes (z, y, x), got {tile!r}")
        for t, s, a in zip(tile, stride, (stride[0], align, align), strict=True):
            if t % s or t % a:
                raise InputError(f"tile size {t} must be a multiple of the model stride/alignment {max(s, a)}")
        darr = darr.rechunk(tile)
    for axis, (chunks, s) in enumerate(zip(darr.chunks, stride, strict=True)):
        if any(c % s for c in chunks[:-1]):
            raise InputError(f"chunks {chunks} along axis {axis} are not multiples of the model stride {s}")
    return darr


def _default_tile(darr: da.Array, stride: Sequence[int], align: int) -> tuple[int, int, int]:
    """Store chunks along z, 512 voxels (a multiple of the alignment) in y and x.

    Larger tiles than the 256-voxel store chunks read proportionally less halo; dask clips a tile
    larger than the volume to the volume.
    """
    zc = int(darr.chunks[0][0])
    zc = max(stride[0], zc - zc % stride[0])
    xy = max(align, 512 - 512 % align)
    return (zc, xy, xy)


def _predict_tile(
    block: np.ndarray,
    ref: _PickerRef,
    stats: tuple[float, float],
    crop: tuple[tuple[int, int], ...],
) -> np.ndarray:
    picker = ref.get()
    out = picker.predict_block(np.asarray(block, dtype=np.float32), stats)
    sl = (slice(None),) + tuple(slice(a, b) for a, b in crop)
    return np.ascontiguousarray(out[sl], dtype=np.float32)


def _stats(t: Any) -> tuple[float, float]:
    from milotile.refine.preprocess import stored_stats

    return stored_stats(t)


def predict_heatmap(
    col: Any,
    name: str,
    picker: Any,
    *,
    tile: Sequence[int] | None = None,
    stats: tuple[float, float] | None = None,
    halo: Sequence[int] | None = None,
) -> da.Array:
    """Lazy heatmap of one tomogram, predicted tile by tile.

    Parameters
    ----------
    col : Collection
        The collection.
    name : str
        Tomogram name.
    picker : Picker or path
        Trained picker (``predict_block``, ``halo``, ``contract``) or its checkpoint.
    tile : (z, y, x), optional
        Tile size in level-0 voxels (multiples of the model alignment); default the Zarr chunks
        along z and 512 voxels in y and x (fewer, larger tiles read less halo).
    stats : (mean, std), optional
        Normalisation statistics; default the tomogram's global statistics.
    halo : (z, y, x), optional
        Context read around each tile, in level-0 voxels. Default ``picker.halo``, the model's full
        receptive field: the tiled heatmap then equals a whole-volume pass. A smaller halo is faster
        and differs only near tile seams, where far-away context is cut off.

    Returns
    -------
    dask.array.Array
        float32 ``(C, Z', Y', X')`` probabilities on the model grid, one dask chunk per tile.
    """
    picker = _resolve_picker(picker)
    t = col[name]
    x = t.data(0)
    stride, _, full_halo = _geometry(picker)
    if halo is None:
        halo = full_halo
    else:
        if len(halo) != 3 or any(int(h) < 0 for h in halo):
            raise InputError(f"halo must be three non-negative sizes (z, y, x), got {tuple(halo)!r}")
        halo = tuple(int(math.ceil(int(h) / st) * st) for h, st in zip(halo, stride, strict=True))
        if any(h < f for h, f in zip(halo, full_halo, strict=True)):
            log.info("%s: halo %s is below the receptive field %s; outputs near tile seams see less context",
                     name, halo, full_halo)
    align = int((picker.contract or {}).get("xy_alignment", stride[1])) if hasattr(picker, "contract") else stride[1]
    if tile is None:
        tile = _default_tile(x, stride, align)
    x = _tile_chunks(x, tile, stride, align)
    if stats is None:
        stats = _stats(t)
    stats = (float(stats[0]), float(stats[1]))
    n_classes = int(getattr(picker, "n_classes", len((picker.contract or {}).get("classes") or ["particle"])))
    ref = _PickerRef(picker)
    ref_node = dask.delayed(ref, pure=False) if ref.obj is not None else ref
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in x.chunks]
    shape = x.shape
    out_shape = tuple(math.ceil(s / st) for s, st in zip(shape, stride, strict=True))
    from milotile.cluster import gpu_resources

    resources = gpu_resources()
    blocks = np.empty(x.numblocks, dtype=object)
    annotate = dask.annotate(resources=resources) if resources else _nullcontext()
    with annotate:
        for idx in np.ndindex(*x.numblocks):
            sl, crop, oshape = [], [], []
            for a in range(3):
                s0 = int(starts[a][idx[a]])
                s1 = s0 + int(x.chunks[a][idx[a]])
                lo = max(0, s0 - halo[a])
                hi = min(shape[a], s1 + halo[a])
                sl.append(slice(lo, hi))
                o0, o1 = s0 // stride[a], min(out_shape[a], math.ceil(s1 / stride[a]))
                c0 = (s0 - lo) // stride[a]
                crop.append((c0, c0 + (o1 - o0)))
                oshape.append(o1 - o0)
            task = dask.delayed(_predict_tile, pure=True)(x[tuple(sl)], ref_node, stats, tuple(crop))
            blocks[idx] = da.from_delayed(task, shape=(n_classes, *oshape), dtype=np.float32)
    hm = da.block(blocks.tolist())
    # da.block stacks along the trailing axes: blocks are (C, z, y, x) with the grid over z, y, x
    return hm


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ------------------------------------------------------------------------------------ store output
def heatmap_metadata(name: str, voxel_size: float, stride: Sequence[int], offset: Sequence[float],
                     classes: Sequence[str]) -> dict:
    """NGFF 0.5 ``ome`` attributes for a ``(c, z, y, x)`` heatmap on the model grid (Å)."""
    scale = [1.0] + [float(voxel_size) * float(s) for s in stride]
    trans = [0.0] + [float(voxel_size) * float(o) for o in offset]
    return {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": "c", "type": "channel"}]
                + [{"name": a, "type": "space", "unit": "angstrom"} for a in ("z", "y", "x")],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": scale},
                            {"type": "translation", "translation": trans},
                        ],
                    }
                ],
            }
        ],
        # napari needs a colour (and a window) per channel to open a channel axis
        "omero": omero_metadata([str(c) for c in classes], window=(0.0, 1.0)),
    }


def _run_id(picker: Any) -> str:
    c = getattr(picker, "contract", {}) or {}
    if c.get("run_id"):
        return str(c["run_id"])
    path = getattr(picker, "path", None)
    if path is not None:
        return Path(path).parent.name or "picker"
    return "picker"


def _write_heatmap(col: Any, name: str, run: str, hm: da.Array, meta: dict, params: dict) -> da.Array:
    from milotile.store import write_dask

    grp = col.group(f"derived/heatmaps/{run}/{name}", create=True)
    old = dict(grp.attrs.get("milotile", {}))
    if old.get("complete") and old.get("params") == params and "0" in grp:
        log.info("%s: heatmap for run %s already in the store, reusing it", name, run)
        return da.from_zarr(grp["0"])
    grp.attrs["milotile"] = {"complete": False, "params": params}
    chunks = (1,) + tuple(c[0] for c in hm.chunks[1:])
    write_dask(hm, grp, "0", chunks=chunks, dimension_names=("c", "z", "y", "x"))
    grp.attrs["ome"] = meta
    grp.attrs["milotile"] = {"complete": True, "params": params}
    return da.from_zarr(grp["0"])


def _ckpt_fingerprint(picker: Any) -> dict:
    path = getattr(picker, "path", None)
    if path is None or not Path(path).exists():
        return {"checkpoint": None, "picker": repr(picker)}
    st = Path(path).stat()
    # the checkpoint's name and identity only: no local path in store attributes
    return {"checkpoint": Path(path).name, "run": Path(path).resolve().parent.name, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


# ------------------------------------------------------------------------------------ pick
def pick(
    col: Any,
    picker: Any,
    *,
    threshold: float = 0.25,
    max_picks: int | None = 900,
    nms_distance: float | None = None,
    border: float | Sequence[float] | None = None,
    tomograms: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    write_heatmaps: bool = True,
    tile: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    run: str | None = None,
    table: str | None = "picks",
) -> pd.DataFrame:
    """Pick particles in every tomogram of a collection.

    Parameters
    ----------
    col : Collection or path
        The collection (a path is opened).
    picker : Picker or path
        Trained picker or its checkpoint (``pick(picker, col)`` is accepted too).
    threshold : float
        Keep peaks with probability ``> threshold`` (MiLoPYP ``--out_thresh`` 0.25).
    max_picks : int, optional
        Top-K per tomogram and class (MiLoPYP ``--K``; its docs use 900).
    nms_distance : float, optional
        NMS radius in level-0 voxels; default half the contract ``bbox``.
    border : float or (z, y, x), optional
        Level-0 margin to the volume faces; default a quarter of the contract ``bbox``.
    tomograms : sequence of str, optional
        Subset of tomograms (default all).
    out : path, optional
        Also write the picks here (``.csv`` or parquet).
    write_heatmaps : bool
        Store heatmaps under ``derived/heatmaps/<run>/<name>`` (decoding then reads them back, so
        the network runs once even for several classes).
    tile : (z, y, x), optional
        Tile size in level-0 voxels (default: store chunks in z, 512 in y and x).
    halo : (z, y, x), optional
        Context around each tile (default the full receptive field; see :func:`predict_heatmap`).
    run : str, optional
        Heatmap run id (default the checkpoint's run folder name).
    table : str or None
        Store table name for the picks (``tables/picks.parquet``); ``None`` skips it.

    Returns
    -------
    pandas.DataFrame
        ``tomogram, x, y, z, x_A, y_A, z_A, score, class`` in level-0 voxels / Å.
    """
    if hasattr(col, "predict_block") and not hasattr(picker, "predict_block"):
        col, picker = picker, col  # Picker.pick(col) calls pick(picker, col)
    if isinstance(col, (str, os.PathLike)):
        import milotile

        col = milotile.open(col)
    picker = _resolve_picker(picker)
    if not 0.0 <= float(threshold) < 1.0:
        raise InputError(f"threshold must be in [0, 1), got {threshold}")
    names = list(col.names) if tomograms is None else [str(n) for n in tomograms]
    unknown = [n for n in names if n not in set(col.names)]
    if unknown:
        raise InputError(f"Tomogram(s) {', '.join(map(repr, unknown[:5]))} are not in the collection {col.path}.")
    if not names:
        raise InputError(f"The collection {col.path} holds no tomograms to pick.")
    contract = getattr(picker, "contract", {}) or {}
    bbox = float(contract.get("bbox", 16))
    nms = float(nms_distance) if nms_distance is not None else bbox / 2.0
    if border is None:
        border = math.floor(bbox / 4.0)
    classes = list(getattr(picker, "classes", None) or contract.get("classes") or ["particle"])
    stride, offset, _ = _geometry(picker)
    run = run or _run_id(picker)
    tables = []
    for name in names:
        t = col[name]
        t0 = time.perf_counter()
        hm = predict_heatmap(col, name, picker, tile=tile, halo=halo)
        if write_heatmaps:
            params = {"picker": _ckpt_fingerprint(picker), "tile": list(tile) if tile else None,
                      "halo": list(halo) if halo else None}
            meta = heatmap_metadata(name, t.voxel_size, stride, offset, classes)
            hm = _write_heatmap(col, name, run, hm, meta, params)
        df = decode_heatmap(
            hm, tomogram=name, shape=t.shape, voxel_size=t.voxel_size, stride=stride, offset=offset,
            classes=classes, threshold=threshold, nms_distance=nms, max_picks=max_picks, border=border,
        )
        log.info("%s: %d picks in %.1f s", name, len(df), time.perf_counter() - t0)
        tables.append(df)
    picks = pd.concat(tables, ignore_index=True) if any(len(d) for d in tables) else empty_picks()
    picks = picks[PICK_COLUMNS]
    if table:
        col.write_table(table, picks)
    if out is not None:
        write_picks(picks, out)
    return picks


def write_picks(picks: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write a picks table to ``out`` (CSV when it ends in ``.csv``, else parquet)."""
    p = Path(out).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".csv":
        picks.to_csv(p, index=False)
    else:
        picks.to_parquet(p, index=False)
    log.info("wrote %d picks to %s", len(picks), p)
    return p
