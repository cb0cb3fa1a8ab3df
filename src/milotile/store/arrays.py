"""Chunk-aligned writes of dask arrays into Zarr v3, and OME-NGFF 0.5 multiscale metadata.

``dask.array.to_zarr`` does not check that dask chunks match the zarr chunks; concurrent partial
chunk writes then lose data without an error (``reference/environment.md`` §2). Every write in
milotile goes through :func:`write_dask`, which creates the array, rechunks the dask array to exactly
the zarr chunk grid and stores block by block, so each task owns whole zarr chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

log = logging.getLogger(__name__)

NGFF_VERSION = "0.5"
DEFAULT_CHUNKS = (64, 256, 256)
AXES_ZYX = ("z", "y", "x")


def clip_chunks(shape: Sequence[int], chunks: Sequence[int]) -> tuple[int, ...]:
    """Zarr chunk shape ``chunks`` clipped to ``shape`` (and at least 1)."""
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks, shape, strict=True))


def create_array(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    *,
    chunks: Sequence[int],
    dtype: Any = np.float32,
    dimension_names: Sequence[str] | None = None,
    attributes: dict | None = None,
    fill_value: Any = 0,
) -> zarr.Array:
    """Create (replacing any existing) array ``name`` in ``group``; Zstd-compressed, unsharded."""
    arr = group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        chunks=clip_chunks(shape, chunks),
        dtype=dtype,
        dimension_names=tuple(dimension_names) if dimension_names is not None else None,
        fill_value=fill_value,
        overwrite=True,
        compressors=[zarr.codecs.ZstdCodec(level=3)],
    )
    if attributes:
        arr.attrs.update(attributes)
    return arr


def write_dask(
    darr: da.Array,
    group: zarr.Group,
    name: str,
    *,
    chunks: Sequence[int] | None = None,
    dtype: Any = None,
    dimension_names: Sequence[str] | None = None,
    attributes: dict | None = None,
    compute: bool = True,
) -> zarr.Array | da.Array:
    """Write ``darr`` into a new array ``group[name]`` with dask chunks equal to the zarr chunks.

    Parameters
    ----------
    darr : dask.array.Array
        The data.
    group : zarr.Group
        Destination group (created beforehand).
    name : str
        Array name inside ``group``.
    chunks : sequence of int, optional
        Zarr chunk shape; defaults to ``(64, 256, 256)`` for 3D arrays, else the dask chunk size.
    dtype : dtype, optional
        Stored dtype (defaults to ``darr.dtype``).
    dimension_names : sequence of str, optional
        NGFF 0.5 wants them equal to the axes names.
    attributes : dict, optional
        Array attributes.
    compute : bool
        If False, return the lazy store graph instead of writing now.

    Returns
    -------
    zarr.Array or dask.array.Array
        The written array, or the lazy store result when ``compute=False``.
    """
    dtype = np.dtype(dtype or darr.dtype)
    if chunks is None:
        chunks = DEFAULT_CHUNKS if darr.ndim == 3 else tuple(c[0] for c in darr.chunks)
    zchunks = clip_chunks(darr.shape, chunks)
    target = create_array(
        group, name, darr.shape, chunks=zchunks, dtype=dtype,
        dimension_names=dimension_names, attributes=attributes,
    )
    aligned = darr.astype(dtype).rechunk(zchunks)
    _assert_aligned(aligned, zchunks)
    stored = da.store(aligned, target, lock=False, compute=False, return_stored=False)
    if not compute:
        return stored
    import dask

    dask.compute(stored)
    return target


def _assert_aligned(darr: da.Array, zchunks: Sequence[int]) -> None:
    for axis, (dchunks, zc) in enumerate(zip(darr.chunks, zchunks, strict=True)):
        # every dask chunk boundary must fall on a zarr chunk boundary
        edges = np.cumsum((0,) + tuple(dchunks))[:-1]
        if np.any(edges % zc):
            raise RuntimeError(f"dask chunks {dchunks} on axis {axis} do not align with zarr chunk {zc}")


def multiscale_metadata(
    name: str, voxel_size: float, n_levels: int, *, factor: int = 2, axis_scale: Sequence[float] = (1, 1, 1)
) -> dict:
    """The ``ome`` attribute of an NGFF 0.5 multiscale image with axes ``z, y, x`` in Å.

    Level ``i`` has scale ``voxel_size * factor**i`` (times ``axis_scale`` per axis) and a
    translation of half the extra voxel size, so that level centres overlay level 0 exactly.
    """
    datasets = []
    for level in range(n_levels):
        f = factor**level
        scale = [voxel_size * f * s for s in axis_scale]
        trans = [0.5 * voxel_size * (f - 1) * s for s in axis_scale]
        transforms: list[dict] = [{"type": "scale", "scale": scale}]
        if level:
            transforms.append({"type": "translation", "translation": trans})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in AXES_ZYX],
                "datasets": datasets,
            }
        ],
    }


def downsample_block(block: np.ndarray) -> np.ndarray:
    """Mean of 2×2×2 voxel groups of a numpy block (odd trailing voxels are dropped)."""
    z, y, x = (s // 2 for s in block.shape)
    trimmed = block[: 2 * z, : 2 * y, : 2 * x]
    return trimmed.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
