"""``preprocess``: Gaussian denoising, global normalisation and MiLoPYP's contrast clip, into the store.

For every tomogram ``derived/preprocessed/<name>/0`` holds (in this order) the optional z compression
and binning, a Gaussian of ``gauss`` voxels (of the processed grid, as in MiLoPYP), and the contrast
clip with the *global* mean and std of the filtered volume, giving float32 in ``[0, 1]``.

The Gaussian is computed once: pass 1 filters every chunk (with its halo), writes the filtered chunk
to a temporary uncompressed array ``_blurred`` in the output group and returns the chunk's moments
(count, mean, M2 in float64), which the driver merges into the global mean and std. Pass 2 is
elementwise: it reads ``_blurred`` chunk by chunk, applies the clip and writes ``0``; the temporary
array is then deleted. The stored values equal the whole-volume computation exactly.

``0`` is stored **without compression** (same ``(64, 256, 256)`` chunks, every dask chunk equal to
one zarr chunk, checked before writing): the filtered float32 noise compresses by only ~13 % with
Zstd, while encoding costs about 1.5 s and decoding 0.3 s of CPU per 256 MB on every later read
(mining, patch extraction) — on a CPU-bound pipeline the codec costs more than it saves. Its ``milotile`` attributes record ``params``, the ``grid`` mapping to full
resolution (``full = scale * index + offset`` per ``z, y, x``), the statistics and ``complete``.
Tilt series get a per-tilt 2D Gaussian and a per-tilt clip (MiLoPYP: ``[-2.5, 2]`` std) in
``derived/preprocessed_tilts/<name>/0``. Outputs whose parameters and source are unchanged are reused.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from milotile.errors import InputError
from milotile.ops.blocks import BOUNDARY, HaloBlock, halo_blocks, regular_chunks
from milotile.ops.filters import gaussian, gaussian_crop, gaussian_halo
from milotile.ops.grid import Grid
from milotile.ops.intensity import contrast_clip
from milotile.ops.preprocess import TRUNCATE, filtered_volume
from milotile.ops.resample import COMPRESS_MODES
from milotile.ops.stats import block_moments, global_stats, merge_moments, moments_to_stats
from milotile.store import missing_input, multiscale_metadata, write_dask
from milotile.store.arrays import DEFAULT_CHUNKS, clip_chunks
from milotile.store.ngff import grey_channel

__all__ = [
    "PREPROCESSED",
    "PREPROCESSED_TILTS",
    "blur_with_stats",
    "preprocess",
    "preprocessed_volume",
    "tilt_sources",
    "tomogram_sources",
    "volume_stats",
]

logger = logging.getLogger(__name__)

PREPROCESSED = "derived/preprocessed"
PREPROCESSED_TILTS = "derived/preprocessed_tilts"
STATS = "derived/stats"
VERSION = 2  # 2: one boundary convention, source fingerprints
TMP_ARRAY = "_blurred"


def tomogram_sources(col: Any, name: str) -> dict[str, str | None]:
    """Source record of a tomogram for :meth:`Collection.stage_output`."""
    path = f"tomograms/{name}"
    return {path: col.source_token(path)}


def tilt_sources(col: Any, name: str) -> dict[str, str | None]:
    """Source record of a tilt series for :meth:`Collection.stage_output`."""
    path = f"tilts/{name}"
    return {path: col.source_token(path)}


def preprocessed_volume(col: Any, name: str) -> tuple[da.Array, Grid, dict] | None:
    """The preprocessed volume of tomogram ``name``, its grid and attributes, or ``None``.

    ``None`` too when it is incomplete or stale (its tomogram was re-ingested since).
    """
    path = f"{PREPROCESSED}/{name}"
    g = col.group(path)
    if g is None or "0" not in g or col.output_status(path) != "complete":
        return None
    meta = dict(g.attrs["milotile"])
    return da.from_zarr(g["0"]), Grid.from_dict(meta["grid"]), meta


def volume_stats(col: Any, name: str, *, gauss: float = 0.0, compress: bool = False,
                 compress_how: str = "max") -> tuple[float, float]:
    """Mean and std of tomogram ``name`` after compression and Gaussian (the statistics the one
    preprocessing normalises with, :mod:`milotile.ops.preprocess`).

    Taken from the preprocessing stage's output when it used the same settings, from ingest's
    statistics when there is nothing to filter, else computed once (one distributed pass) and kept
    in ``derived/stats/<name>``.
    """
    t = col[name]
    if not gauss and not compress and t.meta.get("stats"):
        st = t.meta["stats"]
        return float(st["mean"]), float(st["std"])
    pre = preprocessed_volume(col, name)
    if pre is not None:
        p = pre[2]["params"]
        if (p["gauss"], p["compress"], p["bin"]) == (float(gauss), bool(compress), 1) and (
            not compress or p["compress_how"] == compress_how
        ):
            return float(pre[2]["stats"]["mean"]), float(pre[2]["stats"]["std"])
    params = {"gauss": float(gauss), "compress": bool(compress), "compress_how": compress_how, "version": VERSION}
    out = col.stage_output(f"{STATS}/{name}", params, tomogram_sources(col, name))
    if out.reusable:
        return float(out.meta["mean"]), float(out.meta["std"])
    mean, std = global_stats(filtered_volume(t.data(0), gauss=gauss, compress=compress, compress_how=compress_how))
    with out:
        out.begin()
        out.finish(mean=mean, std=std)
    return mean, std


def _check_params(gauss: float, binning: int, clip: Sequence[float], compress_how: str) -> None:
    if not (gauss >= 0):
        raise InputError(f"--gauss must be >= 0, got {gauss}")
    if int(binning) != binning or binning < 1:
        raise InputError(f"--bin must be a positive integer, got {binning}")
    if len(clip) != 2 or not clip[0] < clip[1]:
        raise InputError(f"clip must be two numbers lo < hi (standard deviations), got {tuple(clip)}")
    if compress_how not in COMPRESS_MODES:
        raise InputError(f"compress mode {compress_how!r} is not 'max' or 'mean'")


def preprocess(
    col: Any,
    gauss: float = 0.8,
    compress: bool = False,
    bin: int = 1,  # noqa: A002 - the user-facing name
    clip: Sequence[float] | None = None,
    *,
    compress_how: str = "max",
    quantize: bool = False,
    tilt_clip: Sequence[float] = (-2.5, 2.0),
    names: Sequence[str] | None = None,
    overwrite: bool = False,
    tilts: bool = True,
) -> dict[str, dict]:
    """Pre-process every tomogram (and tilt series) of a collection into the store.

    Parameters
    ----------
    col : milotile.store.Collection
        The collection.
    gauss : float
        Gaussian sigma in voxels of the processed grid (0: none).
    compress : bool
        Combine pairs of z slices (``compress_how``: ``"max"`` as MiLoPYP, or ``"mean"``).
    bin : int
        Mean-binning factor (trailing voxels that do not fill a bin are dropped).
    clip : (lo, hi), optional
        Contrast clip in standard deviations; default ``(-3, 3)``, or ``(-2.5, 2)`` when
        ``gauss == 0`` (MiLoPYP's two branches).
    compress_how : {"max", "mean"}
        How two slices are combined.
    quantize : bool
        Round to 256 grey levels like MiLoPYP's uint8 step.
    tilt_clip : (lo, hi)
        Per-tilt clip for the tilt series.
    names : sequence of str, optional
        Only these tomograms (default: all).
    overwrite : bool
        Recompute even when an output with the same parameters exists.
    tilts : bool
        Also pre-process the tilt series (needed by the ``tiltsum`` patches).

    Returns
    -------
    dict
        ``{name: attributes}`` of every preprocessed tomogram.
    """
    if clip is None:
        clip = (-3.0, 3.0) if gauss > 0 else (-2.5, 2.0)
    clip = tuple(float(c) for c in clip)
    _check_params(float(gauss), bin, clip, compress_how)
    binning = int(bin)
    names = list(names) if names is not None else col.names
    if not names:
        raise missing_input(col.url, "tomograms", "tomograms")
    out: dict[str, dict] = {}
    for name in names:
        t = col[name]
        params = {
            "gauss": float(gauss), "compress": bool(compress), "compress_how": compress_how, "bin": binning,
            "clip": list(clip), "quantize": bool(quantize), "version": VERSION,
        }
        so = col.stage_output(f"{PREPROCESSED}/{name}", params, tomogram_sources(col, name))
        if not overwrite and so.reusable:
            logger.info("preprocess %s: unchanged, reusing %s/%s", name, PREPROCESSED, name)
            out[name] = so.meta
        else:
            with so:
                out[name] = _preprocess_volume(t, so, clip)
        ts = t.tilt_series
        if ts is not None and tilts:
            _preprocess_tilts(col, name, ts, float(gauss), tuple(float(c) for c in tilt_clip), bool(quantize), overwrite)
    col.consolidate(written_only=True)  # stage end: the outputs it wrote, for remote readers
    return out


def _blur_block(block: np.ndarray, hb: HaloBlock, sigma: tuple[float, ...], target: Any) -> np.ndarray:
    """Pass 1 on one chunk: Gaussian of its interior, written to ``target``; returns its moments."""
    g = gaussian_crop(block, sigma, hb.interior, truncate=TRUNCATE, mode=BOUNDARY)
    target[hb.location] = g
    return block_moments(g)


def blur_with_stats(x: da.Array, sigma: float, target: Any) -> tuple[float, float]:
    """Write ``gaussian(x, sigma)`` into the zarr array ``target`` and return its global mean and std.

    One distributed pass: each task filters one chunk of ``x`` (plus its halo), writes it and
    returns its float64 moments, merged on the driver as in :func:`milotile.ops.filters.global_stats`.
    ``x`` is first rechunked to the chunk grid of ``target`` so that every zarr chunk is written by
    exactly one task.
    """
    sig = (float(sigma),) * x.ndim
    x = regular_chunks(x, target.chunks)
    x, blocks = halo_blocks(x, gaussian_halo(sig, x.ndim, TRUNCATE) if sigma > 0 else (0,) * x.ndim)
    for _, hb in blocks:  # merged trailing chunks are fine, misaligned starts are not
        if any(s.start % c for s, c in zip(hb.location, target.chunks, strict=True)):
            raise RuntimeError(f"block {hb.location} is not aligned with the zarr chunks {target.chunks}")
    tasks = [dask.delayed(_blur_block, pure=False)(blk, hb, sig, target) for blk, hb in blocks]
    return moments_to_stats(*merge_moments(dask.compute(*tasks)))


def _store_uncompressed(y: da.Array, group: Any, name: str, chunks: Sequence[int]) -> None:
    """Write ``y`` as an uncompressed array ``group[name]``, one dask chunk per zarr chunk."""
    target = group.create_array(
        name, shape=y.shape, chunks=tuple(chunks), dtype=np.float32, compressors=None, fill_value=0,
        dimension_names=("z", "y", "x"), overwrite=True,
    )
    y = y.astype(np.float32).rechunk(target.chunks)
    for axis, (dchunks, zc) in enumerate(zip(y.chunks, target.chunks, strict=True)):
        if any(c != zc for c in dchunks[:-1]):
            raise RuntimeError(f"dask chunks {dchunks} on axis {axis} do not align with zarr chunk {zc}")
    dask.compute(da.store(y, target, lock=False, compute=False))


def _preprocess_volume(t: Any, so: Any, clip: tuple[float, float]) -> dict:
    params = so.params
    group = so.begin()
    x = filtered_volume(t.data(0), compress=params["compress"], compress_how=params["compress_how"],
                        binning=params["bin"])  # the Gaussian is fused with the statistics below
    chunks = clip_chunks(x.shape, DEFAULT_CHUNKS)
    for key in [k for k in group.array_keys() if k.startswith(TMP_ARRAY)]:
        del group[key]  # left by a killed run (we hold the writer lock)
    tmp_name = f"{TMP_ARRAY}_{uuid.uuid4().hex[:12]}"  # unique per run: two runs never share it
    # pass 1: Gaussian + moments, into a temporary uncompressed array (cheap to write and read back)
    tmp = group.create_array(
        tmp_name, shape=x.shape, chunks=chunks, dtype=np.float32, compressors=None, fill_value=0, overwrite=True
    )
    try:
        mean, std = blur_with_stats(x, params["gauss"], tmp)
        if not std > 0:
            raise InputError(f"tomogram {t.name} is constant (std 0); it cannot be normalised")
        # pass 2: elementwise clip, chunk-aligned write of the result
        y = contrast_clip(da.from_zarr(tmp), mean, std, clip[0], clip[1], quantize=params["quantize"])
        _store_uncompressed(y, group, "0", chunks)
    finally:
        if tmp_name in group:
            del group[tmp_name]
    grid = Grid.processed(params["compress"], params["bin"])
    vs = t.voxel_size
    ome = multiscale_metadata(t.name, vs, 1, axis_scale=grid.scale)
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"].append(
        {"type": "translation", "translation": [o * vs for o in grid.offset]}
    )
    ome["omero"] = grey_channel("preprocessed", (0.0, 1.0))  # contrast-clipped to [0, 1]; napari names the layer
    group.attrs["ome"] = ome
    meta = so.finish(
        grid=grid.to_dict(), stats={"mean": mean, "std": std}, shape=list(y.shape), full_shape=list(t.shape),
        voxel_size=vs,
    )
    logger.info("preprocess %s: %s -> %s (mean %.4g, std %.4g)", t.name, t.shape, y.shape, mean, std)
    return meta


def _preprocess_tilts(col: Any, name: str, ts: Any, gauss: float, clip: tuple[float, float], quantize: bool, overwrite: bool) -> None:
    params = {"gauss": gauss, "clip": list(clip), "quantize": quantize, "version": VERSION}
    so = col.stage_output(f"{PREPROCESSED_TILTS}/{name}", params, tilt_sources(col, name))
    if not overwrite and so.reusable:
        logger.info("preprocess tilts %s: unchanged, reusing", name)
        return
    with so:
        _write_tilts(so, name, ts, gauss, clip, quantize)


def _write_tilts(so: Any, name: str, ts: Any, gauss: float, clip: tuple[float, float], quantize: bool) -> None:
    group = so.begin()
    x = ts.data
    g = gaussian(x, (0.0, gauss, gauss), truncate=TRUNCATE, mode=BOUNDARY) if gauss > 0 else x.astype(np.float32)
    g64 = g.astype(np.float64)
    mean, std = dask.compute(g64.mean(axis=(1, 2)), g64.std(axis=(1, 2)))
    if np.any(std <= 0):
        bad = int(np.flatnonzero(std <= 0)[0])
        raise InputError(f"tilt {bad} of the tilt series of {name} is constant; it cannot be normalised")
    lo, hi = clip
    off = (mean + lo * std).astype(np.float32)[:, None, None]
    scale = (1.0 / ((hi - lo) * std)).astype(np.float32)[:, None, None]
    y = ((g - off) * scale).clip(0.0, 1.0)
    if quantize:
        y = (y * np.float32(255)).round() / np.float32(255)
    zchunks = tuple(ts.array.chunks)
    write_dask(y.astype(np.float32), group, "0", chunks=zchunks)
    so.finish(angles=[float(a) for a in ts.angles], tilt_axis_angle=ts.tilt_axis_angle, pixel_size=ts.pixel_size)
    logger.info("preprocess tilts %s: %d tilts", name, ts.shape[0])
