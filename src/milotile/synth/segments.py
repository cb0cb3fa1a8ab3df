"""Synthetic volume-EM-like data with instance labels of known shape classes.

Objects of four classes — ``round`` (near-spherical ellipsoids), ``elongated`` (capsules),
``branched`` (three or four capsules from a common centre) and ``flat`` (oblate discs) — are placed
one per cell of a jittered grid (so they never touch), with random orientation and a size drawn
from one shared radius range (so size alone does not give the class away). Cells do not align
with storage chunks, so many objects cross chunk seams.

Rendering is analytic and block-wise (:func:`render_block`): a block of any region is drawn from
the object table alone, so volumes far larger than memory are generated chunk by chunk and
blocks agree exactly at their seams. The EM channel is uint8: grey background, a dark membrane
rim and a lighter lumen per object, plus Gaussian noise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["SHAPE_CLASSES", "SegmentScene", "make_scene", "render_block", "iter_blocks", "synth_segments"]

SHAPE_CLASSES = ("round", "elongated", "branched", "flat")
#: largest bounding radius of each class in units of its characteristic radius
_BOUND = {"round": 1.15, "flat": 2.3, "elongated": 4.0, "branched": 3.75}


@dataclass
class SegmentScene:
    """Object table and primitives of a synthetic scene.

    Attributes
    ----------
    shape : tuple of int
        Volume shape ``(z, y, x)``.
    objects : pandas.DataFrame
        One row per object: ``id, class, class_name, radius, z, y, x`` (centre, voxels) and the
        bounding box ``z0, y0, x0, z1, y1, x1`` (end exclusive, clipped to the volume).
    prims : list of list of tuple
        Per object, its primitives: ``("ell", centre, rotation (3, 3), semi_axes)`` or
        ``("cap", p0, p1, radius)``, all in voxels ``(z, y, x)``.
    """

    shape: tuple[int, int, int]
    objects: pd.DataFrame
    prims: list[list[tuple]]


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _primitives(cls: str, c: np.ndarray, r: float, rng: np.random.Generator) -> tuple[list[tuple], float]:
    """Primitives of one object of class ``cls`` centred at ``c``; returns them and a bounding radius."""
    if cls == "round":
        ax = r * rng.uniform(0.9, 1.15, size=3)
        return [("ell", c, _rotation(rng), ax)], float(ax.max())
    if cls == "flat":
        ax = r * np.array([rng.uniform(1.9, 2.3), rng.uniform(1.9, 2.3), rng.uniform(0.45, 0.6)])
        return [("ell", c, _rotation(rng), ax)], float(ax.max())
    if cls == "elongated":
        half = r * rng.uniform(2.0, 3.0)
        u = _unit(rng)
        return [("cap", c - half * u, c + half * u, r * 0.9)], float(half + r)
    if cls == "branched":
        n_arms = int(rng.integers(3, 5))
        base = _rotation(rng)
        dirs = [base[:, 0], -0.5 * base[:, 0] + 0.866 * base[:, 1], -0.5 * base[:, 0] - 0.866 * base[:, 1], base[:, 2]]
        prims, bound = [], 0.0
        for d in dirs[:n_arms]:
            d = d + rng.normal(scale=0.15, size=3)
            d /= np.linalg.norm(d)
            length = r * rng.uniform(2.2, 3.0)
            prims.append(("cap", c, c + length * d, r * 0.75))
            bound = max(bound, length + r * 0.75)
        return prims, float(bound)
    raise InputError(f"unknown shape class {cls!r}; use one of {', '.join(SHAPE_CLASSES)}.")


def max_bound(radius: tuple[float, float]) -> float:
    """Largest bounding radius (voxels) any object can have with radii in ``radius``."""
    return float(radius[1]) * 4.0 + 1.0


def make_scene(
    shape: Sequence[int],
    *,
    n_objects: int | None = None,
    radius: tuple[float, float] = (2.5, 4.5),
    classes: Sequence[str] = SHAPE_CLASSES,
    seed: int = 0,
) -> SegmentScene:
    """Place objects of the given shape classes in a volume, one per cell of a jittered grid.

    Parameters
    ----------
    shape : (z, y, x)
        Volume shape in voxels.
    n_objects : int, optional
        Number of objects (default: as many as there are grid cells; capped at that number).
    radius : (min, max)
        Range of the characteristic radius in voxels (shared by all classes).
    classes : sequence of str
        Shape classes drawn with equal probability.
    seed : int
        Random seed.

    Returns
    -------
    SegmentScene
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"volume shape must be three positive integers, got {shape}.")
    if not (0 < radius[0] <= radius[1]):
        raise InputError(f"radius range must satisfy 0 < min <= max, got {radius}.")
    rng = np.random.default_rng(seed)
    cell = 2.0 * max_bound(radius) + 2.0
    grid = [max(1, int(s // cell)) for s in shape]
    origin = np.array([max(0.0, (s - g * cell) / 2) for s, g in zip(shape, grid, strict=True)])
    n_cells = int(np.prod(grid))
    n = n_cells if n_objects is None else int(n_objects)
    if n > n_cells:
        log.warning("only %d objects fit into %s with radius up to %.1f; placing %d", n_cells, shape, radius[1], n_cells)
        n = n_cells
    cells = np.sort(rng.choice(n_cells, size=n, replace=False))
    rows, prims = [], []
    for i, flat in enumerate(cells):
        idx = np.array(np.unravel_index(flat, grid), dtype=np.float64)
        cls_i = int(rng.integers(len(classes)))
        r = float(rng.uniform(*radius))
        lo = origin + idx * cell
        # centre jittered inside its cell as far as the object's own bounding sphere allows
        margin = np.minimum(_BOUND.get(classes[cls_i], 4.0) * r + 1.0, cell / 2)
        seed_i = int(rng.integers(2**31))
        c = lo + margin + rng.uniform(0, 1, size=3) * np.maximum(cell - 2 * margin, 0)
        p, bound = _primitives(classes[cls_i], c, r, np.random.default_rng(seed_i))
        b0 = np.clip(np.floor(c - bound - 1), 0, shape).astype(int)
        b1 = np.clip(np.ceil(c + bound + 2), 0, shape).astype(int)
        rows.append({"id": i + 1, "class": cls_i, "class_name": classes[cls_i], "radius": r,
                     "z": c[0], "y": c[1], "x": c[2],
                     "z0": b0[0], "y0": b0[1], "x0": b0[2], "z1": b1[0], "y1": b1[1], "x1": b1[2]})
        prims.append(p)
    objects = pd.DataFrame(rows)
    if len(objects):
        objects["id"] = objects["id"].astype(np.uint32)
    return SegmentScene(shape, objects, prims)


def _inside(prim: tuple, pts: np.ndarray) -> np.ndarray:
    """Normalised inside-ness ``q`` (``q <= 1`` inside; about 1 on the surface) of points ``(..., 3)``."""
    if prim[0] == "ell":
        _, c, rot, ax = prim
        d = (pts - c) @ rot
        return np.sqrt(np.sum((d / ax) ** 2, axis=-1))
    _, p0, p1, rad = prim
    seg = p1 - p0
    t = np.clip(((pts - p0) @ seg) / max(float(seg @ seg), 1e-12), 0.0, 1.0)
    closest = p0 + t[..., None] * seg
    return np.linalg.norm(pts - closest, axis=-1) / rad


def render_block(
    scene: SegmentScene,
    lo: Sequence[int],
    hi: Sequence[int],
    *,
    noise: float = 25.0,
    seed: int = 0,
    label_dtype: Any = np.uint32,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the EM image and the instance labels of the region ``lo:hi`` of the scene.

    Parameters
    ----------
    scene : SegmentScene
    lo, hi : (z, y, x)
        Region start (inclusive) and end (exclusive).
    noise : float
        Standard deviation of the Gaussian noise on the EM image (grey levels; contrast is ~60).
    seed : int
        Noise seed; the noise of a block depends on the seed and the block position only.
    label_dtype : dtype
        Label dtype.

    Returns
    -------
    em : numpy.ndarray
        uint8 image of shape ``hi - lo``.
    labels : numpy.ndarray
        Instance ids (0 = background).
    """
    lo = np.asarray(lo, dtype=int)
    hi = np.asarray(hi, dtype=int)
    bshape = tuple(hi - lo)
    labels = np.zeros(bshape, dtype=label_dtype)
    signal = np.zeros(bshape, dtype=np.float32)
    ob = scene.objects
    if len(ob):
        b0 = ob[["z0", "y0", "x0"]].to_numpy()
        b1 = ob[["z1", "y1", "x1"]].to_numpy()
        hit = np.nonzero(np.all(b0 < hi, axis=1) & np.all(b1 > lo, axis=1))[0]
        for k in hit:
            s0 = np.maximum(b0[k], lo)
            s1 = np.minimum(b1[k], hi)
            grids = np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(s0, s1, strict=True)], indexing="ij")
            pts = np.stack(grids, axis=-1)
            q = np.min([_inside(p, pts) for p in scene.prims[k]], axis=0)
            sl = tuple(slice(a - o, b - o) for a, b, o in zip(s0, s1, lo, strict=True))
            inside = q <= 1.0
            labels[sl][inside] = ob["id"].iat[k]
            sig = np.where(q <= 0.7, 0.5, np.where(inside, -1.0, 0.0)).astype(np.float32)
            signal[sl] = np.where(inside, sig, signal[sl])
    rng = np.random.default_rng([int(seed), *(int(v) for v in lo)])
    em = 150.0 + 60.0 * signal + rng.normal(scale=noise, size=bshape).astype(np.float32)
    return np.clip(np.rint(em), 0, 255).astype(np.uint8), labels


def iter_blocks(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Yield ``(lo, hi)`` of every block of a chunk grid over ``shape`` in C order."""
    import itertools

    ranges = [range(0, int(s), int(c)) for s, c in zip(shape, chunks, strict=True)]
    for start in itertools.product(*ranges):
        stop = tuple(min(a + int(c), int(s)) for a, c, s in zip(start, chunks, shape, strict=True))
        yield tuple(start), stop


def synth_segments(
    out: str | os.PathLike[str],
    *,
    shape: Sequence[int] = (64, 128, 128),
    n_objects: int | None = None,
    radius: tuple[float, float] = (2.5, 4.5),
    seed: int = 0,
    noise: float = 25.0,
    voxel_size: float = 80.0,
    chunks: Sequence[int] = (32, 128, 128),
) -> dict[str, Any]:
    """Write a synthetic segment volume: ``em.mrc`` (uint8), ``labels.h5`` (uint32, dataset ``labels``),
    ``objects.parquet`` (id, class, class_name, radius, centre, bbox) and ``segments.json``.

    The volume is generated and written slab by slab (memory ~ one slab of ``chunks[0]`` slices).

    Parameters
    ----------
    out : path
        Output folder (created).
    shape, n_objects, radius, seed
        See :func:`make_scene`.
    noise : float
        EM noise standard deviation in grey levels.
    voxel_size : float
        Å per voxel written into the MRC header (80 Å = 8 nm, a typical vEM voxel).
    chunks : (z, y, x)
        Generation block (the HDF5 dataset is chunked alike).

    Returns
    -------
    dict
        Paths (``em``, ``labels``, ``classes``) and counts.
    """
    import h5py
    import mrcfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scene = make_scene(shape, n_objects=n_objects, radius=radius, seed=seed)
    shape = scene.shape
    em_path, lab_path, cls_path = out / "em.mrc", out / "labels.h5", out / "objects.parquet"
    hchunks = tuple(min(int(c), int(s)) for c, s in zip(chunks, shape, strict=True))
    with mrcfile.new_mmap(str(em_path), shape=shape, mrc_mode=6, overwrite=True) as mrc, \
            h5py.File(lab_path, "w") as h5:
        mrc.voxel_size = voxel_size
        ds = h5.create_dataset("labels", shape=shape, dtype="uint32", chunks=hchunks, compression="gzip",
                               compression_opts=1)
        zc = int(chunks[0])
        for z0 in range(0, shape[0], zc):
            z1 = min(z0 + zc, shape[0])
            em, lab = render_block(scene, (z0, 0, 0), (z1, shape[1], shape[2]), noise=noise, seed=seed)
            mrc.data[z0:z1] = em.astype(np.uint16)
            ds[z0:z1] = lab
    scene.objects.to_parquet(cls_path, index=False)
    counts = scene.objects["class_name"].value_counts().sort_index().to_dict() if len(scene.objects) else {}
    info = {"em": str(em_path), "labels": str(lab_path), "labels_dataset": "labels", "classes": str(cls_path),
            "shape": list(shape), "n_objects": len(scene.objects), "per_class": counts, "seed": seed,
            "voxel_size": voxel_size, "radius": list(radius), "noise": noise}
    (out / "segments.json").write_text(json.dumps(info, indent=2))
    log.info("synth segments: %d objects %s in %s -> %s", len(scene.objects), counts, "x".join(map(str, shape)), out)
    return info
