"""Synthetic cryo-ET data with ground truth: phantoms, tilt series (CTF + noise) and WBP tomograms.

Geometry: :func:`milotile.ops.geometry.project_points` with ``tilt_axis_angle = 0`` (tilt axis =
image y axis) and ``sign = +1``; see :mod:`milotile.synth.tilt`.

>>> from milotile.synth import synth
>>> res = synth("out", n_tomograms=3)          # doctest: +SKIP
"""

from milotile.synth.generate import (
    SimulatedTomogram,
    SynthResult,
    simulate_tomogram,
    synth,
    tilt_angles,
)
from milotile.synth.phantom import SPECIES, Phantom, Species, make_phantom
from milotile.synth.reconstruct import ramp_filter, wbp
from milotile.synth.tilt import Projector, add_noise, apply_ctf, default_defocus

__all__ = [
    "SPECIES",
    "Phantom",
    "Projector",
    "SimulatedTomogram",
    "Species",
    "SynthResult",
    "add_noise",
    "apply_ctf",
    "default_defocus",
    "make_phantom",
    "ramp_filter",
    "simulate_tomogram",
    "synth",
    "tilt_angles",
    "wbp",
]
