"""Distributed Gaussian and difference-of-Gaussians filters.

The Gaussian is dask-image's (:func:`gaussian`); the DoG is a plain numpy/scipy block function that
is correct on a whole volume, plus a lazy wrapper that runs it chunk by chunk through
:func:`milotile.ops.blocks.overlap_apply` with a halo derived from the kernel (``ceil(sigma * truncate)``);
:func:`gaussian_crop` is the crop-aware Gaussian the fused preprocessing pass and the DoG use. At the outer faces of the array the
block function applies the one boundary convention, :data:`milotile.ops.blocks.BOUNDARY`, so the
result equals the scipy filter run on the whole volume.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import dask.array as da
import numpy as np
from dask_image.ndfilters import gaussian_filter
from scipy import ndimage as ndi

from milotile.errors import InputError
from milotile.ops.blocks import BOUNDARY, overlap_apply

__all__ = [
    "check_sigmas",
    "dog",
    "dog_block",
    "dog_max_block",
    "gaussian",
    "gaussian_crop",
    "gaussian_halo",
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


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise InputError(f"boundary mode {mode!r} is not one of {_MODES}")
    return mode


# --------------------------------------------------------------------------- Gaussian / DoG


def gaussian(
    x: da.Array, sigma: float | Sequence[float], truncate: float = 4.0, mode: str = BOUNDARY
) -> da.Array:
    """Lazy Gaussian filter, equal to ``scipy.ndimage.gaussian_filter(x, sigma, mode=mode)``.

    Parameters are checked here; the work is ``dask_image.ndfilters.gaussian_filter`` (halo
    ``ceil(sigma * truncate)``, scipy on every block). ``benchmarks/preprocess.py`` keeps a row that
    times it next to milotile's former wrapper: identical values, 2.81 s vs 2.71 s on a
    128 x 512 x 512 volume with 2 threads (load average ~19), i.e. no reason to keep a copy.

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
    return gaussian_filter(x.astype(dtype), sig, mode=mode, truncate=truncate)


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
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
    mode: str = BOUNDARY,
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
    mode: str = BOUNDARY,
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
    mode: str = BOUNDARY,
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
    mode: str = BOUNDARY,
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
    sig = check_sigmas(sigmas)
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
