"""The one halo tiler of the picker, heatmaps in the store, and collection-wide picking.

MiLoPYP ran each tomogram through the network in one forward pass (GPU memory grows with the
volume) after loading every test tomogram into RAM. Here a tomogram (or a region of it: training
validation uses the same tiler) is cut into tiles, each task reads its tile plus a halo of
``picker.halo`` level-0 voxels (at least the receptive field, rounded to the model's alignment),
predicts, and keeps the output voxels its tile owns. Interior outputs never see the tile border, so
the assembled heatmap equals a whole-volume pass within float tolerance (tested), and memory per task
is bounded by the tile size.

* The model is loaded **once per worker process** through :mod:`milotile.nn.cache`: tasks carry the
  checkpoint path; a picker that has no checkpoint path travels once through the graph instead.
* Tasks ask for ``resources={"GPU": 1}`` when the running cluster has GPU workers
  (:func:`milotile.runtime.gpu_resources`).
* Heatmaps are written through the stage-output helper as OME-Zarr (NGFF 0.5, axes ``c, z, y, x``)
  to ``derived/heatmaps/<run>/<name>``; the scale is ``voxel_size * stride`` Å and the translation
  ``offset * voxel_size`` Å, so napari overlays them on the tomogram. They are reused only while the
  checkpoint, the tomogram and the tiling are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.nn import cache
from milotile.ops.grid import Grid
from milotile.refine.decode import (
    PICK_COLUMNS,
    decode_heatmap,
    decode_options,
    empty_picks,
    picker_grid,
)
from milotile.refine.shape import SHAPE_COLUMNS, check_shapes
from milotile.refine.threshold import AUTO_FLOOR, apply_auto_threshold
from milotile.runtime import adapt_threads, gpu_resources
from milotile.stages.preprocess import tomogram_sources, volume_stats
from milotile.store import as_collection, write_dask
from milotile.store.ngff import omero_metadata
from milotile.store.stage_output import file_source

log = logging.getLogger(__name__)

__all__ = ["HEATMAPS", "heatmap_metadata", "pick", "picker_stats", "predict_heatmap", "region_grid", "write_picks"]

HEATMAPS = "derived/heatmaps"


# ------------------------------------------------------------------------------------ model transport
class _PickerRef:
    """What a task needs to get the picker: its class + checkpoint path, or the object itself."""

    def __init__(self, picker: Any):
        path = getattr(picker, "path", None)
        if path is not None and hasattr(type(picker), "load"):
            self.loader: Any = type(picker).load
            self.path: str | None = str(path)
            self.obj = None
            cache.seed(picker, self.loader, self.path)  # the driver process already holds it
        else:
            self.loader, self.path, self.obj = None, None, picker

    def get(self) -> Any:
        if self.obj is not None:
            return self.obj
        return cache.cached(self.loader, self.path)


def _check_picker(picker: Any) -> Any:
    if isinstance(picker, (str, os.PathLike)):
        raise InputError(f"expected a loaded picker, got the path {os.fspath(picker)!r}; use Picker.load(path).")
    if not hasattr(picker, "predict_block"):
        raise InputError(f"{picker!r} is not a picker (no predict_block); pass a Picker.")
    return picker


def picker_stats(col: Any, name: str, picker: Any) -> tuple[float, float]:
    """Normalisation statistics of tomogram ``name`` under the picker's preprocessing contract."""
    c = getattr(picker, "contract", {}) or {}
    return volume_stats(col, name, gauss=float(c.get("gauss", 0.0)), compress=bool(c.get("compress", False)),
                        compress_how=str(c.get("compress_how", "max")))


# ------------------------------------------------------------------------------------ tiling
def _halo(picker: Any, stride: Sequence[int], halo: Sequence[int] | None, name: str) -> tuple[int, int, int]:
    """Context read around each tile, rounded up to the output grid (default the receptive field)."""
    full = tuple(int(math.ceil(int(h) / s) * s) for h, s in zip(picker.halo, stride, strict=True))
    if halo is None:
        return full  # type: ignore[return-value]
    if len(halo) != 3 or any(int(h) < 0 for h in halo):
        raise InputError(f"halo must be three non-negative sizes (z, y, x), got {tuple(halo)!r}")
    out = tuple(int(math.ceil(int(h) / s) * s) for h, s in zip(halo, stride, strict=True))
    if any(h < f for h, f in zip(out, full, strict=True)):
        log.info("%s: halo %s is below the receptive field %s; outputs near tile seams see less context", name, out, full)
    return out  # type: ignore[return-value]


