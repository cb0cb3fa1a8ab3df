"""Per-block preprocessing of the picker: Gaussian, z-score + clip to [0, 1], optional z compression.

MiLoPYP normalised each tomogram once in RAM (Gaussian, global z-score, clip to ±3 std, quantise,
min-max to [0, 1]). Here the same mapping is applied to one block at a time with the **global**
statistics of the tomogram (mean and std of the raw level-0 voxels), so any block of any size gives
the same values as the whole-volume computation (the Gaussian needs a halo of ``gauss_halo(sigma)``
voxels, see :func:`gauss_halo`). The statistics are recomputed from each tomogram at predict time.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import dask.array as da
import numpy as np
from scipy import ndimage

from milotile.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["gauss_halo", "normalize", "compress_z", "preprocess_block", "tomogram_stats", "stored_stats", "TRUNCATE"]

#: Gaussian truncation in sigmas (scipy's default)
TRUNCATE = 4.0


def gauss_halo(sigma: float) -> int:
    """Voxels of context a Gaussian of ``sigma`` needs on each side (``ceil(4 sigma)``, 0 if off)."""
    return int(math.ceil(TRUNCATE * sigma)) if sigma and sigma > 0 else 0


def normalize(x: np.ndarray, mean: float, std: float, clip: tuple[float, float] = (-3.0, 3.0)) -> np.ndarray:
    """Map ``x`` to [0, 1]: z-score with the given global statistics, clip to ``clip`` std, rescale.

    Parameters
    ----------
    x
        Block of voxels.
    mean, std
        Global statistics of the tomogram (std > 0).
    clip
        Lower and upper bound in standard deviations.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape with values in [0, 1].
    """
    lo, hi = float(clip[0]), float(clip[1])
    if not hi > lo:
        raise InputError(f"clip range must be increasing, got {clip!r}.")
    if not (np.isfinite(std) and std > 0):
        raise InputError(f"normalisation std must be positive and finite, got {std!r}.")
    z = (np.asarray(x, dtype=np.float32) - np.float32(mean)) / np.float32(std)
    np.clip(z, lo, hi, out=z)
    z -= np.float32(lo)
    z /= np.float32(hi - lo)
    return z


def compress_z(x: np.ndarray) -> np.ndarray:
    """Maximum of consecutive slice pairs along axis 0 (MiLoPYP's ``--compress``).

    An odd depth keeps the last slice alone, so the result has ``ceil(Z / 2)`` slices. Compressed
    slice ``k`` covers level-0 slices ``2k`` and ``2k + 1`` (centre ``2k + 0.5``).
    """
    z = x.shape[0]
    even = x[: z - z % 2]
    out = np.maximum(even[0::2], even[1::2])
    if z % 2:
        out = np.concatenate([out, x[-1:]], axis=0)
    return out


def preprocess_block(
    raw: np.ndarray,
    *,
    mean: float,
    std: float,
    gauss: float = 0.0,
    clip: tuple[float, float] = (-3.0, 3.0),
    compress: bool = False,
) -> np.ndarray:
    """Gaussian (over the whole block), normalisation and optional z compression of one block.

    Parameters
    ----------
    raw
        ``(Z, Y, X)`` raw level-0 voxels. Voxels within ``gauss_halo(gauss)`` of the block border
        are affected by the block edge; callers read blocks with that halo and trim it.
    mean, std
        Global statistics of the raw tomogram.
    gauss
        Gaussian sigma in voxels (0 = none).
    clip
        Clip range in std.
    compress
        Max-pool consecutive slice pairs (output depth ``ceil(Z/2)``).

    Returns
    -------
    numpy.ndarray
        float32 ``(Z or ceil(Z/2), Y, X)`` in [0, 1].
    """
    x = np.asarray(raw, dtype=np.float32)
    if x.ndim != 3:
        raise InputError(f"expected a (Z, Y, X) block, got shape {x.shape}.")
    if gauss and gauss > 0:
        x = ndimage.gaussian_filter(x, sigma=float(gauss), mode="reflect", truncate=TRUNCATE)
    x = normalize(x, mean, std, clip)
    if compress:
        x = compress_z(x)
    return np.ascontiguousarray(x, dtype=np.float32)


def tomogram_stats(darr: da.Array, name: str = "tomogram") -> tuple[float, float]:
    """Global mean and standard deviation of a (dask) volume, computed chunk by chunk.

    Raises
    ------
    InputError
        When the statistics are not finite (NaN/inf voxels) or the volume is constant.
    """
    from milotile.ops.filters import global_stats

    mean, std = global_stats(darr)
    return _checked(float(mean), float(std), name)


def stored_stats(tomogram: Any) -> tuple[float, float]:
    """Global level-0 statistics of a store tomogram: the ones ingest recorded, else computed once."""
    st = tomogram.meta.get("stats")
    if st:
        return _checked(float(st["mean"]), float(st["std"]), tomogram.name)
    return tomogram_stats(tomogram.data(0), tomogram.name)


def _checked(mean: float, std: float, name: str) -> tuple[float, float]:
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise InputError(f"Tomogram {name!r} contains NaN or infinite voxels (mean {mean}, std {std}).")
    if std <= 0:
        raise InputError(f"Tomogram {name!r} is constant (std 0) and cannot be normalised.")
    return mean, std
