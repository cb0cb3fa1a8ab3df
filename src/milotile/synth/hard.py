"""The ``hard`` synthetic preset: realistic difficulty for picking and exploration benchmarks.

What it adds to the default phantoms (see :mod:`milotile.synth.phantom`):

* four particle species of radius 12, 9, 7 and 5 voxels whose *shapes are drawn from the
  collection seed* (a core ellipsoid plus 2-5 lumps), so a benchmark cannot overfit one fixed set
  of templates;
* similar-sized *crowders*: random globules of the species' radii (±15 %) and comparable density,
  each with its own random shape (never one of the species);
* an additive low-frequency intensity gradient over the reconstruction (ice-thickness variation),
  applied by :func:`add_gradient`;
* SNR 0.1 by default (set lower with ``snr``), on top of the CTF, the missing wedge of the
  ±60° weighted back-projection, membranes, gold beads, a filament and small junk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from milotile.synth.phantom import Species, _ellipsoid_sd, _sphere_sd, random_rotation

__all__ = [
    "HARD_DEFAULTS",
    "HARD_RADII",
    "add_gradient",
    "hard_species",
    "random_globule",
]

#: Radius (voxels) of each species of the hard preset, largest first.
HARD_RADII: dict[str, float] = {"big": 12.0, "medium": 9.0, "compact": 7.0, "small": 5.0}

#: Defaults of the hard preset (overridable one by one).
HARD_DEFAULTS: dict[str, float | int] = {
    "snr": 0.1,
    "particles_per_species": 20,
    "crowders": 120,
    "gradient": 0.5,
}


def random_globule(radius: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    """A random lumpy globule whose bounding radius is about ``radius`` voxels.

    A core ellipsoid (semi-axes 0.6-0.85 of ``radius``) plus 2-5 spherical lumps on its surface;
    returns ``shape(p) -> occupancy`` for local coordinates ``p`` of shape ``(3, ...)``.
    """
    axes = radius * rng.uniform(0.6, 0.85, 3)
    axes[int(rng.integers(3))] = radius * rng.uniform(0.75, 0.85)
    n_lumps = int(rng.integers(2, 6))
    lumps = []
    for _ in range(n_lumps):
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        r_l = radius * rng.uniform(0.2, 0.35)
        lumps.append((d * (radius - r_l) * 0.95, r_l))
    hollow = rng.random() < 0.3  # some species have a low-density cavity (e.g. chaperonin-like)
    inner = 0.45 * float(axes.min())

    def shape(p: np.ndarray) -> np.ndarray:
        sd = _ellipsoid_sd(p, (0.0, 0.0, 0.0), axes)
        for c, r_l in lumps:
            sd = np.minimum(sd, _sphere_sd(p, c, r_l))
        occ = np.clip(0.5 - sd, 0.0, 1.0)
        if hollow:
            occ = occ * (1.0 - 0.6 * np.clip(0.5 - _sphere_sd(p, (0.0, 0.0, 0.0), inner), 0.0, 1.0))
        return occ

    return shape


def hard_species(rng: np.random.Generator) -> dict[str, Species]:
    """The four species of the hard preset, with shapes drawn from ``rng``."""
    out = {}
    for name, r in HARD_RADII.items():
        out[name] = Species(name, radius=r, bound=r + 0.5, density=float(rng.uniform(0.85, 1.0)),
                            shape=random_globule(r, rng))
    return out


def crowder(rng: np.random.Generator) -> tuple[float, float, Callable[[np.ndarray], np.ndarray]]:
    """One crowder: (bounding radius, density, rotated occupancy function).

    Its radius is one of the species radii (:data:`HARD_RADII`) within ±15 %, its density
    0.7-1.0 and its shape a fresh random globule, so that size alone cannot tell it from a particle.
    """
    radii = list(HARD_RADII.values())
    r = float(radii[int(rng.integers(len(radii)))] * rng.uniform(0.85, 1.15))
    dens = float(rng.uniform(0.7, 1.0))
    fn = random_globule(r, rng)
    rot = random_rotation(rng)

    def occ(p: np.ndarray) -> np.ndarray:
        return fn(np.tensordot(rot.T, p, axes=1))

    return r + 0.5, dens, occ


def add_gradient(rec: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Add a smooth random ramp of peak-to-peak ``amplitude * std(rec)`` (in place, returned).

    The ramp is linear along a random in-plane direction plus a gentle quadratic bowl, like the
    brightness change of a tomogram across ice of varying thickness.
    """
    if amplitude <= 0:
        return rec
    zdim, ydim, xdim = rec.shape
    phi = rng.uniform(0, 2 * np.pi)
    y = (np.arange(ydim, dtype=np.float32) / max(ydim - 1, 1) - 0.5)[:, None]
    x = (np.arange(xdim, dtype=np.float32) / max(xdim - 1, 1) - 0.5)[None, :]
    ramp = np.cos(phi) * x + np.sin(phi) * y + 0.5 * rng.uniform(-1, 1) * (x**2 + y**2)
    ramp = ramp - ramp.min()
    ramp = ramp / max(float(ramp.max()), 1e-6)
    scale = np.float32(amplitude * float(rec.std()))
    rec += (scale * ramp).astype(np.float32)[None]
    return rec
