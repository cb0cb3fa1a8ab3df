"""Density phantoms for synthetic tomograms.

A phantom is a float32 array ``(z, y, x)`` of non-negative *density* (0 = vitreous ice, about 1 =
protein, more for gold). :mod:`milotile.synth.tilt` projects it with a contrast transfer function
whose sign makes dense matter dark, so particles are dark in the tilt images and in the
reconstruction, as in cryo-ET.

Content (all sizes in voxels, independent of the voxel size in Å):

* particles of several *species* from :data:`SPECIES` at random orientations and
  non-overlapping positions (the ground truth);
* one or two membranes: a vesicle (a closed spherical shell) and sometimes a gently curved
  sheet crossing the volume;
* optionally one filament: a tube along a smooth curve (:func:`filament_centreline`);
* a few gold beads near the top and bottom surfaces of the slab;
* crowding "junk": small random ellipsoidal blobs.

Every object is drawn anti-aliased: occupancy ``clip(0.5 - signed_distance, 0, 1)``. Objects
are combined with ``maximum`` so that touching objects never add up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

__all__ = [
    "SPECIES",
    "Phantom",
    "Species",
    "filament_centreline",
    "make_phantom",
    "random_rotation",
    "resolve_species_counts",
]

Vec = np.ndarray


# --------------------------------------------------------------------------- species templates
def _sphere_sd(p: Vec, centre: Sequence[float], radius: float) -> Vec:
    """Signed distance to a sphere; ``p`` has shape (3, ...) in (x, y, z) order."""
    c = np.asarray(centre, dtype=np.float64).reshape((3,) + (1,) * (p.ndim - 1))
    return np.sqrt(((p - c) ** 2).sum(axis=0)) - radius


def _ellipsoid_sd(p: Vec, centre: Sequence[float], radii: Sequence[float]) -> Vec:
    """Approximate signed distance to an axis-aligned ellipsoid (exact on the axes)."""
    c = np.asarray(centre, dtype=np.float64).reshape((3,) + (1,) * (p.ndim - 1))
    r = np.asarray(radii, dtype=np.float64).reshape((3,) + (1,) * (p.ndim - 1))
    k = np.sqrt((((p - c) / r) ** 2).sum(axis=0))
    return (k - 1.0) * float(np.min(radii))


#: Density centroid of the two-subunit ribosome shape drawn around the origin. The shape is shifted
#: by it so that the ground-truth point *is* the particle's centre: drawn around the raw origin, the
#: density centre sat 0.83 voxels off it (along the particle's own axis), so every detector reported
#: each ribosome ~0.8 voxels away in a random direction, and over a demo's 30 particles the mean
#: offset reached (-0.39, 0.01, +0.69) voxels for seed 0 even without noise.
_RIBOSOME_CENTROID = (0.0324, 0.0434, -0.8313)


def _ribosome(p: Vec) -> Vec:
    """Lumpy two-subunit globule, bounding radius about 10 voxels, density centroid at the origin."""
    c = np.asarray(_RIBOSOME_CENTROID, dtype=np.float64).reshape((3,) + (1,) * (p.ndim - 1))
    return _ribosome_raw(p + c)


def _ribosome_raw(p: Vec) -> Vec:
    sd = _sphere_sd(p, (0.0, 0.0, -2.0), 7.5)
    sd = np.minimum(sd, _ellipsoid_sd(p, (0.0, 1.0, 5.0), (6.5, 5.0, 3.5)))
    lumps = (
        (6.0, 3.0, -4.0),
        (-5.5, 4.0, -3.0),
        (1.0, -6.5, -5.0),
        (-3.0, -4.5, 3.5),
        (4.5, -2.0, 4.0),
    )
    for c in lumps:
        sd = np.minimum(sd, _sphere_sd(p, c, 2.5))
    occ = np.clip(0.5 - sd, 0.0, 1.0)
    return occ


def _proteasome(p: Vec) -> Vec:
    """Barrel of four stacked rings, radius 5.5, length 16 (about 110 x 160 Å at 10 Å/voxel)."""
    radial = np.sqrt(p[0] ** 2 + p[1] ** 2)
    sd = np.maximum(radial - 5.5, np.abs(p[2]) - 8.0)
    occ = np.clip(0.5 - sd, 0.0, 1.0)
    return occ * (0.8 + 0.2 * np.cos(2.0 * np.pi * p[2] / 4.0))


def _ring(p: Vec) -> Vec:
    """Dense torus (major radius 3, tube radius 1.4, outer radius 4.4) around a thinner disc."""
    radial = np.sqrt(p[0] ** 2 + p[1] ** 2)
    torus = np.sqrt((radial - 3.0) ** 2 + p[2] ** 2) - 1.4
    disc = np.maximum(radial - 3.0, np.abs(p[2]) - 1.0)
    return np.maximum(np.clip(0.5 - torus, 0.0, 1.0), 0.7 * np.clip(0.5 - disc, 0.0, 1.0))


@dataclass(frozen=True)
class Species:
    """A particle species: a fixed shape drawn at random orientations.

    Attributes
    ----------
    name : str
        Species label written to the ground truth.
    radius : float
        Nominal particle radius in voxels (the ``radius`` column of the ground truth).
    bound : float
        Radius in voxels of a sphere that contains the whole shape (used for placement).
    density : float
        Peak density of the shape.
    shape : callable
        ``shape(p) -> occupancy`` for local coordinates ``p`` of shape ``(3, ...)`` (x, y, z).
    """

    name: str
    radius: float
    bound: float
    density: float
    shape: Callable[[Vec], Vec] = field(repr=False)


#: Built-in species, largest first.
SPECIES: dict[str, Species] = {
    "ribosome": Species("ribosome", radius=9.0, bound=10.5, density=1.0, shape=_ribosome),
    "proteasome": Species("proteasome", radius=6.0, bound=10.0, density=1.0, shape=_proteasome),
    "ring": Species("ring", radius=4.0, bound=4.9, density=1.0, shape=_ring),
}


def resolve_species_counts(
    species: Mapping[str, float] | Sequence[str] | None,
    n_particles: int,
    table: Mapping[str, Species] | None = None,
) -> dict[str, int]:
    """Split ``n_particles`` between species.

    Parameters
    ----------
    species : mapping, sequence of str or None
        ``None`` for all of :data:`SPECIES` in equal parts, a sequence of names (equal parts) or a
        mapping ``name -> relative abundance``.
    n_particles : int
        Total number of particles per tomogram.
    table : mapping, optional
        Species to choose from (default :data:`SPECIES`).

    Returns
    -------
    dict
        ``name -> count`` (largest-remainder rounding, so the counts sum to ``n_particles``).

    Raises
    ------
    ValueError
        For an unknown species name, an empty selection or a negative abundance.
    """
    table = SPECIES if table is None else table
    if species is None:
        weights = {name: 1.0 for name in table}
    elif isinstance(species, Mapping):
        weights = {str(k): float(v) for k, v in species.items()}
    elif isinstance(species, str):
        weights = {species: 1.0}
    else:
        weights = {str(k): 1.0 for k in species}
    if not weights:
        raise ValueError(
            f"species selects no particle species; give None or names from {sorted(table)}"
        )
    for name, w in weights.items():
        if name not in table:
            raise ValueError(f"unknown species {name!r}; choose from {sorted(table)}")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"species abundance for {name!r} must be >= 0, got {w!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("species abundances sum to zero; give at least one positive abundance")
    names = list(weights)
    exact = np.array([weights[n] / total * n_particles for n in names])
    counts = np.floor(exact).astype(int)
    rest = n_particles - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    return {n: int(c) for n, c in zip(names, counts, strict=True)}


# --------------------------------------------------------------------------- helpers
def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3x3 rotation matrix (from a normalised Gaussian quaternion)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _box(
    centre: Vec, half: float, shape: tuple[int, int, int]
) -> tuple[tuple[slice, ...], Vec] | None:
    """Index box (z, y, x slices) around an (x, y, z) centre and its coordinates (3, bz, by, bx)."""
    lo = np.floor(np.asarray(centre) - half).astype(int)
    hi = np.ceil(np.asarray(centre) + half).astype(int) + 1
    dims = np.array([shape[2], shape[1], shape[0]])  # x, y, z extents
    lo = np.clip(lo, 0, dims)
    hi = np.clip(hi, 0, dims)
    if np.any(hi <= lo):
        return None
    sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    zz, yy, xx = np.meshgrid(
        np.arange(lo[2], hi[2], dtype=np.float64),
        np.arange(lo[1], hi[1], dtype=np.float64),
        np.arange(lo[0], hi[0], dtype=np.float64),
        indexing="ij",
    )
    p = np.stack([xx - centre[0], yy - centre[1], zz - centre[2]])
    return sl, p


@dataclass
class Phantom:
    """A density volume with its ground truth.

    Attributes
    ----------
    density : ndarray, float32, shape (Z, Y, X)
        Non-negative density (ice = 0).
    particles : DataFrame
        ``x, y, z, species, radius`` (voxels) of every placed particle.
    filaments : DataFrame
        ``filament_id, x, y, z`` centre-line samples about every 2 voxels.
    distractors : DataFrame
        ``x, y, z, kind, radius`` of gold beads, junk blobs, vesicle centres and sheets (a point on
        the sheet and its radius of curvature).
    """

    density: np.ndarray
    particles: pd.DataFrame
    filaments: pd.DataFrame
    distractors: pd.DataFrame


class _Builder:
    """Places objects into a density volume while tracking the occupied space."""

    def __init__(self, shape: tuple[int, int, int], rng: np.random.Generator,
                 slab: tuple[float, float] | None = None) -> None:
        self.shape = shape
        self.rng = rng
        #: z range (voxels) of the specimen; objects are centred inside it
        self.slab = (0.0, float(shape[0] - 1)) if slab is None else (float(slab[0]), float(slab[1]))
        self.density = np.zeros(shape, dtype=np.float32)
        self.occupied = np.zeros(shape, dtype=bool)

    # -- placement -------------------------------------------------------------------------
    def free(self, centre: Vec, radius: float) -> bool:
        """True when a sphere of ``radius`` at ``centre`` touches nothing placed so far."""
        got = _box(centre, radius + 1.0, self.shape)
        if got is None:
            return False
        sl, p = got
        inside = (p**2).sum(axis=0) <= radius**2
        return not bool(np.any(self.occupied[sl] & inside))

    def shell_free(self, centre: Vec, radius: float, thickness: float) -> bool:
        """True when a spherical shell would not touch anything placed so far."""
        got = _box(centre, radius + thickness + 2.0, self.shape)
        if got is None:
            return False
        sl, p = got
        band = np.abs(np.sqrt((p**2).sum(axis=0)) - radius) <= thickness / 2.0 + 1.5
        return not bool(np.any(self.occupied[sl] & band))

    def random_centre(self, margin: float, z_range: tuple[float, float] | None = None) -> Vec:
        _, ydim, xdim = self.shape
        lo = np.array([margin, margin, self.slab[0] + margin])
        hi = np.array([xdim - 1 - margin, ydim - 1 - margin, self.slab[1] - margin])
        hi = np.maximum(hi, lo)
        c = lo + self.rng.random(3) * (hi - lo)
        if z_range is not None:
            c[2] = z_range[0] + self.rng.random() * (z_range[1] - z_range[0])
        return np.round(c, 2)

    def stamp(
        self,
        centre: Vec,
        half: float,
        occupancy_fn: Callable[[Vec], Vec],
        density: float,
        reserve: float | None = None,
    ) -> None:
        """Draw ``density * occupancy_fn(p)`` in a box around ``centre`` and reserve the space."""
        got = _box(centre, half + 1.0, self.shape)
        if got is None:
            return
        sl, p = got
        dens = (density * occupancy_fn(p)).astype(np.float32)
        np.maximum(self.density[sl], dens, out=self.density[sl])
        if reserve is not None:
            self.occupied[sl] |= (p**2).sum(axis=0) <= reserve**2
        else:
            self.occupied[sl] |= dens > 0

    # -- objects ---------------------------------------------------------------------------
    def shell(
        self, centre: Vec, radius: float, thickness: float, density: float, full: bool
    ) -> None:
        """Spherical shell (vesicle when small, curved sheet when ``full`` and large)."""
        zdim = self.shape[0]
        if full:
            step = 8
            ys = np.arange(self.shape[1], dtype=np.float64)[None, :, None]
            xs = np.arange(self.shape[2], dtype=np.float64)[None, None, :]
            for z0 in range(0, zdim, step):
                zs = np.arange(z0, min(z0 + step, zdim), dtype=np.float64)[:, None, None]
                r = np.sqrt((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 + (zs - centre[2]) ** 2)
                sd = np.abs(r - radius) - thickness / 2.0
                occ = np.clip(0.5 - sd, 0.0, 1.0).astype(np.float32)
                sl = slice(z0, z0 + zs.shape[0])
                np.maximum(self.density[sl], density * occ, out=self.density[sl])
                self.occupied[sl] |= sd < 1.5
            return

        got = _box(centre, radius + thickness + 2.0, self.shape)
        if got is None:
            return
        sl, p = got
        r = np.sqrt((p**2).sum(axis=0))
        sd = np.abs(r - radius) - thickness / 2.0
        occ = np.clip(0.5 - sd, 0.0, 1.0).astype(np.float32)
        np.maximum(self.density[sl], density * occ, out=self.density[sl])
        self.occupied[sl] |= sd < 1.5

    def tube(self, line: Vec, radius: float, density: float, period: float = 5.5) -> None:
        """Solid tube of ``radius`` around a densely sampled centre line ``line`` (N, 3) x,y,z."""
        tree = cKDTree(line)
        # arc length of each sample, for a periodic (subunit-like) density modulation
        seg = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))]
        reach = radius + 2.0
        step = max(1, int(round(6.0 / max(seg[-1] / max(len(line) - 1, 1), 1e-6))))
        for start in range(0, len(line), step):
            chunk = line[start : start + step + 1]
            lo = chunk.min(axis=0) - reach
            hi = chunk.max(axis=0) + reach
            centre = (lo + hi) / 2.0
            half = float(np.max(hi - lo) / 2.0)
            got = _box(centre, half, self.shape)
            if got is None:
                continue
            sl, p = got
            pts = (p + centre.reshape(3, 1, 1, 1)).reshape(3, -1).T
            dist, idx = tree.query(pts, distance_upper_bound=reach + 1.0)
            ok = np.isfinite(dist)
            occ = np.zeros(pts.shape[0], dtype=np.float64)
            sd = dist[ok] - radius
            occ[ok] = np.clip(0.5 - sd, 0.0, 1.0) * (
                0.85 + 0.15 * np.cos(2 * np.pi * seg[idx[ok]] / period)
            )
            occ = occ.reshape(p.shape[1:]).astype(np.float32)
            np.maximum(self.density[sl], density * occ, out=self.density[sl])
            near = np.zeros(pts.shape[0], dtype=bool)
            near[ok] = sd < 1.5
            self.occupied[sl] |= near.reshape(p.shape[1:])


def filament_centreline(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    along_y: bool,
    radius: float,
    spacing: float = 0.25,
) -> np.ndarray:
    """A smooth random curve crossing the volume, sampled every ``spacing`` voxels of arc length.

    Parameters
    ----------
    shape : tuple of int
        Volume shape ``(Z, Y, X)``.
    rng : numpy.random.Generator
        Random source.
    along_y : bool
        If true the mean direction lies within about 15 degrees of the y axis; otherwise it is a
        random direction close to the x-y plane (filaments in a thin slab lie roughly flat).
    radius : float
        Tube radius; the curve keeps this far (plus one voxel) from the volume faces.
    spacing : float
        Arc-length spacing of the returned samples.

    Returns
    -------
    ndarray, shape (N, 3)
        ``(x, y, z)`` samples of the longest stretch of the curve inside the volume.
    """
    zdim, ydim, xdim = shape
    if along_y:
        d = np.array([rng.uniform(-0.25, 0.25), 1.0, rng.uniform(-0.05, 0.05)])
    else:
        phi = rng.uniform(0.0, np.pi)
        d = np.array([np.cos(phi), np.sin(phi), rng.uniform(-0.08, 0.08)])
    d /= np.linalg.norm(d)
    e1 = np.cross(d, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    centre = np.array([(xdim - 1) / 2.0, (ydim - 1) / 2.0, (zdim - 1) / 2.0])
    centre[:2] += rng.uniform(-0.2, 0.2, 2) * np.array([xdim, ydim])
    length = float(np.sqrt(xdim**2 + ydim**2 + zdim**2))
    s = np.arange(-length, length, 0.1)
    a1 = rng.uniform(0.02, 0.05) * min(xdim, ydim)
    a2 = rng.uniform(0.02, 0.06) * zdim
    l1, l2 = rng.uniform(0.6, 1.2, 2) * length
    f1, f2 = rng.uniform(0.0, 2 * np.pi, 2)
    pts = (
        centre[None, :]
        + s[:, None] * d[None, :]
        + (a1 * np.sin(2 * np.pi * s / l1 + f1))[:, None] * e1[None, :]
        + (a2 * np.sin(2 * np.pi * s / l2 + f2))[:, None] * e2[None, :]
    )
    margin = radius + 1.0
    hi = np.array([xdim - 1, ydim - 1, zdim - 1], dtype=np.float64) - margin
    inside = np.all((pts >= margin) & (pts <= hi), axis=1)
    # longest contiguous run inside the volume
    edges = np.flatnonzero(np.diff(np.r_[0, inside.astype(np.int8), 0]))
    starts, stops = edges[0::2], edges[1::2]
    if starts.size == 0:
        return np.empty((0, 3))
    k = int(np.argmax(stops - starts))
    pts = pts[starts[k] : stops[k]]
    arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
    target = np.arange(0.0, arc[-1], spacing)
    return np.stack([np.interp(target, arc, pts[:, i]) for i in range(3)], axis=1)


def _place_crowders(b: _Builder, n: int, factory: Callable, dist_rows: list[dict[str, object]],
                    max_tries: int) -> None:
    """Similar-sized decoys drawn by ``factory(rng) -> (bound, density, occupancy_fn)``."""
    for _ in range(n):
        bound, dens, fn = factory(b.rng)
        for _ in range(max_tries // 10):
            c = b.random_centre(bound + 1.0)
            if b.free(c, bound + 1.0):
                b.stamp(c, bound, fn, dens, reserve=bound + 1.0)
                dist_rows.append({"x": c[0], "y": c[1], "z": c[2], "kind": "crowder", "radius": bound})
                break


def make_phantom(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    counts: Mapping[str, int],
    filament: bool = True,
    filament_along_y: bool = False,
    n_membranes: int | None = None,
    max_tries: int = 300,
    species_table: Mapping[str, Species] | None = None,
    n_crowders: int = 0,
    crowder_factory: Callable | None = None,
    thickness: float = 1.0,
) -> Phantom:
    """Build one phantom.

    Parameters
    ----------
    shape : tuple of int
        ``(Z, Y, X)``.
    rng : numpy.random.Generator
        Random source (the phantom is a pure function of it).
    counts : mapping
        ``species name -> number of particles`` (see :func:`resolve_species_counts`).
    filament : bool
        Draw one filament.
    filament_along_y : bool
        Make the filament run mostly along y.
    n_membranes : int, optional
        1 (a vesicle) or 2 (a vesicle and a curved sheet); random when None.
    max_tries : int
        Random positions tried per particle before giving up on it (a warning is logged).
    species_table : mapping, optional
        Species to draw (default :data:`SPECIES`; the hard preset passes
        :func:`milotile.synth.hard.hard_species`).
    n_crowders, crowder_factory : int, callable
        Number of similar-sized decoys (kind ``crowder``) and their generator
        ``factory(rng) -> (bound, density, occupancy_fn)`` (e.g. :func:`milotile.synth.hard.crowder`).
    thickness : float
        Fraction of the depth (centred in z) that holds the specimen: particles, crowders, the vesicle
        and junk are centred inside it, gold beads sit at its surfaces.

    Returns
    -------
    Phantom
    """
    depth = float(np.clip(thickness, 0.05, 1.0)) * (shape[0] - 1)
    mid = (shape[0] - 1) / 2.0
    b = _Builder(shape, rng, slab=(mid - depth / 2.0, mid + depth / 2.0))
    dist_rows: list[dict[str, object]] = []
    if n_membranes is None:
        n_membranes = int(rng.integers(1, 3))
    if n_membranes >= 2:
        _add_sheet(b, rng, shape, dist_rows)
    fil_rows = _add_filament(b, rng, shape, filament_along_y) if filament else []
    part_rows = _add_particles(b, rng, shape, counts, max_tries, SPECIES if species_table is None else species_table)
    if n_crowders and crowder_factory is not None:
        _place_crowders(b, int(n_crowders), crowder_factory, dist_rows, max_tries)
    _add_vesicle(b, rng, shape, dist_rows, max_tries)
    _add_gold(b, rng, shape, dist_rows, max_tries)
    _add_junk(b, rng, shape, dist_rows)
    return _phantom(b, shape, part_rows, fil_rows, dist_rows)


def _add_sheet(b: _Builder, rng: np.random.Generator, shape: tuple, dist_rows: list) -> None:
    """A curved sheet: roughly vertical (normal close to the x-y plane), crossing near one side."""
    zdim, ydim, xdim = shape
    phi = rng.uniform(0.0, 2 * np.pi)
    n = np.array([np.cos(phi), np.sin(phi), rng.uniform(-0.3, 0.3)])
    n /= np.linalg.norm(n)
    mid = np.array([(xdim - 1) / 2.0, (ydim - 1) / 2.0, (zdim - 1) / 2.0])
    extent = 0.5 * float(np.abs(n[:2]) @ np.array([xdim, ydim]))
    p0 = mid + n * extent * rng.uniform(0.45, 0.7)
    big = rng.uniform(3.0, 6.0) * max(shape)
    b.shell(p0 - n * big, big, thickness=3.5, density=0.7, full=True)
    p0 = np.round(p0, 2)
    dist_rows.append({"x": p0[0], "y": p0[1], "z": p0[2], "kind": "sheet", "radius": big})


def _add_filament(b: _Builder, rng: np.random.Generator, shape: tuple, along_y: bool) -> list[np.ndarray]:
    """One filament (a tube along a smooth random centreline); its samples every 2 voxels."""
    fil_rows: list[np.ndarray] = []
    radius = 3.5
    line = filament_centreline(shape, rng, along_y=along_y, radius=radius)
    if len(line) > 1:
        b.tube(line, radius=radius, density=1.0)
        keep = line[::8]  # 0.25-voxel samples -> every 2 voxels
        fil_rows.append(keep)
    return fil_rows


def _add_particles(b: _Builder, rng: np.random.Generator, shape: tuple, counts: dict, max_tries: int,
                   table: Mapping[str, Species]) -> list[dict]:
    """Particles at random free positions and orientations, largest species first so they find room."""
    part_rows: list[dict[str, object]] = []
    order = sorted(counts, key=lambda k: -table[k].bound)
    for name in order:
        sp = table[name]
        placed = 0
        for _ in range(int(counts[name])):
            for _ in range(max_tries):
                c = b.random_centre(sp.bound + 1.0)
                if b.free(c, sp.bound + 1.0):
                    rot = random_rotation(rng)

                    def fn(p: Vec, rot: np.ndarray = rot, sp: Species = sp) -> Vec:
                        local = np.tensordot(rot.T, p, axes=1)
                        return sp.shape(local)

                    b.stamp(c, sp.bound, fn, sp.density, reserve=sp.bound + 1.0)
                    part_rows.append(
                        {"x": c[0], "y": c[1], "z": c[2], "species": name, "radius": sp.radius}
                    )
                    placed += 1
                    break
        if placed < counts[name]:
            logger.warning(
                "placed only %d of %d %s particles (volume %s too crowded)",
                placed,
                counts[name],
                name,
                shape,
            )
    return part_rows


def _add_vesicle(b: _Builder, rng: np.random.Generator, shape: tuple, dist_rows: list, max_tries: int) -> None:
    """A vesicle whose shell cuts through nothing placed so far (it may enclose particles)."""
    small = min(shape)
    r_ves = rng.uniform(0.18, 0.3) * small
    for attempt in range(max_tries):
        if attempt and attempt % 50 == 0:
            r_ves *= 0.85
        c = b.random_centre(r_ves + 3.0)
        if b.shell_free(c, r_ves, 3.5):
            b.shell(c, r_ves, thickness=3.5, density=0.7, full=False)
            dist_rows.append({"x": c[0], "y": c[1], "z": c[2], "kind": "vesicle", "radius": r_ves})
            break


def _add_gold(b: _Builder, rng: np.random.Generator, shape: tuple, dist_rows: list, max_tries: int) -> None:
    """Gold beads near the top and bottom surfaces."""
    z_lo, z_hi = b.slab
    n_gold = int(rng.integers(2, 6))
    for _ in range(n_gold):
        r = 2.2
        for _ in range(max_tries):
            top = rng.random() < 0.5
            zr = (z_hi - r - 5.0, z_hi - r - 1.0) if top else (z_lo + r + 1.0, z_lo + r + 5.0)
            c = b.random_centre(r + 1.0, z_range=zr)
            if b.free(c, r + 1.0):
                b.stamp(
                    c, r, lambda p, r=r: np.clip(0.5 - (np.sqrt((p**2).sum(axis=0)) - r), 0, 1), 6.0
                )
                dist_rows.append({"x": c[0], "y": c[1], "z": c[2], "kind": "gold", "radius": r})
                break


def _add_junk(b: _Builder, rng: np.random.Generator, shape: tuple, dist_rows: list) -> None:
    """Crowding junk: small random ellipsoids in the remaining space."""
    zdim, ydim, xdim = shape
    n_junk = int(round(zdim * ydim * xdim / 60_000))
    for _ in range(n_junk):
        radii = rng.uniform(1.0, 2.5, 3)
        rot = random_rotation(rng)
        dens = rng.uniform(0.4, 0.9)
        for _ in range(20):
            c = b.random_centre(float(radii.max()) + 1.0)
            if b.free(c, float(radii.max()) + 1.0):

                def jfn(p: Vec, rot: np.ndarray = rot, radii: Vec = radii) -> Vec:
                    local = np.tensordot(rot.T, p, axes=1)
                    return np.clip(0.5 - _ellipsoid_sd(local, (0, 0, 0), radii), 0.0, 1.0)

                b.stamp(c, float(radii.max()), jfn, dens)
                dist_rows.append(
                    {"x": c[0], "y": c[1], "z": c[2], "kind": "junk", "radius": float(radii.max())}
                )
                break



def _phantom(b: _Builder, shape: tuple, part_rows: list, fil_rows: list, dist_rows: list) -> Phantom:
    particles = pd.DataFrame(part_rows, columns=["x", "y", "z", "species", "radius"])
    particles = particles.astype({"x": float, "y": float, "z": float, "radius": float})
    if fil_rows:
        arr = np.concatenate([np.round(f, 2) for f in fil_rows])
        ids = np.concatenate([np.full(len(f), i) for i, f in enumerate(fil_rows)])
        filaments = pd.DataFrame(
            {"filament_id": ids.astype(np.int64), "x": arr[:, 0], "y": arr[:, 1], "z": arr[:, 2]}
        )
    else:
        filaments = pd.DataFrame(
            {
                "filament_id": pd.Series(dtype=np.int64),
                "x": pd.Series(dtype=float),
                "y": pd.Series(dtype=float),
                "z": pd.Series(dtype=float),
            }
        )
    distractors = pd.DataFrame(dist_rows, columns=["x", "y", "z", "kind", "radius"])
    distractors = distractors.astype({"x": float, "y": float, "z": float, "radius": float})
    logger.debug(
        "phantom %s: %d particles, %d distractors, filament=%s",
        shape,
        len(particles),
        len(distractors),
        bool(fil_rows),
    )
    return Phantom(b.density, particles, filaments, distractors)
