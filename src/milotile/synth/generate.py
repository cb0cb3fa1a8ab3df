"""``synth``: a seeded collection of synthetic tomograms, tilt series and ground truth.

Pipeline per tomogram: :func:`~milotile.synth.phantom.make_phantom` (density, ground truth) →
:class:`~milotile.synth.tilt.Projector` (tilt series, geometry of
:func:`milotile.ops.geometry.project_points`, tilt axis = y, ``sign = +1``) →
:func:`~milotile.synth.tilt.apply_ctf` (dense = dark) → :func:`~milotile.synth.tilt.add_noise`
(``snr`` = signal variance / noise variance of the tilt series) →
:func:`~milotile.synth.reconstruct.wbp` (weighted back-projection, same shape as the phantom).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.synth.hard import HARD_DEFAULTS, add_gradient, crowder, hard_species
from milotile.synth.lookalike import (
    LookalikeSetting,
    draw_setting,
    lookalike_crowder,
    lookalike_species,
    species_families,
)
from milotile.synth.phantom import Phantom, Species, make_phantom, resolve_species_counts
from milotile.synth.reconstruct import wbp
from milotile.synth.tilt import Projector, add_noise, apply_ctf, default_defocus
from milotile.synth.writer import (
    write_manifest,
    write_table,
    write_tilt_stack,
    write_tlt,
    write_volume,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MIN_SIZE",
    "SimulatedTomogram",
    "SynthResult",
    "simulate_tomogram",
    "synth",
    "tilt_angles",
]

#: Smallest allowed volume side in voxels (the largest species needs about 23).
MIN_SIZE = 24

GT_COLUMNS = ["tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "species", "radius"]
FILAMENT_COLUMNS = ["tomogram", "filament_id", "x", "y", "z", "x_A", "y_A", "z_A"]
DISTRACTOR_COLUMNS = ["tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "kind", "radius"]


@dataclass
class SynthResult:
    """What :func:`synth` wrote.

    Attributes
    ----------
    out_dir : Path
        Output folder (absolute).
    names : list of str
        Tomogram names ``tomo_000``, ...
    rec_paths, tilt_paths, angle_paths : list of Path
        ``<name>.rec`` (z, y, x), ``<name>.mrc`` (n_tilts, y, x) and ``<name>.tlt`` per tomogram.
    manifest : Path
        ``tomograms.txt`` (MiLoPYP image list, absolute paths).
    ground_truth : DataFrame
        One row per particle: ``tomogram, x, y, z, x_A, y_A, z_A, species, radius``
        (voxels of level 0, x = last array axis; radius in voxels).
    ground_truth_path, ground_truth_tsv : Path
        ``ground_truth.parquet`` and ``ground_truth.tsv``.
    filaments : DataFrame
        Filament centre lines: ``tomogram, filament_id, x, y, z, x_A, y_A, z_A`` every ~2 voxels.
    filaments_path : Path
        ``filaments.parquet``.
    distractors : DataFrame
        Gold beads, junk blobs, vesicles and membrane sheets (``kind`` column), not particles.
    distractors_path : Path
        ``distractors.parquet``.
    angles : ndarray
        Tilt angles in degrees.
    voxel_size : float
        Å per voxel (and per tilt pixel).
    shape : tuple of int
        ``(Z, Y, X)`` of every tomogram.
    params_path : Path
        ``synth.json`` with the parameters and per-tomogram noise levels.
    """

    out_dir: Path
    names: list[str]
    rec_paths: list[Path]
    tilt_paths: list[Path]
    angle_paths: list[Path]
    manifest: Path
    ground_truth: pd.DataFrame
    ground_truth_path: Path
    ground_truth_tsv: Path
    filaments: pd.DataFrame
    filaments_path: Path
    distractors: pd.DataFrame
    distractors_path: Path
    angles: np.ndarray
    voxel_size: float
    shape: tuple[int, int, int]
    params_path: Path
    info: dict[str, object] = field(default_factory=dict)


@dataclass
class SimulatedTomogram:
    """In-memory result of :func:`simulate_tomogram`."""

    phantom: Phantom
    clean: np.ndarray
    tilts: np.ndarray
    rec: np.ndarray
    noise_sigma: float
    defocus: float


def tilt_angles(angles: Sequence[float]) -> np.ndarray:
    """Tilt angles from ``(min, max, step)`` degrees, both ends included.

    Raises
    ------
    InputError
        Unless ``-90 < min < max < 90`` and ``0 < step <= max - min``.
    """
    try:
        vals = [float(a) for a in angles]
    except (TypeError, ValueError) as exc:
        raise InputError(f"angles must be (min, max, step) in degrees, got {angles!r}") from exc
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise InputError(
            f"angles must be three finite numbers (min, max, step) in degrees, got {angles!r}"
        )
    lo, hi, step = vals
    if not -90.0 < lo < hi < 90.0:
        raise InputError(
            f"tilt range must satisfy -90 < min < max < 90 degrees, got min={lo}, max={hi}"
        )
    if not 0.0 < step <= hi - lo:
        raise InputError(f"tilt step must be > 0 and at most max - min = {hi - lo}, got {step}")
    n = int(math.floor((hi - lo) / step + 1e-6)) + 1
    return np.round(lo + step * np.arange(n), 6)


def _check_size(size: Sequence[int]) -> tuple[int, int, int]:
    try:
        vals = tuple(int(s) for s in size)
        exact = all(float(s) == int(s) for s in size)
    except (TypeError, ValueError) as exc:
        raise InputError(f"size must be three integers (Z, Y, X), got {size!r}") from exc
    if len(vals) != 3 or not exact:
        raise InputError(f"size must be three integers (Z, Y, X), got {size!r}")
    if min(vals) < MIN_SIZE:
        raise InputError(f"every side of size must be at least {MIN_SIZE} voxels, got {vals}")
    return vals  # type: ignore[return-value]


def simulate_tomogram(
    shape: tuple[int, int, int],
    angles: np.ndarray,
    *,
    voxel_size: float,
    snr: float,
    counts: Mapping[str, int],
    filament: bool,
    filament_along_y: bool,
    rng_phantom: np.random.Generator,
    rng_noise: np.random.Generator,
    projector: Projector | None = None,
    defocus: float | None = None,
    species_table: Mapping[str, Species] | None = None,
    n_crowders: int = 0,
    gradient: float = 0.0,
    crowder_factory: Callable | None = None,
    thickness: float = 1.0,
    contrast: int = -1,
) -> SimulatedTomogram:
    """Phantom → tilt series (CTF + noise) → WBP reconstruction, all in memory.

    Parameters
    ----------
    shape : tuple of int
        ``(Z, Y, X)``.
    angles : ndarray
        Tilt angles in degrees.
    voxel_size : float
        Å per voxel (sets the CTF frequencies).
    snr : float
        Variance of the clean tilt series over the noise variance (``inf``: no noise).
    counts : mapping
        Particles per species.
    filament, filament_along_y : bool
        Filament switches (see :func:`milotile.synth.phantom.make_phantom`).
    rng_phantom, rng_noise : numpy.random.Generator
        Independent random sources for the content and for the noise.
    projector : Projector, optional
        Re-used between tomograms of the same shape.
    defocus : float, optional
        Underfocus in Å (:func:`~milotile.synth.tilt.default_defocus` when None).
    species_table, n_crowders, gradient
        Species to draw from, number of similar-sized decoys and the intensity-gradient amplitude
        (in reconstruction standard deviations); see :mod:`milotile.synth.hard`.
    crowder_factory : callable, optional
        Generator of the decoys (default :func:`milotile.synth.hard.crowder`).
    thickness : float
        Fraction of the depth holding the specimen (see :func:`~milotile.synth.phantom.make_phantom`).
    contrast : {-1, 1}
        -1: dense matter dark (the CTF's sign, cryo-ET convention); +1: tilt series and reconstruction
        inverted, particles brighter than the solvent.

    Returns
    -------
    SimulatedTomogram
    """
    t0 = time.perf_counter()
    phantom = make_phantom(
        shape, rng_phantom, counts=counts, filament=filament, filament_along_y=filament_along_y,
        species_table=species_table, n_crowders=n_crowders, crowder_factory=crowder_factory or crowder,
        thickness=thickness,
    )
    t1 = time.perf_counter()
    if projector is None:
        projector = Projector(shape, angles)
    projected = projector.forward(phantom.density)
    if defocus is None:
        defocus = default_defocus(voxel_size)
    clean = apply_ctf(projected, voxel_size, defocus=defocus)
    del projected
    tilts, sigma = add_noise(clean, snr, rng_noise)
    if int(contrast) > 0:
        np.negative(clean, out=clean)
        np.negative(tilts, out=tilts)
    t2 = time.perf_counter()
    rec = wbp(tilts, angles, shape, projector=projector)
    if gradient > 0:
        add_gradient(rec, gradient, rng_noise)
    t3 = time.perf_counter()
    logger.debug(
        "simulated %s: phantom %.2fs, tilts %.2fs, wbp %.2fs", shape, t1 - t0, t2 - t1, t3 - t2
    )
    return SimulatedTomogram(phantom, clean, tilts, rec, sigma, float(defocus))


def _with_angstrom(
    df: pd.DataFrame, name: str, voxel_size: float, columns: list[str]
) -> pd.DataFrame:
    df = df.copy()
    df.insert(0, "tomogram", name)
    for ax in "xyz":
        df[f"{ax}_A"] = (df[ax] * voxel_size).round(4)
    return df[columns]


def synth(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_tomograms: int = 3,
    size: Sequence[int] | None = None,
    snr: float | None = None,
    voxel_size: float | None = None,
    angles: Sequence[float] | None = None,
    species: Mapping[str, float] | Sequence[str] | None = None,
    filament: bool = True,
    n_particles: int | None = None,
    preset: str = "easy",
    crowders: int | None = None,
    gradient: float | None = None,
    setting: int = 0,
) -> SynthResult:
    """Write a seeded synthetic cryo-ET collection with ground truth.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; existing files of the same names are overwritten).
    seed : int
        Random seed; the same seed gives byte-identical files. Tomogram ``i`` depends only on
        ``seed`` and ``i`` (not on ``n_tomograms``).
    n_tomograms : int
        Number of tomograms ``tomo_000``, ``tomo_001``, ...
    size : sequence of int, optional
        ``(Z, Y, X)`` of every tomogram in voxels, each at least :data:`MIN_SIZE` (default
        ``(128, 256, 256)``; ``lookalike``: the setting's cube).
    snr : float, optional
        Signal-to-noise ratio of the tilt series as a variance ratio (``inf`` for no noise);
        default 0.5 (``easy``), 0.1 (``hard``) or the setting's (``lookalike``).
    voxel_size : float, optional
        Å per voxel, written to the headers; it also sets the CTF (default 10; defocus about 3 µm at
        10 Å; ``lookalike``: the setting's voxel size and defocus).
    angles : sequence of float, optional
        ``(min, max, step)`` in degrees, both ends included (default: 41 tilts, ±60° step 3°;
        ``lookalike``: the setting's range).
    species : mapping, sequence of str or None
        Particle species from :data:`milotile.synth.phantom.SPECIES` (``ribosome``,
        ``proteasome``, ``ring``): None for all in equal parts, names for equal parts, or a
        mapping ``name -> relative abundance``.
    filament : bool
        Draw one filament per tomogram; the one in ``tomo_000`` runs mostly along y.
    n_particles : int, optional
        Particles per tomogram; default ``max(2 * n_species, Z*Y*X / 80000)`` (105 for the
        default size; 20 per species with ``hard``). Fewer are placed (with a warning) if the
        volume is too crowded.
    preset : {"easy", "hard", "lookalike"}
        ``hard`` (:mod:`milotile.synth.hard`): four species of radius 12/9/7/5 (``big``,
        ``medium``, ``compact``, ``small``) with shapes drawn from ``seed``, similar-sized
        crowders, an intensity gradient and SNR 0.1, on top of everything ``easy`` draws.
        ``lookalike`` (:mod:`milotile.synth.lookalike`): 8-12 species ``s00``, ``s01``... of radius
        5-8 voxels and different shapes, with acquisition (size, SNR, tilt range, defocus, voxel size,
        thickness, crowding, contrast sign) drawn from ``setting``; ``seed`` draws the content.
    crowders : int, optional
        Similar-sized decoys per tomogram (default 0 easy, 120 hard, the setting's density lookalike).
    gradient : float, optional
        Peak-to-peak intensity gradient in reconstruction standard deviations (0 easy, 0.5 hard and
        lookalike).
    setting : int
        ``lookalike`` only: the acquisition setting (:func:`milotile.synth.lookalike.draw_setting`).

    Returns
    -------
    SynthResult

    Raises
    ------
    InputError
        (a ``ValueError``) for any invalid argument, before anything is written.

    Examples
    --------
    >>> res = synth("/tmp/synth_demo", n_tomograms=1, size=(48, 96, 96), angles=(-60, 60, 6))
    >>> res.names
    ['tomo_000']
    """
    preset, table, la = _check_preset(seed, preset, setting)
    size, snr, voxel_size, angles, crowders, gradient = _preset_defaults(preset, la, size, snr, voxel_size, angles,
                                                                         crowders, gradient)
    shape, snr_f, vs, angle_arr, counts = _check_args(seed, n_tomograms, size, snr, voxel_size, angles, species,
                                                      n_particles, filament, table, la)
    if isinstance(crowders, bool) or not isinstance(crowders, (int, np.integer)) or crowders < 0:
        raise InputError(f"crowders must be a non-negative integer, got {crowders!r}")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    projector = Projector(shape, angle_arr)
    defocus = default_defocus(vs) if la is None else la.defocus
    children = np.random.SeedSequence(int(seed)).spawn(int(n_tomograms))
    names, recs, tilts_p, tlts = [], [], [], []
    gts, fils, dists = [], [], []
    per_tomo: dict[str, dict[str, object]] = {}
    for i, child in enumerate(children):
        name = f"tomo_{i:03d}"
        ss_phantom, ss_noise = child.spawn(2)
        sim = simulate_tomogram(
            shape,
            angle_arr,
            voxel_size=vs,
            snr=snr_f,
            counts=counts,
            filament=bool(filament),
            filament_along_y=(i == 0),
            rng_phantom=np.random.default_rng(ss_phantom),
            rng_noise=np.random.default_rng(ss_noise),
            projector=projector,
            defocus=defocus,
            species_table=table,
            n_crowders=crowders,
            gradient=float(gradient),
            crowder_factory=lookalike_crowder if la is not None else crowder,
            thickness=1.0 if la is None else la.thickness,
            contrast=-1 if la is None else la.contrast,
        )
        rec_p, tilt_p, tlt_p = out / f"{name}.rec", out / f"{name}.mrc", out / f"{name}.tlt"
        write_volume(rec_p, sim.rec, vs)
        write_tilt_stack(tilt_p, sim.tilts, vs)
        write_tlt(tlt_p, angle_arr)
        names.append(name)
        recs.append(rec_p)
        tilts_p.append(tilt_p)
        tlts.append(tlt_p)
        gts.append(_with_angstrom(sim.phantom.particles, name, vs, GT_COLUMNS))
        fils.append(_with_angstrom(sim.phantom.filaments, name, vs, FILAMENT_COLUMNS))
        dists.append(_with_angstrom(sim.phantom.distractors, name, vs, DISTRACTOR_COLUMNS))
        per_tomo[name] = {
            "n_particles": int(len(sim.phantom.particles)),
            "noise_sigma": round(sim.noise_sigma, 9),
            "filament_along_y": i == 0 and bool(filament),
        }
        logger.info(
            "%s: %d particles, %d filament samples, noise sigma %.4g",
            name,
            len(sim.phantom.particles),
            len(sim.phantom.filaments),
            sim.noise_sigma,
        )
        del sim

    info: dict[str, object] = {
        "seed": int(seed), "n_tomograms": int(n_tomograms), "size": list(shape),
        "snr": snr_f if math.isfinite(snr_f) else "inf", "voxel_size": vs, "angles": [float(a) for a in angle_arr],
        "defocus_A": round(defocus, 3), "species_counts": counts, "filament": bool(filament),
        "preset": preset, "crowders": int(crowders), "gradient": float(gradient),
        "geometry": {"tilt_axis_angle": 0.0, "sign": 1}, "tomograms": per_tomo,
        "contrast": "dark" if la is None or la.contrast < 0 else "bright",
    }
    if la is not None:
        info["setting"] = la.as_dict()
        info["species"] = {n: {"radius": round(sp.radius, 3), "family": species_families(table)[n]}
                           for n, sp in table.items()}
    res = _write_outputs(out, names, recs, tilts_p, tlts, gts, fils, dists, info, angle_arr, vs, shape)
    logger.info("wrote %d tomograms %s with %d tilts and %d particles to %s in %.1f s", n_tomograms, shape,
                angle_arr.size, len(res.ground_truth), out, time.perf_counter() - t_start)
    return res


def _check_preset(seed: Any, preset: Any, setting: Any) -> tuple:
    """The preset's species table and look-alike setting: ``(preset, table or None, setting or None)``."""
    if preset not in ("easy", "hard", "lookalike"):
        raise InputError(f"preset must be 'easy', 'hard' or 'lookalike', got {preset!r}")
    seed_ok = not isinstance(seed, bool) and isinstance(seed, (int, np.integer)) and seed >= 0
    if preset == "hard":
        return preset, hard_species(np.random.default_rng([int(seed), 15])) if seed_ok else None, None
    if preset == "lookalike":
        if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or setting < 0:
            raise InputError(f"setting must be a non-negative integer, got {setting!r}")
        la = draw_setting(int(setting))
        return preset, lookalike_species(la), la
    return preset, None, None


def _preset_defaults(preset: str, la: LookalikeSetting | None, size: Any, snr: Any, voxel_size: Any, angles: Any,
                     crowders: Any, gradient: Any) -> tuple:
    """Fill the options left as None from the preset: ``(size, snr, voxel_size, angles, crowders, gradient)``."""
    hard = preset == "hard"
    if la is not None:
        size = (la.size,) * 3 if size is None else size
        snr = la.snr if snr is None else snr
        voxel_size = la.voxel_size if voxel_size is None else voxel_size
        angles = la.angles if angles is None else angles
        if crowders is None:
            try:
                crowders = la.n_crowders(tuple(int(v) for v in size))
            except (TypeError, ValueError):
                crowders = 0  # _check_args reports the bad size
    size = (128, 256, 256) if size is None else size
    snr = (HARD_DEFAULTS["snr"] if hard else 0.5) if snr is None else snr
    voxel_size = 10.0 if voxel_size is None else voxel_size
    angles = (-60, 60, 3) if angles is None else angles
    crowders = int(HARD_DEFAULTS["crowders"] if hard else 0) if crowders is None else crowders
    gradient = float(HARD_DEFAULTS["gradient"] if hard or la is not None else 0.0) if gradient is None else gradient
    try:
        ok = math.isfinite(float(gradient)) and float(gradient) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"gradient must be a finite number >= 0, got {gradient!r}")
    return size, snr, voxel_size, angles, crowders, float(gradient)


def _check_args(seed: Any, n_tomograms: Any, size: Any, snr: Any, voxel_size: Any, angles: Any, species: Any,
                n_particles: Any, filament: Any, table: Mapping[str, Species] | None = None,
                la: LookalikeSetting | None = None) -> tuple:
    """Validate every option of :func:`synth` before any work: ``(shape, snr, voxel_size, angles, counts)``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if (
        isinstance(n_tomograms, bool)
        or not isinstance(n_tomograms, (int, np.integer))
        or n_tomograms < 1
    ):
        raise InputError(f"n_tomograms must be a positive integer, got {n_tomograms!r}")
    shape = _check_size(size)
    try:
        snr_f = float(snr)
    except (TypeError, ValueError) as exc:
        raise InputError(f"snr must be a positive number, got {snr!r}") from exc
    if math.isnan(snr_f) or snr_f <= 0:
        raise InputError(f"snr must be a positive number (variance ratio), got {snr!r}")
    try:
        vs = float(voxel_size)
    except (TypeError, ValueError) as exc:
        raise InputError(f"voxel_size must be a positive number of Å, got {voxel_size!r}") from exc
    if not math.isfinite(vs) or vs <= 0:
        raise InputError(f"voxel_size must be a positive number of Å, got {voxel_size!r}")
    angle_arr = tilt_angles(angles)
    try:
        n_species = len(resolve_species_counts(species, 0, table))
    except (TypeError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    if n_particles is None and la is not None:
        n_particles = la.particles_per_species * n_species
    if n_particles is None and table is not None:
        n_particles = int(HARD_DEFAULTS["particles_per_species"]) * n_species
    if n_particles is None:
        n_particles = max(2 * n_species, int(round(shape[0] * shape[1] * shape[2] / 80_000)))
    if (
        isinstance(n_particles, bool)
        or not isinstance(n_particles, (int, np.integer))
        or n_particles < 0
    ):
        raise InputError(f"n_particles must be a non-negative integer, got {n_particles!r}")
    try:
        counts = resolve_species_counts(species, int(n_particles), table)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if not isinstance(filament, (bool, np.bool_)):
        raise InputError(f"filament must be True or False, got {filament!r}")

    return shape, snr_f, vs, angle_arr, counts


def _write_outputs(out: Path, names: list, recs: list, tilts_p: list, tlts: list, gts: list, fils: list, dists: list,
                   info: dict, angle_arr: np.ndarray, vs: float, shape: tuple) -> SynthResult:
    """Manifest, ground-truth tables and ``synth.json`` next to the volumes; the :class:`SynthResult`."""
    gt = pd.concat(gts, ignore_index=True)
    fil = pd.concat(fils, ignore_index=True)
    dist = pd.concat(dists, ignore_index=True)
    manifest = out / "tomograms.txt"
    write_manifest(manifest, list(zip(names, recs, tilts_p, tlts, strict=True)))
    gt_pq, gt_tsv = out / "ground_truth.parquet", out / "ground_truth.tsv"
    write_table(gt, gt_pq, gt_tsv)
    fil_pq = out / "filaments.parquet"
    write_table(fil, fil_pq)
    dist_pq = out / "distractors.parquet"
    write_table(dist, dist_pq)
    params_path = out / "synth.json"
    params_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return SynthResult(
        out_dir=out, names=names, rec_paths=recs, tilt_paths=tilts_p, angle_paths=tlts, manifest=manifest,
        ground_truth=gt, ground_truth_path=gt_pq, ground_truth_tsv=gt_tsv, filaments=fil, filaments_path=fil_pq,
        distractors=dist, distractors_path=dist_pq, angles=angle_arr, voxel_size=vs, shape=shape,
        params_path=params_path, info=info,
    )
