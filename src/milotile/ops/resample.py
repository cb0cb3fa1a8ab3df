"""Resampling of volumes: z compression (pairs of slices) and mean binning.

The grids these produce are described by :class:`milotile.ops.grid.Grid` (``Grid.compressed``,
``Grid.binned``); both functions work on numpy and dask arrays alike, so the preprocessing stage
and a picker's per-block preprocessing share them.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from milotile.errors import InputError

__all__ = ["compress_z", "bin_volume", "COMPRESS_MODES"]

COMPRESS_MODES = ("max", "mean")


def compress_z(x: da.Array | np.ndarray, how: str = "max") -> da.Array | np.ndarray:
    """Combine pairs of z slices (axis 0) into one: ``out[k] = how(x[2k], x[2k+1])``.

    ``how="max"`` is what MiLoPYP does (a stride-2 max pool; nextPYP's docs call it an average);
    ``how="mean"`` averages. With an odd depth the last slice stands alone (``out[-1] = x[-1]``),
    so the depth becomes ``ceil(Z / 2)``. Output slice ``k`` is centred at level-0
    ``z = 2k + 0.5`` (``Grid.compressed()``; ``Z - 1`` for a lone last slice). Works on numpy
    (one block starting at an even slice) and dask arrays.
    """
    if how not in COMPRESS_MODES:
        raise InputError(f"compress mode {how!r} is not 'max' or 'mean'")
    red = np.max if how == "max" else np.mean
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    if not isinstance(x, da.Array):
        x = np.asarray(x)
        if x.shape[0] % 2:
            x = np.concatenate([x, x[-1:]], axis=0)  # max(a, a) = mean(a, a) = a
        return red(x.reshape(x.shape[0] // 2, 2, *x.shape[1:]), axis=1).astype(dtype, copy=False)
    if x.shape[0] % 2:
        x = da.concatenate([x, x[-1:]], axis=0)
    return da.coarsen(red, x, {0: 2}).astype(dtype)  # dask aligns the chunks to the factor


def bin_volume(x: da.Array, factor: int) -> da.Array:
    """Mean-bin every axis by an integer ``factor``.

    Trailing voxels that do not fill a whole bin are **trimmed** (dropped), so the shape becomes
    ``floor(n / factor)`` per axis and output voxel ``i`` is centred at level-0
    ``factor * i + (factor - 1) / 2`` (``Grid.binned(factor)``).
    """
    factor = int(factor)
    if factor < 1:
        raise InputError(f"binning factor must be a positive integer, got {factor}")
    if factor == 1:
        return x
    if any(s < factor for s in x.shape):
        raise InputError(f"binning factor {factor} is larger than the volume shape {x.shape}")
    y = da.coarsen(np.mean, x, dict.fromkeys(range(x.ndim), factor), trim_excess=True)
    return y.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)
