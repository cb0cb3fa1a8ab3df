"""Global statistics of volumes, computed chunk by chunk: the one moments accumulator.

Each block gives ``[n, mean, M2]`` of its finite values (float64, :func:`block_moments`); the
driver merges them pairwise (Chan et al., :func:`merge_moments`), which is numerically stable and
never normalises per chunk. Ingest, the preprocessing stage and the picker's statistics all use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np

from milotile.errors import InputError

__all__ = ["block_moments", "merge_moments", "global_stats", "moments_to_stats"]


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
    return moments_to_stats(*merge_moments(parts))




def moments_to_stats(n: float, mean: float, var: float) -> tuple[float, float]:
    """``(mean, std)`` from merged moments; InputError when no finite value was seen."""
    if n == 0:
        raise InputError("the volume holds no finite value (all NaN or empty)")
    return float(mean), float(math.sqrt(max(var, 0.0)))
