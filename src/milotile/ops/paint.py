"""Painting spheres into label blocks (numpy; used chunk by chunk through ``dask.array.map_blocks``)."""

from __future__ import annotations

import numpy as np

__all__ = ["paint_spheres", "paint_block"]


def paint_spheres(
    shape: tuple[int, int, int],
    offset: tuple[int, int, int],
    centres_zyx: np.ndarray,
    radii: np.ndarray,
    values: np.ndarray,
    dtype: np.dtype | type = np.uint16,
) -> np.ndarray:
    """A label block of ``shape`` starting at voxel ``offset`` with filled spheres painted in.

    Parameters
    ----------
    shape, offset : (z, y, x)
        Block size and position of its first voxel in the whole volume.
    centres_zyx : numpy.ndarray
        ``(n, 3)`` sphere centres in volume voxels.
    radii : numpy.ndarray
        ``(n,)`` radii in voxels (a voxel is inside when its centre is within the radius).
    values : numpy.ndarray
        ``(n,)`` label values (0 leaves the background); later spheres overwrite earlier ones.
    dtype : numpy dtype
        Label dtype.

    Returns
    -------
    numpy.ndarray
        The painted block.
    """
    out = np.zeros(shape, dtype)
    off = np.asarray(offset, np.float64)
    shp = np.asarray(shape)
    c = np.asarray(centres_zyx, np.float64).reshape(-1, 3) - off
    r = np.asarray(radii, np.float64).reshape(-1)
    lo = np.floor(c - r[:, None]).astype(np.int64).clip(0, shp)
    hi = (np.ceil(c + r[:, None]).astype(np.int64) + 1).clip(0, shp)
    hit = np.flatnonzero(np.all(hi > lo, axis=1))
    for i in hit:
        (z0, y0, x0), (z1, y1, x1) = lo[i], hi[i]
        zz, yy, xx = np.ogrid[z0:z1, y0:y1, x0:x1]
        inside = (zz - c[i, 0]) ** 2 + (yy - c[i, 1]) ** 2 + (xx - c[i, 2]) ** 2 <= r[i] ** 2
        out[z0:z1, y0:y1, x0:x1][inside] = values[i]
    return out


def paint_block(
    block: np.ndarray, centres_zyx: np.ndarray, radii: np.ndarray, values: np.ndarray, block_info: dict | None = None,
) -> np.ndarray:
    """``map_blocks`` adapter: paint the spheres into a block shaped like ``block``."""
    loc = block_info[0]["array-location"] if block_info else [(0, s) for s in block.shape]
    offset = tuple(int(a) for a, _ in loc)
    return paint_spheres(block.shape, offset, centres_zyx, radii, values, dtype=block.dtype)
