"""The one preprocessing: z compression, Gaussian, global normalisation to ``[0, 1]``.

Used by the preprocessing stage (whole volumes, lazily, before mining and patch extraction) and by
the picker's contract (one block at a time, at training and at prediction). The order is always

1. optional z compression of slice pairs (:func:`milotile.ops.resample.compress_z`);
2. optional mean binning (the stage only);
3. a Gaussian of ``gauss`` voxels of that grid (boundary :data:`milotile.ops.blocks.BOUNDARY`);
4. :func:`milotile.ops.intensity.contrast_clip` with the mean and standard deviation **of the
   filtered volume** (step 3's output over the whole tomogram, :func:`filtered_volume` +
   :func:`milotile.ops.stats.global_stats`), never of a block.

A block read with :func:`block_halo` voxels of context (and starting at an even slice when
compressing) gives, inside that halo, exactly the values of the whole-volume computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dask.array as da
import numpy as np

from milotile.errors import InputError
from milotile.ops.blocks import BOUNDARY
from milotile.ops.filters import gaussian, gaussian_crop
from milotile.ops.intensity import contrast_clip
from milotile.ops.resample import bin_volume, compress_z

__all__ = ["TRUNCATE", "block_halo", "filtered_volume", "preprocess_block"]

#: Gaussian truncation in sigmas (scipy's default)
TRUNCATE = 4.0


def block_halo(gauss: float, compress: bool = False) -> tuple[int, int, int]:
    """Level-0 voxels of context ``(z, y, x)`` a block needs so its interior is exact.

    ``ceil(4 sigma)`` voxels of the processed grid, doubled in z when slices are compressed.
    """
    h = int(math.ceil(TRUNCATE * gauss)) if gauss and gauss > 0 else 0
    return (2 * h if compress else h), h, h


def filtered_volume(
    x: da.Array, *, gauss: float = 0.0, compress: bool = False, compress_how: str = "max", binning: int = 1
) -> da.Array:
    """Steps 1–3 on a whole (lazy) level-0 volume: compression, binning, Gaussian (float32)."""
    if compress:
        x = compress_z(x, compress_how)
    if int(binning) > 1:
        x = bin_volume(x, int(binning))
    if gauss and gauss > 0:
        return gaussian(x, float(gauss), truncate=TRUNCATE, mode=BOUNDARY)
    return x.astype(np.float32)


def preprocess_block(
    raw: np.ndarray,
    *,
    mean: float,
    std: float,
    gauss: float = 0.0,
    clip: Sequence[float] = (-3.0, 3.0),
    compress: bool = False,
    compress_how: str = "max",
    quantize: bool = False,
) -> np.ndarray:
    """Steps 1, 3 and 4 on one numpy block of level-0 voxels.

    Parameters
    ----------
    raw : ndarray ``(Z, Y, X)``
        Level-0 voxels (starting at an even slice when ``compress``). Voxels within
        :func:`block_halo` of the block border see the block edge instead of the volume.
    mean, std : float
        Statistics of the *filtered* tomogram (see the module notes).
    gauss : float
        Gaussian sigma in voxels of the (compressed) grid; 0 = none.
    clip : (lo, hi)
        Clip range in standard deviations.
    compress, compress_how
        Combine slice pairs first (``"max"`` as MiLoPYP, or ``"mean"``).
    quantize : bool
        Round to 256 grey levels like MiLoPYP's uint8 step.

    Returns
    -------
    numpy.ndarray
        float32 ``(Z or ceil(Z/2), Y, X)`` in ``[0, 1]``.
    """
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim != 3:
        raise InputError(f"expected a (Z, Y, X) block, got shape {x.shape}.")
    if compress:
        x = compress_z(x, compress_how)
    if gauss and gauss > 0:
        x = gaussian_crop(x, float(gauss), None, truncate=TRUNCATE, mode=BOUNDARY)
    y = contrast_clip(x, float(mean), float(std), float(clip[0]), float(clip[1]), quantize=quantize)
    return np.ascontiguousarray(y, dtype=np.float32)
