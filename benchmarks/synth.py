"""Benchmark of ``milotile synth``: stage timings and the sparse projector against the naive way.

The naive single-process way rotates the whole volume once per tilt with ``scipy.ndimage.rotate``
and sums along the beam (projection), and smears each filtered tilt through the volume and rotates
it back (back-projection). milotile uses one sparse splatting matrix per angle set (built from
``milotile.ops.geometry.project_points``) applied to blocks of y rows in two threads.

Usage::

    nice python benchmarks/synth.py            # 128x256x256, 41 tilts, 3 tomograms
    nice python benchmarks/synth.py --quick    # 64x128x128, 21 tilts, 1 tomogram

Prints the figures and writes ``benchmarks/results/synth.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from milotile.synth import Projector, apply_ctf, default_defocus, synth, tilt_angles
from milotile.synth.phantom import make_phantom, resolve_species_counts
from milotile.synth.reconstruct import angular_weights, ramp_filter, wbp
from milotile.synth.tilt import add_noise


def _triple(text: str, kind: type) -> tuple:
    vals = tuple(kind(v) for v in text.split(","))
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    return vals


def naive_project(vol: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rotate the volume in the x-z plane for every tilt and sum along z."""
    return np.stack(
        [ndi.rotate(vol, -a, axes=(0, 2), reshape=False, order=1).sum(axis=0) for a in angles]
    )


def naive_backproject(stack: np.ndarray, angles: np.ndarray, zdim: int) -> np.ndarray:
    """Smear every tilt along z, rotate back and accumulate."""
    out = np.zeros((zdim,) + stack.shape[1:], dtype=np.float32)
    for img, a, w in zip(stack, angles, angular_weights(angles), strict=True):
        smear = np.broadcast_to(img[None], out.shape).astype(np.float32)
        out += w * ndi.rotate(smear, a, axes=(0, 2), reshape=False, order=1)
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--size", type=lambda t: _triple(t, int), default=(128, 256, 256), metavar="Z,Y,X"
    )
    ap.add_argument("--tilt-range", type=lambda t: _triple(t, float), default=(-60.0, 60.0, 3.0))
    ap.add_argument("--n-tomograms", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="64x128x128, step 6, one tomogram")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "synth.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.tilt_range, args.n_tomograms = (64, 128, 128), (-60.0, 60.0, 6.0), 1
    shape = tuple(args.size)
    angles = tilt_angles(args.tilt_range)
    res: dict = {
        "benchmark": "synth",
        "size": list(shape),
        "n_tilts": int(angles.size),
        "n_tomograms": args.n_tomograms,
        "quick": args.quick,
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    counts = resolve_species_counts(None, max(6, int(round(np.prod(shape) / 80_000))))
    phantom = make_phantom(shape, rng, counts=counts, filament=True, filament_along_y=True)
    res["phantom_s"] = time.perf_counter() - t
    t = time.perf_counter()
    proj = Projector(shape, angles)
    res["projector_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    stack = proj.forward(phantom.density)
    res["project_s"] = time.perf_counter() - t
    t = time.perf_counter()
    clean = apply_ctf(stack, 10.0, defocus=default_defocus(10.0))
    noisy, _ = add_noise(clean, 0.5, rng)
    res["ctf_noise_s"] = time.perf_counter() - t
    t = time.perf_counter()
    rec = wbp(noisy, angles, shape, projector=proj)
    res["wbp_s"] = time.perf_counter() - t
    res["sparse_total_s"] = res["projector_build_s"] + res["project_s"] + res["wbp_s"]

    if not args.skip_naive:
        t = time.perf_counter()
        nstack = naive_project(phantom.density, angles)
        res["naive_project_s"] = time.perf_counter() - t
        filtered = ramp_filter(noisy)
        t = time.perf_counter()
        nrec = naive_backproject(filtered, angles, shape[0])
        res["naive_backproject_s"] = time.perf_counter() - t
        res["naive_total_s"] = res["naive_project_s"] + res["naive_backproject_s"]
        res["speedup_project_plus_backproject"] = res["naive_total_s"] / res["sparse_total_s"]
        res["corr_projection_sparse_vs_naive"] = _corr(stack, nstack)
        # rotate(reshape=False) crops what leaves the (z, x) box at high tilt; compare low tilts too
        low = np.abs(angles) <= 20
        res["corr_projection_sparse_vs_naive_low_tilts"] = _corr(stack[low], nstack[low])
        res["corr_reconstruction_sparse_vs_naive"] = _corr(rec, nrec)
        del nstack, nrec, filtered

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = synth(tmp, seed=0, n_tomograms=args.n_tomograms, size=shape, angles=args.tilt_range)
        res["synth_wall_s"] = time.perf_counter() - t
        res["synth_per_tomogram_s"] = res["synth_wall_s"] / args.n_tomograms
        res["synth_particles"] = int(len(out.ground_truth))
        res["bytes_written"] = int(sum(p.stat().st_size for p in Path(tmp).iterdir()))
    res["peak_rss_mb"] = _rss_mb()

    print(f"synth benchmark: volume {shape}, {angles.size} tilts")
    for key, val in res.items():
        if isinstance(val, float):
            print(f"  {key:40s} {val:10.3f}")
    print(f"  {'synth_particles':40s} {res['synth_particles']:10d}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
