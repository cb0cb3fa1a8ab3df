"""``milotile synth OUT``: write a synthetic collection (tomograms, tilt series, ground truth)."""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from milotile.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def _numbers(text: str, n: int, kind: type, what: str) -> tuple[Any, ...]:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        vals = tuple(kind(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise argparse.ArgumentTypeError(
            f"{what} must be {n} comma-separated {kind.__name__}s, got {text!r}"
        )
    return vals


def _size(text: str) -> tuple[int, ...]:
    return _numbers(text, 3, int, "--size")


def _tilt_range(text: str) -> tuple[float, ...]:
    return _numbers(text, 3, float, "--tilt-range")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``synth`` sub-command."""
    p = subparsers.add_parser(
        "synth",
        help="write synthetic tomograms, tilt series and ground truth",
        description=(
            "Write seeded synthetic cryo-ET data into OUT: <name>.rec (z, y, x), <name>.mrc "
            "(aligned tilt stack), <name>.tlt, tomograms.txt (MiLoPYP manifest), "
            "ground_truth.parquet/.tsv, filaments.parquet, distractors.parquet and synth.json."
        ),
    )
    # let values such as "-60,60,3" be read as option arguments rather than as options
    p._negative_number_matcher = re.compile(r"^-\.?\d[\d.,:eE+-]*$")
    p.add_argument("out", help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--n-tomograms", type=int, default=3, help="number of tomograms (default 3)")
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="Z,Y,X",
        help="tomogram shape in voxels (default 128,256,256; lookalike: the setting's cube of side 100-200)",
    )
    p.add_argument(
        "--preset",
        choices=("easy", "hard", "lookalike"),
        default="easy",
        help="easy (default); hard: four species of radius 12/9/7/5 with seed-drawn shapes, "
        "similar-sized crowders, an intensity gradient and SNR 0.1; lookalike: 8-12 species of radius 5-8 "
        "and different shapes, with size, SNR (0.03-0.3), tilt range (±40-70°), defocus, voxel size, "
        "thickness, crowding and contrast sign drawn from --setting",
    )
    p.add_argument("--setting", type=int, default=0,
                   help="lookalike: the acquisition setting to draw (default 0; --seed draws the content)")
    p.add_argument(
        "--snr",
        type=float,
        default=None,
        help="tilt-series signal-to-noise variance ratio, 'inf' for none (default 0.5; hard 0.1; lookalike: "
        "the setting's)",
    )
    p.add_argument(
        "--crowders", type=int, default=None,
        help="similar-sized decoys per tomogram (default 0; hard 120; lookalike: the setting's density)"
    )
    p.add_argument(
        "--gradient",
        type=float,
        default=None,
        help="intensity gradient, peak-to-peak in standard deviations (default 0; hard and lookalike 0.5)",
    )
    p.add_argument("--voxel-size", type=float, default=None,
                   help="Å per voxel (default 10; lookalike: the setting's)")
    p.add_argument(
        "--tilt-range",
        type=_tilt_range,
        default=None,
        metavar="MIN,MAX,STEP",
        help="tilt angles in degrees, both ends included (default -60,60,3; lookalike: the setting's)",
    )
    p.add_argument(
        "--species",
        default=None,
        metavar="NAME[,NAME...]",
        help="particle species (default: ribosome,proteasome,ring; hard: big,medium,compact,small)",
    )
    p.add_argument(
        "--n-particles",
        type=int,
        default=None,
        help="particles per tomogram (default from the volume)",
    )
    p.add_argument(
        "--no-filament", dest="filament", action="store_false", help="do not draw a filament"
    )
    seg = p.add_argument_group("segments (volume-EM objects of known shape classes)")
    seg.add_argument("--segments", action="store_true",
                     help="write an EM-like volume with instance labels of round, elongated, branched and flat "
                     "objects instead (em.mrc, labels.h5, objects.parquet); uses --size, --seed, --voxel-size")
    seg.add_argument("--n-objects", type=int, default=None, help="objects (default: as many as fit)")
    seg.add_argument("--radius", default="2.5,4.5", metavar="MIN,MAX",
                     help="range of the object radius in voxels (default 2.5,4.5)")
    seg.add_argument("--noise", type=float, default=25.0, help="EM noise std in grey levels (default 25)")
    p.set_defaults(handler=run, needs_cluster=False)


def run(args: argparse.Namespace) -> int:
    """Handler: call :func:`milotile.synth.synth` and log a summary."""
    if args.segments:
        return _run_segments(args)
    from milotile.synth import synth

    species = None
    if args.species:
        species = [s for s in re.split(r"[,\s]+", args.species) if s]
        if not species:
            raise InputError(f"--species names no species: {args.species!r}")
    res = synth(
        args.out,
        seed=args.seed,
        n_tomograms=args.n_tomograms,
        size=args.size,
        snr=args.snr,
        voxel_size=args.voxel_size,
        angles=args.tilt_range,
        species=species,
        filament=args.filament,
        n_particles=args.n_particles,
        preset=args.preset,
        crowders=args.crowders,
        gradient=args.gradient,
        setting=args.setting,
    )
    per = res.ground_truth.groupby("species").size().to_dict()
    logger.info(
        "synth: %d tomograms %s, %d tilts (%.0f..%.0f deg), %d particles %s -> %s",
        len(res.names),
        "x".join(map(str, res.shape)),
        len(res.angles),
        res.angles[0],
        res.angles[-1],
        len(res.ground_truth),
        per,
        res.manifest,
    )
    return 0


def _run_segments(args: argparse.Namespace) -> int:
    """``synth --segments``: the segment-clustering test volume."""
    from milotile.synth.segments import synth_segments

    radius = _numbers(args.radius, 2, float, "--radius")
    info = synth_segments(args.out, shape=args.size or (128, 256, 256), n_objects=args.n_objects, radius=radius, seed=args.seed,
                          noise=args.noise, voxel_size=10.0 if args.voxel_size is None else args.voxel_size)
    logger.info("synth --segments: %d objects %s -> %s, %s, %s", info["n_objects"], info["per_class"], info["em"],
                info["labels"], info["classes"])
    return 0