#: largest tile a task predicts, including its halo, in input voxels (``MILOTILE_TILE_MVOXELS``, millions):
#: a per-slice-trunk picker holds ~8 float32 features per input voxel, so 32 M voxels is ~1 GiB of features
TILE_VOXELS = int(float(os.environ.get("MILOTILE_TILE_MVOXELS", "32")) * 2**20)


def _tile_size(shape: Sequence[int], tile: Sequence[int] | None, stride: Sequence[int], align: int,
               halo: Sequence[int], name: str = "") -> tuple[int, int, int]:
    """The tile shape: given (checked against the model's stride and alignment) or planned.

    The default plan (:func:`milotile.ops.tiling.plan_tiles`) computes the fewest voxels with every
    tile plus halo within :data:`TILE_VOXELS`: a small tomogram is one tile (no halo at all, since the
    halo is clipped at the faces); a large one is cut where the halo is thinnest (z for the 2.5D
    pickers, whose z context is a few slices). The halo overhead is logged.
    """
    if tile is None:
        from milotile.ops.tiling import plan_tiles

        plan = plan_tiles(shape, halo, (stride[0], align, align), TILE_VOXELS)
        log.info("%s: tiles %s (%s per axis) for %s; halo overhead %.1f %% of %.1f M computed voxels", name,
                 plan.tile, "x".join(map(str, plan.counts)), tuple(shape), 100 * plan.halo_overhead,
                 plan.computed_voxels / 1e6)
        return plan.tile  # type: ignore[return-value]
    t = tuple(int(v) for v in tile)
    if len(t) != 3 or any(v < 1 for v in t):
        raise InputError(f"tile must be three positive sizes (z, y, x), got {tuple(tile)!r}")
    for v, s, a in zip(t, stride, (stride[0], align, align), strict=True):
        if v % s or v % a:
            raise InputError(f"tile size {v} must be a multiple of the model stride/alignment {max(s, a)}")
    return t  # type: ignore[return-value]


