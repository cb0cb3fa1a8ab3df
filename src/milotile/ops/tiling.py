"""Tile plans for halo'd block processing: as few recomputed halo voxels as a memory budget allows.

A tile of size ``t`` along an axis of length ``L`` reads ``t + 2h`` voxels, except at the volume
faces, where the halo is clipped (there is nothing to read). So one tile spanning a whole axis has
no halo cost on that axis at all, and the total voxels computed for a split into ``n`` tiles per axis
is separable: the product of the per-axis sums. :func:`plan_tiles` searches the splits and keeps the
one that computes the fewest voxels while every tile (with its halo) stays within ``max_voxels``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TilePlan", "plan_tiles", "axis_cost"]


@dataclass(frozen=True)
class TilePlan:
    """Chosen tiling: ``tile`` size per axis, ``counts`` per axis, computed vs output voxels."""

    tile: tuple[int, ...]
    counts: tuple[int, ...]
    computed_voxels: int
    output_voxels: int
    largest_tile_voxels: int

    @property
    def halo_overhead(self) -> float:
        """Fraction of the computed voxels that are halo (recomputed context), 0 for one whole tile."""
        return 1.0 - self.output_voxels / self.computed_voxels


def _edges(length: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, length)) for s in range(0, length, tile)]


def axis_cost(length: int, tile: int, halo: int) -> tuple[int, int]:
    """(voxels read along the axis summed over its tiles, largest single tile read) for ``tile`` and ``halo``."""
    total = biggest = 0
    for s, e in _edges(length, tile):
        n = min(length, e + halo) - max(0, s - halo)
        total += n
        biggest = max(biggest, n)
    return total, biggest


def _candidates(length: int, align: int, halo: int, limit: int = 48) -> list[int]:
    """Tile sizes worth trying along an axis: the whole axis, then ceil(L/n) rounded up to ``align``."""
    out = []
    for n in range(1, limit + 1):
        t = math.ceil(math.ceil(length / n) / align) * align
        if t < max(align, 1) or (out and t >= out[-1]):
            continue
        out.append(t)
        if t <= align:
            break
    return out


def plan_tiles(
    shape: Sequence[int], halo: Sequence[int], align: Sequence[int], max_voxels: int
) -> TilePlan:
    """The tiling of ``shape`` that computes the fewest voxels with every tile + halo <= ``max_voxels``.

    Parameters
    ----------
    shape : (z, y, x)
        Volume (or region) shape in voxels.
    halo : (z, y, x)
        Context read on each side of a tile (clipped at the faces).
    align : (z, y, x)
        Tile sizes must be multiples of these (model stride / alignment).
    max_voxels : int
        Largest tile including its halo, in voxels (bounds the memory of one task).

    Returns
    -------
    TilePlan
        When no split fits the budget, the split with the smallest tiles is returned.
    """
    shape = tuple(int(s) for s in shape)
    per_axis = []
    for length, h, a in zip(shape, halo, align, strict=True):
        per_axis.append([(t, *axis_cost(length, t, int(h))) for t in _candidates(length, int(a), int(h))])
    best = None
    fallback = None
    for combo in itertools.product(*per_axis):
        computed = math.prod(c[1] for c in combo)
        biggest = math.prod(c[2] for c in combo)
        key = (computed, biggest)
        if biggest <= max_voxels and (best is None or key < best[0]):
            best = (key, combo)
        if fallback is None or biggest < fallback[0][1]:
            fallback = (key, combo)
    (computed, biggest), combo = best if best is not None else fallback  # type: ignore[misc]
    tile = tuple(c[0] for c in combo)
    counts = tuple(math.ceil(L / t) for L, t in zip(shape, tile, strict=True))
    return TilePlan(tile, counts, int(computed), int(math.prod(shape)), int(biggest))
