"""A chunk-cached reader of boxes of a 3D dask/zarr volume.

:class:`VolumeReader` reads arbitrary (also out-of-volume) boxes through a small LRU cache of
decompressed storage chunks, so peak memory is ``max_chunks`` chunks whatever the tomogram size, and
neighbouring boxes cost one decompression of their shared chunks. Used by the picker's crops, its shape
check, the recentring of labels and candidates (:mod:`milotile.ops.recentre`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import dask.array as da
import numpy as np

from milotile.errors import InputError
from milotile.ops.blocks import NUMPY_PAD

__all__ = ["VolumeReader"]


class VolumeReader:
    """Read boxes of a 3D dask array chunk by chunk, with an LRU cache of decompressed chunks.

    Parameters
    ----------
    darr
        ``(Z, Y, X)`` dask array (chunks = storage chunks).
    name
        Tomogram name (for error messages).
    max_chunks
        Number of decompressed chunks kept in memory.
    """

    def __init__(self, darr: da.Array, name: str = "tomogram", max_chunks: int = 8) -> None:
        self.darr = darr
        self.name = name
        self.shape = tuple(int(s) for s in darr.shape)
        self.max_chunks = max_chunks
        self._bounds = [np.concatenate([[0], np.cumsum(c)]) for c in darr.chunks]
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # workers start with an empty cache
        return state

    def _chunk(self, key: tuple[int, int, int]) -> np.ndarray:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        block = self.darr.blocks[key].compute(scheduler="synchronous")
        block = np.asarray(block, dtype=np.float32)
        self._cache[key] = block
        while len(self._cache) > self.max_chunks:
            self._cache.popitem(last=False)
        return block

    def read_inside(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """Read ``[start, stop)`` (must lie inside the volume) as float32."""
        out = np.empty([b - a for a, b in zip(start, stop, strict=True)], dtype=np.float32)
        ranges = []
        for ax in range(3):
            bnd = self._bounds[ax]
            i0 = int(np.searchsorted(bnd, start[ax], side="right") - 1)
            i1 = int(np.searchsorted(bnd, stop[ax], side="left"))
            ranges.append(range(i0, i1))
        for i in ranges[0]:
            for j in ranges[1]:
                for k in ranges[2]:
                    key = (i, j, k)
                    c0 = [self._bounds[a][key[a]] for a in range(3)]
                    c1 = [self._bounds[a][key[a] + 1] for a in range(3)]
                    lo = [max(start[a], c0[a]) for a in range(3)]
                    hi = [min(stop[a], c1[a]) for a in range(3)]
                    if any(h <= low for low, h in zip(lo, hi, strict=True)):
                        continue
                    blk = self._chunk(key)
                    out[tuple(slice(lo[a] - start[a], hi[a] - start[a]) for a in range(3))] = blk[
                        tuple(slice(lo[a] - c0[a], hi[a] - c0[a]) for a in range(3))
                    ]
        return out

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        """``reader[z0:z1, y0:y1, x0:x1]``: a box inside the volume (unit steps), read through the chunk cache."""
        if not isinstance(key, tuple) or len(key) != 3 or any(not isinstance(k, slice) or k.step not in (None, 1)
                                                               for k in key):
            raise TypeError("a VolumeReader is indexed by three unit-step slices")
        idx = [k.indices(n) for k, n in zip(key, self.shape, strict=True)]
        return self.read_inside([i[0] for i in idx], [max(i[1], i[0]) for i in idx])

    def read(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """Read a box that may extend outside the volume; outside voxels repeat the nearest edge voxel
        (the one boundary convention, :data:`milotile.ops.blocks.NUMPY_PAD`).
        """
        start = [int(s) for s in start]
        size = [int(s) for s in size]
        lo = [min(max(start[a], 0), self.shape[a] - 1) for a in range(3)]
        hi = [max(min(start[a] + size[a], self.shape[a]), lo[a] + 1) for a in range(3)]
        inner = self.read_inside(lo, hi)
        pads = [(lo[a] - start[a], start[a] + size[a] - hi[a]) for a in range(3)]
        if any(p != (0, 0) for p in pads):
            inner = np.pad(inner, pads, mode=NUMPY_PAD)
            inner = inner[tuple(slice(0, size[a]) for a in range(3))]
        if not np.isfinite(inner).all():
            bad = np.argwhere(~np.isfinite(inner))[0] + np.asarray(start)
            raise InputError(
                f"Tomogram {self.name!r} contains NaN or infinite voxels (first near z, y, x = {tuple(int(b) for b in bad)})."
            )
        return inner