def _align(start: Sequence[int], stride: Sequence[int]) -> list[int]:
    """A region start rounded down to the output grid, so its heatmap lies on the tomogram's grid."""
    return [max(0, int(a) // int(s) * int(s)) for a, s in zip(start, stride, strict=True)]


def region_grid(picker: Any, start: Sequence[int]) -> Grid:
    """Grid of the heatmap :func:`predict_heatmap` returns for a region starting at ``start``."""
    grid = picker_grid(getattr(picker, "contract", {}) or {})
    return grid.shifted(_align(start, grid.scale))


def _region(shape: Sequence[int], region: Sequence[Sequence[int]] | None, stride: Sequence[int]) -> tuple[list[int], list[int]]:
    """Region ``[start, stop)`` with ``start`` rounded down to the output grid (whole volume by default)."""
    if region is None:
        return [0, 0, 0], [int(s) for s in shape]
    start, stop = region
    lo = _align(start, stride)
    hi = [min(int(n), int(b)) for b, n in zip(stop, shape, strict=True)]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        raise InputError(f"region {tuple(start)}..{tuple(stop)} lies outside the volume of shape {tuple(shape)}")
    return lo, hi


def _predict_tile(block: np.ndarray, ref: _PickerRef, stats: tuple[float, float], crop: tuple[tuple[int, int], ...]) -> np.ndarray:
    adapt_threads()
    out = ref.get().predict_block(np.asarray(block, dtype=np.float32), stats)
    sl = (slice(None),) + tuple(slice(a, b) for a, b in crop)
    return np.ascontiguousarray(out[sl], dtype=np.float32)


def predict_heatmap(
    col: Any,
    name: str,
    picker: Any,
    *,
    tile: Sequence[int] | None = None,
    stats: tuple[float, float] | None = None,
    halo: Sequence[int] | None = None,
    region: Sequence[Sequence[int]] | None = None,
) -> da.Array:
    """Lazy heatmap of one tomogram (or of a region of it), predicted tile by tile.

    Parameters
    ----------
    col : Collection
        The collection.
    name : str
        Tomogram name.
    picker : Picker
        Trained picker (``predict_block``, ``halo``, ``contract``).
    tile : (z, y, x), optional
        Tile size in level-0 voxels (multiples of the model alignment); default planned from the
        halo and :data:`TILE_VOXELS` (a small tomogram is one tile; see :func:`_tile_size`).
    stats : (mean, std), optional
        Normalisation statistics; default :func:`picker_stats`.
    halo : (z, y, x), optional
        Context read around each tile, in level-0 voxels. Default ``picker.halo``, the model's full
        receptive field: the tiled heatmap then equals a whole-volume pass. A smaller halo is faster
        and differs only near tile seams.
    region : (start, stop), optional
        Level-0 box ``[start, stop)`` to predict (``start`` is rounded down to the output grid; its
        heatmap starts there: ``picker_grid(contract).shifted(start)``). Default the whole volume.

    Returns
    -------
    dask.array.Array
        float32 ``(C, Z', Y', X')`` probabilities on the model grid, one dask chunk per tile.
    """
    picker = _check_picker(picker)
    x = col[name].data(0)
    contract = getattr(picker, "contract", {}) or {}
    stride = tuple(int(s) for s in picker_grid(contract).scale)
    halo = _halo(picker, stride, halo, name)
    stats = picker_stats(col, name, picker) if stats is None else stats
    stats = (float(stats[0]), float(stats[1]))
    n_classes = int(getattr(picker, "n_classes", len(contract.get("classes") or ["particle"])))
    ref = _PickerRef(picker)
    ref_node = dask.delayed(ref, pure=False) if ref.obj is not None else ref
    lo, hi = _region(x.shape, region, stride)
    tile = _tile_size([b - a for a, b in zip(lo, hi, strict=True)], tile, stride,
                      int(contract.get("xy_alignment", stride[1])), halo, name)
    edges = [list(range(a, b, t)) + [b] for a, b, t in zip(lo, hi, tile, strict=True)]
    resources = gpu_resources()
    blocks = np.empty([len(e) - 1 for e in edges], dtype=object)
    with dask.annotate(resources=resources) if resources else contextlib.nullcontext():
        for idx in np.ndindex(*blocks.shape):
            sl, crop, oshape = [], [], []
            for a in range(3):
                s0, s1 = edges[a][idx[a]], edges[a][idx[a] + 1]
                r0, r1 = max(0, s0 - halo[a]), min(x.shape[a], s1 + halo[a])
                sl.append(slice(r0, r1))
                c0 = (s0 - r0) // stride[a]
                n = math.ceil((s1 - lo[a]) / stride[a]) - (s0 - lo[a]) // stride[a]
                crop.append((c0, c0 + n))
                oshape.append(n)
            task = dask.delayed(_predict_tile, pure=True)(x[tuple(sl)], ref_node, stats, tuple(crop))
            blocks[idx] = da.from_delayed(task, shape=(n_classes, *oshape), dtype=np.float32)
    # da.block stacks along the trailing axes: blocks are (C, z, y, x) with the grid over z, y, x
    return da.block(blocks.tolist())


# ------------------------------------------------------------------------------------ store output
def heatmap_metadata(name: str, voxel_size: float, grid: Grid, classes: Sequence[str]) -> dict:
    """NGFF 0.5 ``ome`` attributes for a ``(c, z, y, x)`` heatmap on the model grid (Å)."""
    scale = [1.0] + [float(voxel_size) * float(s) for s in grid.scale]
    trans = [0.0] + [float(voxel_size) * float(o) for o in grid.offset]
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


def _picker_sources(col: Any, picker: Any) -> dict[str, str | None]:
    path = getattr(picker, "path", None)
    return dict([file_source(col, path)]) if path is not None else {}


def _stored_heatmap(col: Any, name: str, run: str, hm: da.Array, picker: Any, params: dict, meta: dict) -> da.Array:
    """Write ``hm`` through the stage-output helper, or reuse the stored one when nothing changed."""
    sources = {**tomogram_sources(col, name), **_picker_sources(col, picker)}
    out = col.stage_output(f"{HEATMAPS}/{run}/{name}", params, sources)
    if out.reusable and "0" in col.group(out.path) and getattr(picker, "path", None) is not None:
        log.info("%s: heatmap for run %s already in the store, reusing it", name, run)
        return da.from_zarr(col.group(out.path)["0"])
    with out:
        grp = out.begin()
        chunks = (1,) + tuple(c[0] for c in hm.chunks[1:])
        write_dask(hm, grp, "0", chunks=chunks, dimension_names=("c", "z", "y", "x"))
        grp.attrs["ome"] = meta
        out.finish()
    return da.from_zarr(grp["0"])


# ------------------------------------------------------------------------------------ pick
def pick(
    col: Any,
    picker: Any,
    *,
    threshold: float | None = None,
    max_picks: int | None = 900,
    nms_distance: float | None = None,
    border: float | Sequence[float] | None = None,
    names: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    write_heatmaps: bool = True,
    tile: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    run: str | None = None,
    table: str | None = "picks",
    inflight: int | None = None,
    shape_check: bool = True,
) -> pd.DataFrame:
    """Pick particles in every tomogram of a collection.

    Parameters
    ----------
    col : Collection or path
        The collection (a path is opened).
    picker : Picker
        A trained picker (:meth:`milotile.refine.Picker.load`).
    threshold : float, optional
        Keep peaks with probability ``> threshold``. Default: the threshold validation chose for the
        checkpoint (``contract["suggested_threshold"]``, with ``val_labels``); without one, chosen
        per class from the peaks of the tomograms picked and the picker's training labels
        (:func:`milotile.refine.threshold.apply_auto_threshold`).
    max_picks : int, optional
        Top-K per tomogram and class (MiLoPYP ``--K``; its docs use 900).
    nms_distance : float, optional
        NMS radius in level-0 voxels; default half the contract ``bbox`` (:func:`decode_options`).
    border : float or (z, y, x), optional
        Level-0 margin to the volume faces; default a quarter of the contract ``bbox``.
    names : sequence of str, optional
        Subset of tomograms (default all).
    out : path, optional
        Also write the picks here (``.csv`` or parquet).
    write_heatmaps : bool
        Store heatmaps under ``derived/heatmaps/<run>/<name>`` (decoding then reads them back, so
        the network runs once even for several classes).
    tile, halo : (z, y, x), optional
        Tiling of the prediction (see :func:`predict_heatmap`).
    run : str, optional
        Heatmap run id (default the checkpoint's run folder name).
    table : str or None
        Store table name for the picks (``tables/picks.parquet``); ``None`` skips it.
    inflight : int, optional
        Tomograms predicted and decoded at the same time (each holds at most one heatmap), so the
        decoding of one overlaps the prediction of the next; default ``MILOTILE_PICK_INFLIGHT``
        (2). The table is the same, in the same order, for every value.
    shape_check : bool
        Lower the scores of peaks whose radial profile is unlike the training labels'
        (:mod:`milotile.refine.shape`; pickers trained with ``shape_check=True``, the default).
        ``False`` keeps the network's scores.

    Returns
    -------
    pandas.DataFrame
        ``tomogram, x, y, z, x_A, y_A, z_A, score, class`` in level-0 voxels / Å; with the shape
        check also ``score_model`` (the network's score) and ``shape_d2`` (distance of the peak's
        profile to the labels', about 1 for a typical labelled particle).
    """
    col = as_collection(col)
    picker = _check_picker(picker)
    contract = getattr(picker, "contract", {}) or {}
    auto = False
    if threshold is None:
        validated = contract.get("suggested_threshold")
        auto = validated is None
        threshold = float(validated) if validated is not None else AUTO_FLOOR
        log.info("score threshold %s", f"{threshold:.3g} validated with the checkpoint" if not auto
                 else "chosen from the peak scores and the training labels")
    if not 0.0 <= float(threshold) < 1.0:
        raise InputError(f"threshold must be in [0, 1), got {threshold}")
    known = col.names
    names = list(known) if names is None else [str(n) for n in names]
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        raise InputError(f"Tomogram(s) {', '.join(map(repr, unknown[:5]))} are not in the collection {col.path}.")
    if not names:
        raise InputError(f"The collection {col.path} holds no tomograms to pick.")
    nms, border = decode_options(contract, nms_distance=nms_distance, border=border)
    classes = list(getattr(picker, "classes", None) or contract.get("classes") or ["particle"])
    grid = picker_grid(contract)
    run = run or _run_id(picker)
    sources = dict(_picker_sources(col, picker))

    checked = bool(shape_check) and bool(contract.get("shape"))

    # the shape check compares every peak with all peaks of its class, so it sees them from the floor up
    floor = min(float(threshold), AUTO_FLOOR) if checked else float(threshold)

    def one(name: str) -> tuple[pd.DataFrame, dict[str, str | None]]:
        return _pick_one(col, name, picker, run, grid, classes, write_heatmaps, tile, halo,
                         {"threshold": floor, "nms_distance": nms, "max_picks": max_picks, "border": border})

    tables = []
    t0 = time.perf_counter()
    for i, (df, src) in enumerate(_in_order(one, names, _inflight(inflight)), start=1):
        tables.append(df)
        sources.update(src)
        if len(names) > 1:
            took = time.perf_counter() - t0
            log.info("picked %d/%d tomograms in %.0f s%s", i, len(names), took,
                     f", ETA {took / i * (len(names) - i):.0f} s" if i < len(names) else "")
    picks = pd.concat(tables, ignore_index=True) if any(len(d) for d in tables) else empty_picks()
    if checked and len(picks):
        picks = check_shapes(col, picks, contract)
        picks = picks[picks["score"] > float(threshold)].reset_index(drop=True)
    picks = picks[PICK_COLUMNS + [c for c in SHAPE_COLUMNS if c in picks]]
    if auto and len(picks):
        picks, info = apply_auto_threshold(picks, contract)
        picks = picks.reset_index(drop=True)
        picks.attrs["thresholds"] = info
        threshold = min((v["threshold"] for v in info.values()), default=float(threshold))
    if table:
        params = {"threshold": float(threshold), "nms_distance": nms, "border": border, "max_picks": max_picks,
                  "names": names, "checkpoint": str(getattr(picker, "path", None)), "run": run, "shape_check": checked,
                  "radius": float(contract["bbox"]) / 2 if contract.get("bbox") else None}  # level-0 voxels
        col.write_table(table, picks, params=params, sources=sources, written_only=True)
    if out is not None:
        write_picks(picks, out)
    return picks


def _inflight(value: int | None) -> int:
    """Tomograms picked at the same time: ``value`` or ``MILOTILE_PICK_INFLIGHT`` (default 2)."""
    raw = value if value is not None else os.environ.get("MILOTILE_PICK_INFLIGHT", "2")
    try:
        k = int(raw)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise InputError(f"tomograms in flight (MILOTILE_PICK_INFLIGHT / inflight) must be a positive integer, got {raw!r}")
    return k


def _in_order(fn: Any, items: Sequence[Any], k: int) -> Any:
    """Yield ``fn(item)`` in the order of ``items`` with at most ``k`` calls running (threads).

    Each call submits its own Dask computations, so the scheduler overlaps them; a result is
    yielded as soon as it and every earlier one are done, and no more than ``k`` are kept.
    """
    if k == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=k, thread_name_prefix="milotile-pick") as pool:
        pending = [pool.submit(fn, it) for it in items[:k]]
        try:
            for i in range(len(items)):
                res = pending.pop(0).result()
                if i + k < len(items):
                    pending.append(pool.submit(fn, items[i + k]))
                yield res
        finally:  # an error or an interrupt: do not start the ones still queued
            for f in pending:
                f.cancel()


def _pick_one(col: Any, name: str, picker: Any, run: str, grid: Grid, classes: list[str], write_heatmaps: bool,
              tile: Sequence[int] | None, halo: Sequence[int] | None, decode: dict) -> tuple[pd.DataFrame, dict]:
    """Predict (and store) the heatmap of one tomogram and decode it; returns its picks and sources."""
    t = col[name]
    t0 = time.perf_counter()
    hm = predict_heatmap(col, name, picker, tile=tile, halo=halo)
    if write_heatmaps:
        params = {"tile": list(tile) if tile else None, "halo": list(halo) if halo else None,
                  "tta": int((getattr(picker, "contract", None) or {}).get("tta", 1)),
                  "cpu_bf16": bool((getattr(picker, "contract", None) or {}).get("cpu_bf16", False))}
        hm = _stored_heatmap(col, name, run, hm, picker, params, heatmap_metadata(name, t.voxel_size, grid, classes))
        sources = {f"{HEATMAPS}/{run}/{name}": col.source_token(f"{HEATMAPS}/{run}/{name}")}
    else:
        sources = tomogram_sources(col, name)
    df = decode_heatmap(hm, tomogram=name, shape=t.shape, voxel_size=t.voxel_size, grid=grid, classes=classes, **decode)
    log.info("%s: %d picks in %.1f s", name, len(df), time.perf_counter() - t0)
    return df, sources


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
