"""The ``lookalike`` synthetic preset: many similar-sized species under randomised acquisition.

The ``hard`` preset's species differ in size (radius 12/9/7/5), so size alone tells them apart and a
picker or an embedding tuned on it can look better than it is. This preset is built so that it cannot:

* **8-12 species of radius 5-8 voxels** whose *shapes* differ: each species is drawn from its own
  shape family (lumpy globule, rod, ring, dumbbell, hollow shell, disc, trimer, bent rod, tetramer,
  cube, cross, cup) with seed-drawn proportions, so only shape tells them apart;
* **randomised acquisition per setting** (:class:`LookalikeSetting`, drawn from ``setting``): cubic volume
  of side 100-200, SNR 0.03-0.3 (log-uniform), tilt range ±40° to ±70°, defocus 1.5-5 µm, voxel size
  6-14 Å, specimen thickness 50-100 % of the volume, 0-60 crowders per 100³ voxels (random globules of
  the species' radii), and the contrast sign (particles darker *or* brighter than the solvent);
* the ``seed`` draws the content (positions, orientations, noise) within a setting, so a benchmark can
  report ``settings x seeds`` and choose its defaults on some settings and report on the others.

Everything the ``easy`` phantoms draw (membranes, gold, a filament, junk) is drawn too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from milotile.synth.hard import random_globule
from milotile.synth.phantom import Species, _ellipsoid_sd, _sphere_sd, random_rotation

__all__ = [
    "LOOKALIKE_FAMILIES",
    "LOOKALIKE_RADII",
    "LookalikeSetting",
    "draw_setting",
    "lookalike_crowder",
    "lookalike_species",
    "species_families",
]

#: Radius range (voxels) of the look-alike species and of their crowders.
LOOKALIKE_RADII: tuple[float, float] = (5.0, 8.0)

Shape = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LookalikeSetting:
    """Acquisition and content parameters of one look-alike setting (all drawn from ``setting``).

    Attributes
    ----------
    setting : int
        The integer the parameters were drawn from.
    n_species : int
        Number of species (8-12).
    size : int
        Side of the cubic volume in voxels (100-200).
    snr : float
        Tilt-series signal-to-noise variance ratio (0.03-0.3).
    tilt_max, tilt_step : float
        Tilt range ``±tilt_max`` (40-70°) in steps of ``tilt_step`` degrees.
    defocus : float
        Underfocus in Å (1.5-5 µm).
    voxel_size : float
        Å per voxel (6-14).
    thickness : float
        Fraction of the volume's depth that holds the specimen (0.5-1).
    crowding : float
        Crowders per 100³ voxels (0-60).
    contrast : int
        -1: particles darker than the solvent (cryo-ET convention), +1: brighter (inverted output).
    particles_per_species : int
        Particles of each species per tomogram.
    """

    setting: int
    n_species: int
    size: int
    snr: float
    tilt_max: float
    tilt_step: float
    defocus: float
    voxel_size: float
    thickness: float
    crowding: float
    contrast: int
    particles_per_species: int

    @property
    def angles(self) -> tuple[float, float, float]:
        """``(min, max, step)`` of the tilt series."""
        return (-self.tilt_max, self.tilt_max, self.tilt_step)

    def n_crowders(self, shape: tuple[int, int, int]) -> int:
        """Crowders in a volume of ``shape`` at this setting's density (in the specimen slab)."""
        return int(round(self.crowding * self.thickness * float(np.prod(shape)) / 1e6))

    def as_dict(self) -> dict:
        """The setting as plain JSON values (written to ``synth.json``)."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def draw_setting(setting: int) -> LookalikeSetting:
    """The acquisition and content parameters of look-alike setting number ``setting``."""
    rng = np.random.default_rng([int(setting), 23])
    size = int(rng.integers(100, 201)) // 4 * 4
    thickness = float(rng.uniform(0.5, 1.0))
    n_species = int(rng.integers(8, 13))
    # about 4 particles of each species per 100³ voxels of specimen (the third-party set's density:
    # 9 species x 3 in a 100³ volume), at least 3 so that a tomogram holds labels of every species
    per = max(3, int(round(4.0 * thickness * (size / 100.0) ** 3)))
    return LookalikeSetting(
        setting=int(setting), n_species=n_species, size=size,
        snr=float(np.exp(rng.uniform(np.log(0.03), np.log(0.3)))),
        tilt_max=float(2 * rng.integers(20, 36)), tilt_step=2.0,
        defocus=float(rng.uniform(15_000.0, 50_000.0)),
        voxel_size=float(np.round(rng.uniform(6.0, 14.0), 2)),
        thickness=thickness, crowding=float(rng.uniform(0.0, 60.0)),
        contrast=int(rng.choice([-1, 1])), particles_per_species=per,
    )


# --------------------------------------------------------------------------- shape families
def _occ(sd: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - sd, 0.0, 1.0)


def _capsule_sd(p: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance to the capsule of ``radius`` around the segment ``a``-``b`` (x, y, z)."""
    a = np.asarray(a, np.float64).reshape((3,) + (1,) * (p.ndim - 1))
    b = np.asarray(b, np.float64).reshape((3,) + (1,) * (p.ndim - 1))
    ab = b - a
    t = np.clip(((p - a) * ab).sum(axis=0) / max(float((ab**2).sum()), 1e-9), 0.0, 1.0)
    return np.sqrt(((p - a - t * ab) ** 2).sum(axis=0)) - radius


