"""The one conversion between level-0 voxels and every other grid milotile works on.

A :class:`Grid` maps the index ``i`` of a (compressed, binned, pyramid-level or model-output)
volume to the full-resolution (level-0) voxel it is centred on, per axis ``(z, y, x)``::

    level0 = scale * i + offset

* z compression (pairs of slices, :func:`milotile.ops.resample.compress_z`): scale 2, offset 0.5
  (compressed slice ``k`` covers slices ``2k`` and ``2k + 1``);
* mean binning by ``f`` (:func:`milotile.ops.resample.bin_volume`, pyramid levels): scale ``f``,
  offset ``(f - 1) / 2``;
* a model output grid with stride ``s``: scale ``s`` and the offset the model's contract gives
  (``(s - 1) / 2`` when it gives none);
* a block or region starting at level-0 voxel ``origin``: :meth:`Grid.shifted`.

Grids compose (:meth:`Grid.then`): "bin by 2 after compressing" is ``compressed.then(binned(2))``.
Every stage converting coordinates goes through this type; there is no second copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid"]

Triple = tuple[float, float, float]


def _triple(v: float | Sequence[float]) -> Triple:
    if np.isscalar(v):
        return (float(v),) * 3  # type: ignore[arg-type, return-value]
    t = tuple(float(a) for a in v)  # type: ignore[union-attr]
    if len(t) != 3:
        raise ValueError(f"expected one value or three (z, y, x), got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Grid:
    """Mapping ``level0 = scale * index + offset`` per axis ``(z, y, x)``; the identity by default."""

    scale: Triple = (1.0, 1.0, 1.0)
    offset: Triple = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _triple(self.scale))
        object.__setattr__(self, "offset", _triple(self.offset))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def binned(cls, factor: int | Sequence[int]) -> Grid:
        """Grid of a volume mean-binned by ``factor`` (per axis or one for all)."""
        f = np.asarray(_triple(factor))
        return cls(tuple(f), tuple((f - 1.0) / 2.0))  # type: ignore[arg-type]

    @classmethod
    def compressed(cls, compress: bool = True) -> Grid:
        """Grid of a volume whose z slices were combined in pairs (identity when ``compress`` is false)."""
        return cls((2.0, 1.0, 1.0), (0.5, 0.0, 0.0)) if compress else cls()

    @classmethod
    def processed(cls, compress: bool = False, binning: int = 1) -> Grid:
        """Grid of the preprocessing stage's output: z compression (outer), then binning."""
        return cls.compressed(compress).then(cls.binned(int(binning)))

    @classmethod
    def model_output(cls, stride: Sequence[int], offset: Sequence[float] | None = None) -> Grid:
        """Grid of a model output with ``stride`` per axis; ``offset`` defaults to ``(stride - 1) / 2``."""
        s = _triple(stride)
        off = tuple((v - 1.0) / 2.0 for v in s) if offset is None else _triple(offset)
        return cls(s, off)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, d: dict) -> Grid:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["scale"]), tuple(d["offset"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        """``{"scale": [...], "offset": [...]}`` (JSON-able, stored with stage outputs)."""
        return {"scale": list(self.scale), "offset": list(self.offset)}

    # ------------------------------------------------------------------ composition
    def then(self, inner: Grid) -> Grid:
        """The grid of ``inner`` applied to a volume that is itself on this grid.

        ``self.then(inner).to_level0(i) == self.to_level0(inner.to_level0(i))``.
        """
        s, o = np.asarray(self.scale), np.asarray(self.offset)
        return Grid(tuple(s * np.asarray(inner.scale)), tuple(s * np.asarray(inner.offset) + o))  # type: ignore[arg-type]

    def shifted(self, origin: Sequence[float]) -> Grid:
        """This grid for a block whose index 0 lies ``origin`` level-0 voxels further (``z, y, x``)."""
        return Grid(self.scale, tuple(np.asarray(self.offset) + np.asarray(_triple(origin))))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ conversions
    def to_level0(self, zyx: np.ndarray) -> np.ndarray:
        """Grid indices ``(..., 3)`` ``(z, y, x)`` -> level-0 voxels (float64)."""
        return np.asarray(zyx, np.float64) * np.asarray(self.scale) + np.asarray(self.offset)

    def from_level0(self, zyx: np.ndarray) -> np.ndarray:
        """Level-0 voxels ``(..., 3)`` ``(z, y, x)`` -> (fractional) grid indices (float64)."""
        return (np.asarray(zyx, np.float64) - np.asarray(self.offset)) / np.asarray(self.scale)

    def shape_of(self, level0_shape: Sequence[int]) -> tuple[int, int, int]:
        """Number of grid voxels per axis covering a level-0 extent (``ceil(n / scale)``)."""
        return tuple(int(np.ceil(n / s)) for n, s in zip(level0_shape, self.scale, strict=True))  # type: ignore[return-value]

    @property
    def is_identity(self) -> bool:
        """Whether this grid is level 0 itself."""
        return self.scale == (1.0, 1.0, 1.0) and self.offset == (0.0, 0.0, 0.0)
