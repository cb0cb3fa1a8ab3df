"""Dask plumbing shared by every block computation: chunk grids, halo exchange, padding.

* :func:`overlap_apply` runs a numpy block function with a halo (``map_overlap(boundary="none")``):
  neighbouring chunks exchange halos, and at the outer faces of the array the block function sees
  the true array edge and applies the one boundary convention, :data:`BOUNDARY`, there. The result
  equals the scipy filter run on the whole volume with that mode.
* :func:`halo_blocks` gives one delayed halo'd block and its :class:`HaloBlock` geometry per chunk,
  for computations whose result is not an array of the chunk's shape (peak lists, moments, writes
  into a store, model predictions).
* :func:`pad_box` reads a box that may leave an array, padded with the same convention.

Boundary convention (one for all of milotile)
---------------------------------------------
Voxels outside a volume repeat the nearest edge voxel: scipy ``mode="nearest"`` in every filter,
numpy ``np.pad(mode="edge")`` wherever a box is read past the volume (training crops, patches,
tiles). A filter computed on a padded box therefore equals the whole-volume filter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from milotile.errors import InputError

__all__ = [
    "BOUNDARY",
    "NUMPY_PAD",
    "HaloBlock",
    "ensure_min_chunks",
    "halo_blocks",
    "overlap_apply",
    "pad_box",
    "regular_chunks",
]

#: scipy.ndimage boundary mode of every filter in milotile
BOUNDARY = "nearest"
#: the numpy.pad mode equal to :data:`BOUNDARY`
NUMPY_PAD = "edge"


def ensure_min_chunks(x: da.Array, depth: Sequence[int]) -> da.Array:
    """Rechunk ``x`` so that every chunk along each axis is at least ``depth`` long.

    Small chunks are **merged into their neighbour**, so every chunk still starts where one started
    before. Dask's own rule (``dask.array.overlap.ensure_minimum_chunksize``, what ``map_overlap``'s
    ``allow_rechunk`` applies) moves voxels between chunks instead, which shifts chunk starts off the
    zarr chunk grid; block writes into a store (the preprocessing stage) need the starts kept.
    Axes that already satisfy the constraint keep their chunks.
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

    Neighbouring chunks exchange halos (``boundary="none"``: at the outer faces of the array a
    block simply stops, and the block function applies :data:`BOUNDARY` there). Chunks thinner
    than ``depth`` are merged first (:func:`ensure_min_chunks`).

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
        when ``new_axis=0``). It must treat the block edges with :data:`BOUNDARY`.
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


def pad_box(region: np.ndarray, origin: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """Box ``[lo, hi)`` (global indices) of ``region`` placed at ``origin``, padded with :data:`NUMPY_PAD`.

    Voxels of the box outside ``region`` repeat its nearest edge voxel (scipy ``nearest``).
    """
    sl, pad = [], []
    for a in range(region.ndim):
        r0, r1 = int(origin[a]), int(origin[a]) + region.shape[a]
        a0 = min(max(int(lo[a]), r0), r1 - 1)
        a1 = max(min(int(hi[a]), r1), a0 + 1)
        sl.append(slice(a0 - r0, a1 - r0))
        pad.append((a0 - int(lo[a]), int(hi[a]) - a1))
    out = region[tuple(sl)]
    if any(p != (0, 0) for p in pad):
        neg = [(max(-b, 0), max(-e, 0)) for b, e in pad]  # a box entirely on one side: trim after padding
        out = np.pad(out, [(max(b, 0), max(e, 0)) for b, e in pad], mode=NUMPY_PAD)
        if any(n != (0, 0) for n in neg):
            out = out[tuple(slice(b, out.shape[i] - e) for i, (b, e) in enumerate(neg))]
    return out