def _rod(r: float, rng: np.random.Generator) -> Shape:
    thick = r * rng.uniform(0.32, 0.45)
    half = r - thick
    return lambda p: _occ(_capsule_sd(p, (0, 0, -half), (0, 0, half), thick))


def _ring(r: float, rng: np.random.Generator) -> Shape:
    tube = r * rng.uniform(0.25, 0.35)
    major = r - tube

    def shape(p: np.ndarray) -> np.ndarray:
        radial = np.sqrt(p[0] ** 2 + p[1] ** 2)
        return _occ(np.sqrt((radial - major) ** 2 + p[2] ** 2) - tube)

    return shape


def _dumbbell(r: float, rng: np.random.Generator) -> Shape:
    r1 = r * rng.uniform(0.4, 0.5)
    r2 = r * rng.uniform(0.35, 0.5)
    neck = r * 0.18
    c1, c2 = (0, 0, r - r1), (0, 0, -(r - r2))
    return lambda p: _occ(np.minimum(np.minimum(_sphere_sd(p, c1, r1), _sphere_sd(p, c2, r2)),
                                     _capsule_sd(p, c1, c2, neck)))


def _shell(r: float, rng: np.random.Generator) -> Shape:
    outer = r * rng.uniform(0.85, 0.95)
    inner = outer * rng.uniform(0.5, 0.65)
    return lambda p: _occ(np.maximum(_sphere_sd(p, (0, 0, 0), outer), -_sphere_sd(p, (0, 0, 0), inner)))


def _disc(r: float, rng: np.random.Generator) -> Shape:
    half = r * rng.uniform(0.22, 0.32)
    rad = r * 0.95

    def shape(p: np.ndarray) -> np.ndarray:
        radial = np.sqrt(p[0] ** 2 + p[1] ** 2)
        return _occ(np.maximum(radial - rad, np.abs(p[2]) - half))

    return shape


def _cluster(r: float, rng: np.random.Generator, dirs: np.ndarray) -> Shape:
    sub = r * rng.uniform(0.38, 0.46)
    centres = dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * (r - sub)

    def shape(p: np.ndarray) -> np.ndarray:
        sd = _sphere_sd(p, centres[0], sub)
        for c in centres[1:]:
            sd = np.minimum(sd, _sphere_sd(p, c, sub))
        return _occ(sd)

    return shape


def _trimer(r: float, rng: np.random.Generator) -> Shape:
    ang = np.deg2rad([90.0, 210.0, 330.0])
    return _cluster(r, rng, np.stack([np.cos(ang), np.sin(ang), np.zeros(3)], axis=1))


def _tetramer(r: float, rng: np.random.Generator) -> Shape:
    return _cluster(r, rng, np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], np.float64))


def _bent_rod(r: float, rng: np.random.Generator) -> Shape:
    thick = r * rng.uniform(0.3, 0.4)
    angle = np.deg2rad(rng.uniform(70.0, 110.0))
    arm = r - thick
    a = np.array([arm * np.cos(angle / 2), arm * np.sin(angle / 2), 0.0]) * 0.9
    b = np.array([arm * np.cos(-angle / 2), arm * np.sin(-angle / 2), 0.0]) * 0.9
    elbow = -0.35 * (a + b)
    return lambda p: _occ(np.minimum(_capsule_sd(p, elbow, elbow + a, thick), _capsule_sd(p, elbow, elbow + b, thick)))


def _cube(r: float, rng: np.random.Generator) -> Shape:
    half = r * rng.uniform(0.52, 0.58)

    def shape(p: np.ndarray) -> np.ndarray:
        q = np.abs(p) - half
        outside = np.sqrt((np.maximum(q, 0.0) ** 2).sum(axis=0))
        return _occ(outside + np.minimum(q.max(axis=0), 0.0))

    return shape


