"""Intensity normalisation: the one mapping from raw values to ``[0, 1]`` (MiLoPYP §1.2–1.3).

MiLoPYP z-scores a whole tomogram, clips to ``[-3, 3]`` standard deviations, quantises to 8 bits
and min-max scales to ``[0, 1]``. :func:`contrast_clip` applies the clip and the linear map to
``[0, 1]`` with *global* statistics (:func:`milotile.ops.stats.global_stats`), optionally with the
8-bit rounding. The final MiLoPYP min-max is the identity whenever the data reach both clip limits,
which is the case for any real tomogram, so it is not repeated.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np

from milotile.errors import InputError

__all__ = ["contrast_clip"]


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


