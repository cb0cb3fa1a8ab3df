"""``patches``: cut a patch bank for a coordinate table into ``patches/<key>/`` of the store.

Bank layout (read by the exploration stage)::

    patches/<key>/data   (N, S, C, bbox, bbox) float32, zarr chunks (chunk_n, S, C, bbox, bbox)
                         S = 1 + number of neighbour shifts (index 0 = original);
                         C = channels in the order of the modes (cube: bbox channels, tilthalves 2)
    attrs["milotile"]["params"] = {modes, bbox, shifts, normalize, tilt_window, tilt_sign (per
                         tomogram), geometry (per tomogram), source table, preprocess params, complete}
    tables/patches-<key>.parquet   the source rows in bank order, plus patch_index, source_index, clipped

Rows are grouped by tomogram and by volume chunk so that each task reads one small region; the
table says which source row each bank row is. Volume modes are cut from the preprocessed volume
(``derived/preprocessed``) when it exists, the tilt sums (``tiltsum``, ``tilthalves``) from the
preprocessed tilt series.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.ops.geometry import TiltGeometry
from milotile.ops.geometry import tilt_window as tilts_in_window
from milotile.ops.grid import Grid
from milotile.ops.patches import MILOPYP_SHIFTS, TILT_MODES, n_channels
from milotile.ops.patches import extract_patches as extract_ops
from milotile.ops.tilt_check import check_tilt_geometry
from milotile.stages.preprocess import (
    PREPROCESSED,
    PREPROCESSED_TILTS,
    preprocessed_volume,
    tilt_sources,
    tomogram_sources,
)
from milotile.store import write_dask

__all__ = ["extract_patches", "patch_key", "DEFAULT_TILT_WINDOW"]

#: tilt angles (degrees) summed by the tilt-sum patch modes by default (MiLoPYP: ±20°)
DEFAULT_TILT_WINDOW = (-60.0, 60.0)

logger = logging.getLogger(__name__)


def patch_key(table: str, modes: Sequence[str], bbox: int, shifts: bool) -> str:
    """Default bank key, e.g. ``candidates-slab-b36`` (``-shifts`` when shifted copies are stored)."""
    return f"{table}-{'+'.join(modes)}-b{int(bbox)}" + ("-shifts" if shifts else "")


def _table_fingerprint(df: pd.DataFrame) -> str:
    cols = [c for c in ("tomogram", "x", "y", "z") if c in df.columns]
    return f"{len(df)}:{int(pd.util.hash_pandas_object(df[cols], index=False).sum()) & 0xFFFFFFFFFFFF:x}"


def _tilt_geometry(col: Any, name: str, window: tuple[float, float], sources: dict) -> TiltGeometry:
    t = col[name]
    ts = t.tilt_series
    if ts is None:
        raise InputError(f"tomogram {name} has no tilt series in {col.url}; modes {'/'.join(TILT_MODES)} need one (ingest it with its .tlt)")
    path = f"{PREPROCESSED_TILTS}/{name}"
    g = col.group(path)
    if g is not None and "0" in g and col.output_status(path) == "complete":
        data = da.from_zarr(g["0"])
        sources[path] = col.source_token(path)
    else:
        data = ts.data
        sources.update(tilt_sources(col, name))
    return TiltGeometry(
        data=data, angles=ts.angles, full_shape=t.shape, tilt_axis_angle=ts.tilt_axis_angle,
        pixel_ratio=t.voxel_size / ts.pixel_size, window=window,
    )


def _check_tilt_window(col: Any, names: Sequence[str], ms: Sequence[str], window: tuple[float, float]) -> None:
    """Every tomogram has enough tilts inside ``window`` (``tilthalves`` needs 2, one per half)."""
    need = 2 if "tilthalves" in ms else 1
    for name in names:
        try:
            n = len(tilts_in_window(col[name].tilt_series.angles, *window))
        except ValueError as exc:
            raise InputError(f"tomogram {name}: {exc}") from None
        if n < need:
            raise InputError(f"tomogram {name}: mode 'tilthalves' needs at least 2 tilts inside the window "
                             f"[{window[0]:g}, {window[1]:g}] degrees, found {n}")


def _geometry_check(col: Any, name: str, geom: TiltGeometry, min_correlation: float) -> dict:
    t = col[name]
    level = max(t.levels)
    grid = Grid.binned(2**level)
    ts = t.tilt_series
    raw = TiltGeometry(ts.data, ts.angles, t.shape, ts.tilt_axis_angle, 1, geom.pixel_ratio)
    return check_tilt_geometry(t.data(level), raw, grid=grid, name=name, min_correlation=min_correlation)


def extract_patches(
    col: Any,
    *,
    table: str = "candidates",
    bbox: int = 36,
    modes: Sequence[str] | str = ("slab",),
    shifts: bool | Sequence[Sequence[int]] = False,
    normalize: str | None = "minmax",
    tilt_window: tuple[float, float] = DEFAULT_TILT_WINDOW,
    tilt_sign: str | int = "auto",
    min_correlation: float = 0.3,
    out_of_bounds: str = "pad",
    chunk_n: int = 256,
    key: str | None = None,
    overwrite: bool = False,
) -> str:
    """Extract patches for the rows of ``tables/<table>.parquet`` into a bank; returns its key.

    Parameters
    ----------
    col : milotile.store.Collection
        The collection.
    table : str
        Coordinate table (columns ``tomogram, x, y, z`` in full-resolution voxels).
    bbox : int
        Patch side.
    modes : sequence of {"slab", "slice", "cube", "tiltsum", "tilthalves"} or comma-separated str
        Channels (2d3d: ``("tilthalves", "slice")``, or MiLoPYP's ``("tiltsum", "slice")``).
    shifts : bool or sequence of (dx, dy, dz)
        Neighbour-shifted copies (``True``: MiLoPYP's four).
    normalize : {"minmax", None}
        Per-patch min-max to ``[0, 1]`` or raw values.
    tilt_window : (low, high)
        Tilt angles summed by ``tiltsum`` / ``tilthalves`` (degrees). Default ±60°, every tilt of a
        usual series: particles away from the patch's depth are displaced differently in every tilt and
        blur out, the particle stays registered, so a wide window separates it from the clutter above
        and below (on ``benchmarks/explore.py --preset hard`` at SNR 0.02, 5-NN species accuracy of
        the 2d3d embedding 0.87 → 0.92 → 0.94 for ±20° → ±40° → ±60°, one seed). MiLoPYP's
        hard-coded window is ±20°.
    tilt_sign : {"auto", 1, -1}
        Projection handedness; ``"auto"`` checks each tomogram against its tilt series.
    min_correlation : float
        Geometry check: below this for both signs the tilt series is rejected.
    out_of_bounds : {"pad", "drop"}
        Reflect-pad and flag, or drop rows whose patches leave the volume.
    chunk_n : int
        Rows per task and per zarr chunk.
    key : str, optional
        Bank name (default :func:`patch_key`).
    overwrite : bool
        Recompute even if a bank with the same parameters exists.

    Returns
    -------
    str
        The bank key: data at ``patches/<key>/data``, rows in ``tables/patches-<key>.parquet``.
    """
    ms = tuple(m.strip() for m in modes.split(",")) if isinstance(modes, str) else tuple(modes)
    sign_opt = str(tilt_sign).lower()
    if sign_opt not in ("auto", "1", "-1", "+1"):
        raise InputError(f"tilt_sign must be 'auto', 1 or -1, got {tilt_sign!r}")
    if chunk_n < 1:
        raise InputError(f"chunk_n must be positive, got {chunk_n}")
    df = col.read_table(table)
    missing = [c for c in ("tomogram", "x", "y", "z") if c not in df.columns]
    if missing:
        raise InputError(f"table {table!r} lacks the columns {missing}")
    if df[["x", "y", "z"]].isna().any().any():
        raise InputError(f"table {table!r} has NaN coordinates (row {int(np.flatnonzero(df[['x', 'y', 'z']].isna().any(axis=1))[0])})")
    unknown = sorted(set(df["tomogram"].astype(str)) - set(col.names))
    if unknown:
        raise InputError(f"table {table!r} names tomograms not in the store: {unknown[:5]}")
    shift_list = [list(s) for s in (MILOPYP_SHIFTS if shifts is True else (shifts or []))]
    key = key or patch_key(table, ms, bbox, bool(shift_list))
    params: dict[str, Any] = {
        "modes": list(ms), "bbox": int(bbox), "shifts": shift_list, "normalize": normalize,
        "tilt_window": [float(v) for v in tilt_window], "tilt_sign_option": sign_opt, "out_of_bounds": out_of_bounds,
        "min_correlation": float(min_correlation),
        "source_table": table, "source_fingerprint": _table_fingerprint(df), "chunk_n": int(chunk_n),
    }
    mining = col.table_params(table)
    if mining.get("dog") is not None:  # the DoG sigmas travel on into the exploration model's contract
        params["dog"] = mining["dog"]
    names = [n for n in col.names if n in set(df["tomogram"].astype(str))]
    tilts = any(m in TILT_MODES for m in ms)
    sources = _sources(col, table, names, tilts)
    _check_bbox(col, names, int(bbox))
    if tilts:  # before the bank is marked incomplete: a bad window must not touch a bank already written
        _check_tilt_window(col, names, ms, tuple(tilt_window))
    so = col.stage_output(f"patches/{key}", params, sources)
    if not overwrite and so.reusable and col.has_table(f"patches-{key}"):
        logger.info("patches %s: unchanged, reusing", key)
        return key
    with so:
        so.begin()
        _write_bank(col, so, df, names, ms, key, params)
    return key


def _check_bbox(col: Any, names: Sequence[str], bbox: int) -> None:
    """Refuse a patch side below 2 or larger than a tomogram's y/x extent (level-0 shape: no extra store reads)."""
    if bbox < 2:
        raise InputError(f"--bbox must be at least 2 voxels, got {bbox}")
    for name in names:
        shape = tuple(col[name].shape)
        if bbox > min(shape[1], shape[2]):
            raise InputError(
                f"--bbox {bbox} is larger than tomogram {name} ({shape[1]} x {shape[2]} voxels in y, x); "
                f"choose a patch side up to {min(shape[1], shape[2])}"
            )


def _sources(col: Any, table: str, names: Sequence[str], tilts: bool) -> dict[str, str | None]:
    """What a bank depends on: the coordinate table, the (preprocessed) volumes and tilt series."""
    out: dict[str, str | None] = {f"tables/{table}": col.source_token(f"tables/{table}")}
    for name in names:
        if preprocessed_volume(col, name) is not None:
            out[f"{PREPROCESSED}/{name}"] = col.source_token(f"{PREPROCESSED}/{name}")
        else:
            out.update(tomogram_sources(col, name))
        if tilts:
            _tilt_geometry(col, name, (-90.0, 90.0), out)
    return out


def _write_bank(col: Any, so: Any, df: pd.DataFrame, names: Sequence[str], ms: tuple[str, ...], key: str,
                params: dict) -> None:
    bbox, shift_list, chunk_n = params["bbox"], params["shifts"], params["chunk_n"]
    normalize, sign_opt, tilt_window = params["normalize"], params["tilt_sign_option"], params["tilt_window"]
    n_s = 1 + len(shift_list)

    pieces, rows = [], []
    signs, geometry, pre_params = {}, {}, {}
    for name in names:
        sub = df[df["tomogram"].astype(str) == name]
        pre = preprocessed_volume(col, name)
        if pre is None:
            vol, grid = col[name].data(0), Grid()
            pre_params[name] = None
        else:
            vol, grid, meta = pre
            pre_params[name] = meta.get("params")
        geom = None
        if any(m in TILT_MODES for m in ms):
            geom = _tilt_geometry(col, name, tuple(tilt_window), {})
            if sign_opt == "auto":
                info = _geometry_check(col, name, geom, params["min_correlation"])
                geom.sign = info["sign"]
                geometry[name] = info
            else:
                geom.sign = int(sign_opt)
            signs[name] = geom.sign
        res = extract_ops(
            vol, sub[["x", "y", "z"]].to_numpy(np.float64), bbox, ms, grid=grid, shifts=shift_list,
            normalize=normalize, tilts=geom, chunk_n=chunk_n, out_of_bounds=params["out_of_bounds"],
        )
        part = sub.iloc[res.order].copy()
        part["source_index"] = sub.index.to_numpy()[res.order]
        part["clipped"] = res.clipped
        rows.append(part)
        pieces.append(res.data)
        logger.info("patches %s: %d rows (%d clipped)", name, len(part), int(res.clipped.sum()))
    n_c = n_channels(ms, bbox)
    if pieces:
        data = da.concatenate(pieces, axis=0)
        out = pd.concat(rows, ignore_index=True)
    else:
        data = da.zeros((0, n_s, n_c, bbox, bbox), np.float32, chunks=(1, n_s, n_c, bbox, bbox))
        out = df.iloc[:0].assign(source_index=pd.Series(dtype=np.int64), clipped=pd.Series(dtype=bool))
    out["patch_index"] = np.arange(len(out), dtype=np.int64)
    write_dask(data, so.node, "data", chunks=(max(1, min(chunk_n, max(len(out), 1))), n_s, n_c, int(bbox), int(bbox)))
    col.write_table(f"patches-{key}", out.reset_index(drop=True), sources={f"patches/{key}": so.token},
                    written_only=True)
    so.finish(tilt_sign=signs, geometry=geometry, preprocess=pre_params, n=len(out))
    col.consolidate(written_only=True)  # the bank's complete flag, for remote readers
    logger.info("patches %s: bank %s written", key, tuple(data.shape))