def _cross(r: float, rng: np.random.Generator) -> Shape:
    thick = r * rng.uniform(0.25, 0.33)
    arm = r - thick

    def shape(p: np.ndarray) -> np.ndarray:
        sd = _capsule_sd(p, (-arm, 0, 0), (arm, 0, 0), thick)
        sd = np.minimum(sd, _capsule_sd(p, (0, -arm, 0), (0, arm, 0), thick))
        return _occ(np.minimum(sd, _capsule_sd(p, (0, 0, -arm * 0.6), (0, 0, arm * 0.6), thick)))

    return shape


def _cup(r: float, rng: np.random.Generator) -> Shape:
    outer = r * 0.95
    wall = r * rng.uniform(0.28, 0.36)

    def shape(p: np.ndarray) -> np.ndarray:
        shell = np.abs(_sphere_sd(p, (0, 0, 0), outer - wall / 2)) - wall / 2
        return _occ(np.maximum(shell, p[2] - r * 0.15))

    return shape


def _globule(r: float, rng: np.random.Generator) -> Shape:
    return random_globule(r, rng)


def _ellipsoid(r: float, rng: np.random.Generator) -> Shape:
    axes = r * np.array([rng.uniform(0.9, 1.0), rng.uniform(0.55, 0.7), rng.uniform(0.35, 0.45)])
    return lambda p: _occ(_ellipsoid_sd(p, (0, 0, 0), axes))


#: Shape families of the look-alike species: ``name -> factory(radius, rng) -> occupancy(p)``.
LOOKALIKE_FAMILIES: dict[str, Callable[[float, np.random.Generator], Shape]] = {
    "globule": _globule, "rod": _rod, "ring": _ring, "dumbbell": _dumbbell, "shell": _shell, "disc": _disc,
    "trimer": _trimer, "bent": _bent_rod, "tetramer": _tetramer, "cube": _cube, "cross": _cross, "cup": _cup,
    "ellipsoid": _ellipsoid,
}


def lookalike_species(setting: LookalikeSetting) -> dict[str, Species]:
    """The species of ``setting``: each of its own shape family, radius 5-8 voxels.

    Names are ``s00``, ``s01``, ... in decreasing radius; :func:`species_families` gives their families.
    """
    rng = np.random.default_rng([setting.setting, 24])
    families = [str(f) for f in rng.permutation(sorted(LOOKALIKE_FAMILIES))][: setting.n_species]
    radii = np.sort(rng.uniform(*LOOKALIKE_RADII, setting.n_species))[::-1]
    out = {}
    for i, (fam, r) in enumerate(zip(families, radii, strict=True)):
        shape, extent = _centred(LOOKALIKE_FAMILIES[fam](float(r), rng), float(r), fam)
        out[f"s{i:02d}"] = Species(f"s{i:02d}", radius=float(r), bound=max(float(r), extent) + 0.5,
                                   density=float(rng.uniform(0.85, 1.0)), shape=shape)
    return out


def species_families(table: dict[str, Species]) -> dict[str, str]:
    """``species name -> shape family`` of a table made by :func:`lookalike_species`."""
    return {name: getattr(sp.shape, "family", "?") for name, sp in table.items()}


def _centred(shape: Shape, radius: float, family: str) -> tuple[Shape, float]:
    """``shape`` moved so that its density centroid is the origin (the ground-truth point is the
    particle's centre, as for the other presets), tagged with its ``family``; and the radius of the
    ball around the new origin that holds it."""
    ax = np.arange(-radius - 1.0, radius + 1.01, 0.5)
    p = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))
    occ = shape(p)
    centroid = (p * occ).reshape(3, -1).sum(axis=1) / max(float(occ.sum()), 1e-9)
    c = centroid.reshape((3, 1))

    def fn(q: np.ndarray) -> np.ndarray:
        return shape(q + c.reshape((3,) + (1,) * (q.ndim - 1)))

    fn.family = family  # type: ignore[attr-defined]
    wide = np.arange(-radius - 4.0, radius + 4.01, 0.5)
    q = np.stack(np.meshgrid(wide, wide, wide, indexing="ij"))
    inside = fn(q) > 0.01
    extent = float(np.sqrt((q**2).sum(axis=0))[inside].max()) if inside.any() else radius
    return fn, extent


def lookalike_crowder(rng: np.random.Generator) -> tuple[float, float, Shape]:
    """One crowder: a random lumpy globule of the species' radius range, at a random orientation."""
    r = float(rng.uniform(*LOOKALIKE_RADII))
    dens = float(rng.uniform(0.7, 1.0))
    fn = random_globule(r, rng)
    rot = random_rotation(rng)
    return r + 0.5, dens, lambda p: fn(np.tensordot(rot.T, p, axes=1))
