"""Distributed volume filters: Gaussian, DoG, global statistics, contrast clip, z compression, binning.

Every filter follows the same shape: a plain numpy/scipy block function that is correct on a whole
volume, plus a lazy dask wrapper that runs it chunk by chunk through :func:`overlap_apply` with a
halo derived from the kernel (``ceil(sigma * truncate)`` for Gaussians). Computations whose result is
not an array of the chunk's shape (peak lists, moments, writes into a store) use
:func:`halo_blocks`, the same halo exchange with one delayed block and its :class:`HaloBlock`
geometry per chunk.

Boundary handling
-----------------
:func:`overlap_apply` uses ``map_overlap(boundary="none")``: neighbouring chunks exchange halos,
and at the outer faces of the array the block function sees the true array edge and applies its own
scipy ``mode`` there. The result therefore equals the scipy filter run on the whole volume with the
same ``mode`` (``"nearest"`` or ``"reflect"``), with the fewest tasks (no padded boundary chunks).

Normalisation (MiLoPYP §1.2–1.3)
--------------------------------
MiLoPYP z-scores a whole tomogram, clips to ``[-3, 3]`` standard deviations, quantises to 8 bits and
min-max scales to ``[0, 1]``. Here :func:`global_stats` computes the global mean and standard
deviation in one distributed pass (float64 accumulation, pairwise merge of per-chunk moments — never
per-chunk normalisation) and :func:`contrast_clip` applies the clip and the linear map to ``[0, 1]``
(optionally with the 8-bit rounding). The final MiLoPYP min-max is the identity whenever the data
reach both clip limits, which is the case for any real tomogram, so it is not repeated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from milotile.errors import InputError

__all__ = [
    "gaussian",
    "gaussian_block",
    "gaussian_crop",
    "dog",
    "dog_block",
    "dog_max_block",
    "global_stats",
    "block_moments",
    "merge_moments",
    "contrast_clip",
    "compress_z",
    "bin_volume",
    "gaussian_halo",
    "overlap_apply",
    "ensure_min_chunks",
    "HaloBlock",
    "halo_blocks",
    "regular_chunks",
]

logger = logging.getLogger(__name__)

_MODES = ("nearest", "reflect")


# --------------------------------------------------------------------------- helpers


def _sigma_tuple(sigma: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if np.isscalar(sigma):
        sig = (float(sigma),) * ndim  # type: ignore[arg-type]
    else:
        sig = tuple(float(s) for s in sigma)  # type: ignore[union-attr]
        if len(sig) != ndim:
            raise InputError(f"sigma {sigma!r} must be one number or one per axis ({ndim} axes)")
    if any((not math.isfinite(s)) or s < 0 for s in sig):
        raise InputError(f"sigma must be finite and >= 0, got {sigma!r}")
    return sig


def gaussian_halo(sigma: float | Sequence[float], ndim: int, truncate: float = 4.0) -> tuple[int, ...]:
    """Halo (voxels per axis) a Gaussian of ``sigma`` needs: ``ceil(sigma * truncate)``.

    This is never smaller than scipy's kernel radius ``int(truncate * sigma + 0.5)``.
    """
    return tuple(int(math.ceil(s * truncate)) for s in _sigma_tuple(sigma, ndim))


def ensure_min_chunks(x: da.Array, depth: Sequence[int]) -> da.Array:
    """Rechunk ``x`` so that every chunk along each axis is at least ``depth`` long.

    Small trailing chunks are merged into their neighbour; axes that already satisfy the
    constraint keep their chunks.
    """
    new_chunks: list[tuple[int, ...]] = []
    changed = False
    for ax, d in enumerate(depth):
        chunks = list(x.chunks[ax])
        if d <= 0 or min(chunks) >= d or len(chunks) == 1:
            new_chunks.append(tuple(chunks))
            continue
        merged: list[int] = []
        for c in chunks:
            if merged and merged[-1] < d:
                merged[-1] += c
            else:
                merged.append(c)
        if len(merged) > 1 and merged[-1] < d:
            last = merged.pop()
            merged[-1] += last
        new_chunks.append(tuple(merged))
        changed = True
    return x.rechunk(tuple(new_chunks)) if changed else x


def regular_chunks(x: da.Array, chunks: Sequence[int]) -> da.Array:
    """Rechunk ``x`` to the regular grid ``chunks`` (clipped to the shape; ``-1`` = whole axis).

    Dask only rechunks (a cheap concatenate / split per block) where the grid differs.
    """
    if len(chunks) != x.ndim:
        raise InputError(f"block shape {tuple(chunks)} must have one size per axis ({x.ndim})")
    want = tuple(
        int(n) if int(c) in (-1, 0) or int(c) >= n else max(1, int(c)) for c, n in zip(chunks, x.shape, strict=True)
    )
    if all(max(c) == w and all(v == w for v in c[:-1]) for c, w in zip(x.chunks, want, strict=True)):
        return x
    return x.rechunk(want)


@dataclass(frozen=True)
class HaloBlock:
    """Where one chunk of an array sits inside its halo'd block (see :func:`halo_blocks`).

    Attributes
    ----------
    index : tuple of int
        Block index in the chunk grid.
    origin : tuple of int
        Global voxel index of the halo'd block's first voxel.
    interior : tuple of (int, int)
        The chunk itself as ``(lo, hi)`` per axis, in coordinates of the halo'd block.
    """

    index: tuple[int, ...]
    origin: tuple[int, ...]
    interior: tuple[tuple[int, int], ...]

    @property
    def location(self) -> tuple[slice, ...]:
        """The chunk as global slices (where a block function writes its result)."""
        return tuple(slice(o + lo, o + hi) for o, (lo, hi) in zip(self.origin, self.interior, strict=True))


def halo_blocks(x: da.Array, depth: Sequence[int]) -> tuple[da.Array, list[tuple[Any, HaloBlock]]]:
    """Every chunk of ``x`` with a halo of ``depth`` voxels, as one delayed object per chunk.

    This is the plumbing shared by all block computations that do not return an array of the
    chunk's shape (peak lists, statistics, writes into a store): neighbouring chunks exchange
    halos (``boundary="none"``: at the outer faces of the array a block simply stops, and the
    block function applies its own boundary mode there). Chunks thinner than ``depth`` are merged
    first (:func:`ensure_min_chunks`).

    Parameters
    ----------
    x : dask.array.Array
        Input array.
    depth : sequence of int
        Halo per axis.

    Returns
    -------
    (x, blocks)
        ``x`` after :func:`ensure_min_chunks`, and ``[(delayed_block, HaloBlock), ...]`` in
        C order of the chunk grid.
    """
    depth = tuple(int(d) for d in depth)
    x = ensure_min_chunks(x, depth)
    g = da.overlap.overlap(x, depth=dict(enumerate(depth)), boundary="none") if any(depth) else x
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in x.chunks]
    delayed = g.to_delayed()
    out = []
    for idx in np.ndindex(*x.numblocks):
        origin, interior = [], []
        for a in range(x.ndim):
            before = depth[a] if idx[a] > 0 else 0
            origin.append(int(starts[a][idx[a]]) - before)
            interior.append((before, before + int(x.chunks[a][idx[a]])))
        out.append((delayed[idx], HaloBlock(tuple(int(i) for i in idx), tuple(origin), tuple(interior))))
    return x, out


def overlap_apply(
    fn: Callable[..., np.ndarray],
    x: da.Array,
    depth: Sequence[int],
    *,
    dtype: Any = None,
    new_axis: int | None = None,
    new_axis_len: int | None = None,
    **kwargs: Any,
) -> da.Array:
    """Run a numpy block function over ``x`` with a halo (the shared ``map_overlap`` plumbing).

    Parameters
    ----------
    fn : callable
        ``fn(block, **kwargs) -> ndarray`` of the block's shape (or with one extra leading axis
        when ``new_axis=0``). It must treat the block edges with its own scipy ``mode``.
    x : dask.array.Array
        Input array.
    depth : sequence of int
        Halo per axis.
    dtype : dtype, optional
        Output dtype (defaults to ``x.dtype``).
    new_axis, new_axis_len : int, optional
        Set ``new_axis=0`` and its length when ``fn`` returns a leading extra axis (e.g. DoG levels).

    Returns
    -------
    dask.array.Array
        Lazy result; the chunks of ``x`` (after :func:`ensure_min_chunks`) are kept.
    """
    depth = tuple(int(d) for d in depth)
    x = ensure_min_chunks(x, depth)
    dtype = x.dtype if dtype is None else np.dtype(dtype)
    if new_axis is None:
        return x.map_overlap(
            fn, depth=dict(enumerate(depth)), boundary="none", dtype=dtype, meta=np.empty((0,) * x.ndim, dtype), **kwargs
        )
    if new_axis != 0 or new_axis_len is None:
        raise ValueError("only a leading new axis with a known length is supported")
    n = int(new_axis_len)
    # map_overlap cannot trim a block with an extra axis, so overlap/trim explicitly.
    g = da.overlap.overlap(x, depth=dict(enumerate(depth)), boundary="none")
    chunks = ((n,),) + g.chunks
    y = g.map_blocks(fn, dtype=dtype, chunks=chunks, new_axis=0, meta=np.empty((0,) * (x.ndim + 1), dtype), **kwargs)
    return da.overlap.trim_internal(y, {0: 0, **{i + 1: d for i, d in enumerate(depth)}}, boundary="none")


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise InputError(f"boundary mode {mode!r} is not one of {_MODES}")
    return mode


# --------------------------------------------------------------------------- Gaussian / DoG


def gaussian_block(block: np.ndarray, sigma: Sequence[float], truncate: float = 4.0, mode: str = "nearest") -> np.ndarray:
    """Gaussian filter of one numpy block (float32 out for float input)."""
    out_dtype = block.dtype if np.issubdtype(block.dtype, np.floating) else np.float32
    return ndi.gaussian_filter(block.astype(out_dtype, copy=False), sigma=sigma, truncate=truncate, mode=mode)


def gaussian(
    x: da.Array, sigma: float | Sequence[float], truncate: float = 4.0, mode: str = "nearest"
) -> da.Array:
    """Lazy Gaussian filter, equal to ``scipy.ndimage.gaussian_filter(x, sigma, mode=mode)``.

    Parameters
    ----------
    x : dask.array.Array
        Input volume (any float dtype; integer input is filtered in float32).
    sigma : float or sequence of float
        Standard deviation in voxels, one value or one per axis (0 leaves an axis unfiltered).
    truncate : float
        Kernel radius in standard deviations; the halo is ``ceil(sigma * truncate)``.
    mode : {"nearest", "reflect"}
        Boundary handling at the outer faces of the array.

    Returns
    -------
    dask.array.Array
        Filtered volume, same shape and chunks.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> x = da.from_array(np.random.default_rng(0).random((20, 20, 20), dtype=np.float32), chunks=10)
    >>> gaussian(x, 1.0).shape
    (20, 20, 20)
    """
    sig = _sigma_tuple(sigma, x.ndim)
    _check_mode(mode)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    if all(s == 0 for s in sig):
        return x.astype(dtype)
    return overlap_apply(
        gaussian_block, x, gaussian_halo(sig, x.ndim, truncate), dtype=dtype, sigma=sig, truncate=truncate, mode=mode
    )


def _check_sigmas(sigmas: Sequence[float]) -> list[float]:
    sig = [float(s) for s in sigmas]
    if len(sig) < 2:
        raise InputError(f"a DoG needs at least two sigmas, got {list(sigmas)!r}")
    if any((not math.isfinite(s)) or s <= 0 for s in sig) or any(b <= a for a, b in zip(sig, sig[1:], strict=False)):
        raise InputError(f"DoG sigmas must be positive and strictly increasing, got {list(sigmas)!r}")
    return sig


def gaussian_crop(
    block: np.ndarray,
    sigma: float | Sequence[float],
    crop: Sequence[tuple[int, int]] | None = None,
    truncate: float = 4.0,
    mode: str = "nearest",
) -> np.ndarray:
    """Gaussian of a block, returning only the window ``crop`` (``(lo, hi)`` per axis).

    The input is first cut to the window plus scipy's kernel radius ``int(truncate * sigma + 0.5)``
    on every axis (voxels farther away cannot reach the window), then the separable passes run axis
    by axis and each axis is cropped right after its own pass, so the halo costs work only on the
    axes still to be filtered. The values equal ``gaussian_filter(block)[crop]`` exactly. With a
    ``crop`` the result may be a (non-contiguous) view of the last pass's output (saves a copy).
    """
    sig = _sigma_tuple(sigma, block.ndim)
    if crop is not None:
        cut, inner = [], []
        for ax in range(block.ndim):
            r = int(truncate * sig[ax] + 0.5) if sig[ax] > 0 else 0
            lo, hi = int(crop[ax][0]), int(crop[ax][1])
            a, b = max(lo - r, 0), min(hi + r, block.shape[ax])
            cut.append(slice(a, b))
            inner.append((lo - a, hi - a))
        block, crop = block[tuple(cut)], inner
    out = block.astype(np.float32, copy=False)
    for ax in range(block.ndim):
        if sig[ax] > 0:
            out = ndi.gaussian_filter1d(out, sig[ax], axis=ax, truncate=truncate, mode=mode)
        if crop is not None:
            sl = [slice(None)] * block.ndim
            sl[ax] = slice(*crop[ax])
            out = out[tuple(sl)]
    return out if crop is not None else np.ascontiguousarray(out)


def dog_block(
    block: np.ndarray,
    sigmas: Sequence[float],
    invert: bool = False,
    truncate: float = 4.0,
    mode: str = "nearest",
    crop: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """DoG levels of one numpy block, shape ``(len(sigmas) - 1, *window)`` float32.

    Level ``i`` is ``G(sigmas[i+1]) - G(sigmas[i])`` (larger blur minus smaller blur), which is
    positive at the centre of dark blobs; ``invert=True`` negates it for bright blobs. ``crop``
    (``(lo, hi)`` per axis) returns only that window of the block (see :func:`gaussian_crop`).
    """
    levels = None
    for i, level in enumerate(_dog_levels(block, sigmas, invert, truncate, mode, crop)):
        if levels is None:
            levels = np.empty((len(sigmas) - 1, *level.shape), dtype=np.float32)
        levels[i] = level
    assert levels is not None
    return levels


def _dog_levels(
    block: np.ndarray,
    sigmas: Sequence[float],
    invert: bool,
    truncate: float,
    mode: str,
    crop: Sequence[tuple[int, int]] | None,
):
    """Yield the DoG levels one by one, holding at most two blurred copies at a time."""
    b = block.astype(np.float32, copy=False)
    prev = gaussian_crop(b, sigmas[0], crop, truncate=truncate, mode=mode)
    for i in range(1, len(sigmas)):
        cur = gaussian_crop(b, sigmas[i], crop, truncate=truncate, mode=mode)
        last = i == len(sigmas) - 1
        level = np.subtract(cur, prev, out=cur) if last else cur - prev
        if invert:
            np.negative(level, out=level)
        prev = cur
        yield level


def dog_max_block(
    block: np.ndarray,
    sigmas: Sequence[float],
    invert: bool = False,
    truncate: float = 4.0,
    mode: str = "nearest",
    crop: Sequence[tuple[int, int]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Maximum over the DoG levels of a block (window ``crop``) and the index of the winning level.

    Equal to ``levels.max(0)`` and ``levels.argmax(0)`` of :func:`dog_block` (ties keep the lower
    level), computed level by level so that no stack of all levels is ever held in memory.
    """
    score = lvl = None
    for i, level in enumerate(_dog_levels(block, sigmas, invert, truncate, mode, crop)):
        if score is None:
            score, lvl = level, np.zeros(level.shape, dtype=np.int16)
            continue
        better = level > score
        np.copyto(score, level, where=better)
        lvl[better] = i
    assert score is not None and lvl is not None
    return score, lvl


def dog(
    x: da.Array,
    sigmas: Sequence[float],
    invert: bool = False,
    truncate: float = 4.0,
    mode: str = "nearest",
) -> da.Array:
    """Lazy difference-of-Gaussians pyramid with a leading level axis.

    Parameters
    ----------
    x : dask.array.Array
        Input volume ``(z, y, x)``.
    sigmas : sequence of float
        Strictly increasing sigmas (voxels); ``len(sigmas) - 1`` levels.
    invert : bool
        ``False``: dark blobs positive (MiLoPYP). ``True``: bright blobs positive.
    truncate, mode
        As in :func:`gaussian`.

    Returns
    -------
    dask.array.Array
        ``(n_levels, z, y, x)`` float32; level ``i`` = ``G(sigmas[i+1]) - G(sigmas[i])``.
    """
    sig = _check_sigmas(sigmas)
    _check_mode(mode)
    depth = gaussian_halo(sig[-1], x.ndim, truncate)
    return overlap_apply(
        dog_block,
        x,
        depth,
        dtype=np.float32,
        new_axis=0,
        new_axis_len=len(sig) - 1,
        sigmas=tuple(sig),
        invert=invert,
        truncate=truncate,
        mode=mode,
    )


# --------------------------------------------------------------------------- statistics


def block_moments(block: np.ndarray) -> np.ndarray:
    """``[n, mean, M2]`` of the finite values of a block, accumulated in float64.

    Two passes (a float64 sum, then the squared deviations from the block mean) over slabs of
    about 1 Mi voxels along the first axis, so no float64 copy of the whole block is made; the
    block may be a non-contiguous view.
    """
    b = np.asarray(block)
    if b.ndim == 0:
        b = b.reshape(1)
    if not np.isfinite(b).all():
        b = b[np.isfinite(b)]
    n = b.size
    if n == 0:
        return np.zeros(3)
    mean = float(np.add.reduce(b, axis=None, dtype=np.float64)) / n
    step = max(1, (1 << 20) // max(1, n // b.shape[0]))
    m2 = 0.0
    for i in range(0, b.shape[0], step):
        d = b[i : i + step].astype(np.float64).ravel()
        d -= mean
        m2 += float(np.dot(d, d))
    return np.array([float(n), mean, m2])


def merge_moments(parts: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """Combine per-block ``[n, mean, M2]`` (Chan et al.) into ``(n, mean, variance)``."""
    n, mean, m2 = 0.0, 0.0, 0.0
    for p in parts:
        nb, mb, m2b = (float(v) for v in p)
        if nb == 0:
            continue
        tot = n + nb
        delta = mb - mean
        mean += delta * nb / tot
        m2 += m2b + delta * delta * n * nb / tot
        n = tot
    var = m2 / n if n > 0 else float("nan")
    return n, mean, var


def global_stats(x: da.Array) -> tuple[float, float]:
    """Global mean and standard deviation of ``x`` in one distributed pass.

    Each chunk returns its count, mean and sum of squared deviations (float64); the driver merges
    them pairwise, which is numerically stable. Non-finite values are ignored.

    Returns
    -------
    (mean, std) : tuple of float

    Raises
    ------
    InputError
        If the array holds no finite value.
    """
    if isinstance(x, np.ndarray):
        parts = [block_moments(x)]
    else:
        tasks = [dask.delayed(block_moments)(b) for b in x.to_delayed().ravel()]
        parts = list(dask.compute(*tasks))
    n, mean, var = merge_moments(parts)
    if n == 0:
        raise InputError("the volume holds no finite value (all NaN or empty)")
    return float(mean), float(math.sqrt(max(var, 0.0)))


def contrast_clip(
    x: da.Array | np.ndarray,
    mean: float,
    std: float,
    lo: float = -3.0,
    hi: float = 3.0,
    quantize: bool = False,
) -> da.Array | np.ndarray:
    """MiLoPYP contrast clip: z-score, clip to ``[lo, hi]`` std, map linearly to ``[0, 1]``.

    Parameters
    ----------
    x : dask or numpy array
        Values (elementwise; works on both).
    mean, std : float
        Global statistics (see :func:`global_stats`).
    lo, hi : float
        Clip limits in standard deviations (MiLoPYP: -3, 3 after a Gaussian; -2.5, 2 for tilts).
    quantize : bool
        Round to 256 levels first, like MiLoPYP's uint8 step.

    Returns
    -------
    array of float32 in ``[0, 1]``.
    """
    if not hi > lo:
        raise InputError(f"contrast clip limits must satisfy lo < hi, got ({lo}, {hi})")
    if not (math.isfinite(std) and std > 0):
        raise InputError(f"standard deviation must be positive and finite, got {std}")
    scale = np.float32(1.0 / ((hi - lo) * std))
    offset = np.float32(mean + lo * std)
    if isinstance(x, da.Array):
        return x.map_blocks(_clip_block, offset, scale, quantize, dtype=np.float32, meta=np.empty((0,) * x.ndim, np.float32))
    return _clip_block(np.asarray(x), offset, scale, quantize)


def _clip_block(x: np.ndarray, offset: np.float32, scale: np.float32, quantize: bool) -> np.ndarray:
    """``clip((x - offset) * scale, 0, 1)`` in float32, in one output buffer (no temporaries)."""
    y = np.array(x, dtype=np.float32, copy=True)
    y -= offset
    y *= scale
    np.clip(y, np.float32(0.0), np.float32(1.0), out=y)
    if quantize:
        y *= np.float32(255.0)
        np.round(y, out=y)
        y /= np.float32(255.0)
    return y


# --------------------------------------------------------------------------- resampling


def compress_z(x: da.Array, how: str = "max") -> da.Array:
    """Combine pairs of z slices (axis 0) into one: ``out[k] = how(x[2k], x[2k+1])``.

    ``how="max"`` is what MiLoPYP does (a stride-2 max pool; nextPYP's docs call it an average);
    ``how="mean"`` averages. With an odd depth the last slice stands alone (``out[-1] = x[-1]``),
    so the depth becomes ``ceil(Z / 2)``. Output slice ``k`` is centred at full-resolution
    ``z = 2k + 0.5`` (``Z - 1`` for a lone last slice).
    """
    if how not in ("max", "mean"):
        raise InputError(f"compress mode {how!r} is not 'max' or 'mean'")
    if x.shape[0] % 2:
        x = da.concatenate([x, x[-1:]], axis=0)  # max(a, a) = mean(a, a) = a
    c0 = max(x.chunks[0])
    c0 += c0 % 2
    x = x.rechunk({0: c0})
    red = np.max if how == "max" else np.mean
    y = da.coarsen(red, x, {0: 2})
    return y.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


def bin_volume(x: da.Array, factor: int) -> da.Array:
    """Mean-bin every axis by an integer ``factor``.

    Trailing voxels that do not fill a whole bin are **trimmed** (dropped), so the shape becomes
    ``floor(n / factor)`` per axis and output voxel ``i`` is centred at full-resolution
    ``factor * i + (factor - 1) / 2``.
    """
    factor = int(factor)
    if factor < 1:
        raise InputError(f"binning factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    if any(s < factor for s in x.shape):
        raise InputError(f"binning factor {factor} is larger than the volume shape {x.shape}")
    trimmed = tuple(slice(0, (s // factor) * factor) for s in x.shape)
    x = x[trimmed]
    x = x.rechunk(tuple(max(factor, int(math.ceil(max(c) / factor)) * factor) for c in x.chunks))
    y = da.coarsen(np.mean, x, {i: factor for i in range(x.ndim)})
    return y.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)
