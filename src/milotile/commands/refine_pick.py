"""``milotile refine pick``: tiled prediction, decoding, optional fiber mode (registered by ``refine``)."""

from __future__ import annotations

import argparse
import logging
from functools import partial

from milotile.commands import parse_floats, parse_ints

log = logging.getLogger(__name__)


def register_pick(refine_sub: argparse._SubParsersAction) -> None:
    """Add ``pick`` to the ``milotile refine`` sub-commands."""
    p = refine_sub.add_parser(
        "pick",
        help="predict heatmaps tile by tile on Dask and decode picks",
        description="Runs the picker over every tomogram of STORE in tiles (halo >= receptive field, model loaded "
        "once per worker), writes heatmaps to derived/heatmaps/<run>/<name> (OME-Zarr) and the picks to "
        "tables/picks.parquet: tomogram, x, y, z (level-0 voxels), x_A, y_A, z_A, score, class.",
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument("--model", required=True, metavar="CKPT", help="picker checkpoint (best.pt) or its run folder")
    p.add_argument("--threshold", type=float, default=None,
                   help="score threshold (default: the one validation chose for the checkpoint; without "
                        "validation labels, chosen per class from the peak scores and the training labels)")
    p.add_argument("--max-picks", type=int, default=900, help="top-K per tomogram and class (default 900)")
    p.add_argument("--nms-distance", type=float, default=None, metavar="D",
                   help="NMS radius in voxels (default half the model's bbox)")
    p.add_argument("--border", type=partial(parse_floats, what="--border"), default=None, metavar="V[,Y,X]",
                   help="margin to the volume faces in voxels: one value or z,y,x (default bbox/4)")
    p.add_argument("--names", default=None, help="comma-separated tomogram names (default all)")
    p.add_argument("--tile", type=partial(parse_ints, n=3, what="--tile"), default=None, metavar="Z,Y,X",
                   help="tile size in voxels (default: planned from the halo so that a small tomogram is one "
                   "tile and halo overhead stays low, at most MILOTILE_TILE_MVOXELS=32 million voxels per tile)")
    p.add_argument("--halo", type=partial(parse_ints, n=3, what="--halo"), default=None, metavar="Z,Y,X",
                   help="context read around each tile (default: the model's full receptive field, which makes "
                   "the tiled heatmap equal a whole-volume pass; smaller is faster)")
    p.add_argument("--tta", type=int, default=None, metavar="N",
                   help="in-plane symmetries averaged when predicting, 1-8 (default: the checkpoint's, 2 for new pickers)")
    p.add_argument("--cpu-bf16", dest="cpu_bf16", action="store_true", default=None,
                   help="bf16 autocast on a CPU with AMX / AVX512-BF16 (default: the checkpoint's)")
    p.add_argument("--no-cpu-bf16", dest="cpu_bf16", action="store_false", help="predict in fp32")
    p.add_argument("--no-heatmaps", action="store_true", help="do not store the heatmaps")
    p.add_argument("--no-shape-check", dest="shape_check", action="store_false",
                   help="keep the network's scores (skip the picker's shape check of each peak)")
    p.add_argument("--out", default=None, help="also write the picks here (.parquet or .csv)")
    f = p.add_argument_group("fiber mode")
    f.add_argument("--fiber", action="store_true", help="link picks into fibres and resample them along curves")
    f.add_argument("--link-distance", type=float, default=15.0, help="link picks closer than this (voxels)")
    f.add_argument("--min-points", type=int, default=7, help="smallest fibre (picks)")
    f.add_argument("--spacing", type=float, default=2.0, help="arc-length spacing of the output (voxels)")
    f.add_argument("--max-residual", type=float, default=5.0, help="largest RMS distance to the curve (voxels)")
    f.add_argument("--max-curvature", type=float, default=0.05, help="largest curvature (1/voxel)")
    p.set_defaults(handler=run, needs_cluster=True, model_stage=True)


def run(args: argparse.Namespace) -> int:
    """Handler of ``milotile refine pick``."""
    from milotile.errors import InputError
    from milotile.refine.picker import Picker
    from milotile.refine.predict import pick, write_picks
    from milotile.store import open_collection

    border = None
    if args.border is not None:
        if len(args.border) not in (1, 3):
            raise InputError(f"--border takes one value or three (z,y,x), got {len(args.border)}")
        border = args.border[0] if len(args.border) == 1 else tuple(args.border)
    col = open_collection(args.store)
    names = [n for n in args.names.split(",") if n] if args.names else None
    if args.tta is not None and not 1 <= args.tta <= 8:
        raise InputError(f"--tta must be between 1 and 8, got {args.tta}")
    picker = Picker.load(args.model)
    if args.tta is not None:
        picker.contract["tta"] = int(args.tta)
    if args.cpu_bf16 is not None:
        picker.contract["cpu_bf16"] = bool(args.cpu_bf16)
    picks = pick(
        col, picker, threshold=args.threshold, max_picks=args.max_picks, nms_distance=args.nms_distance,
        border=border, names=names, tile=args.tile, halo=args.halo, write_heatmaps=not args.no_heatmaps,
        out=None if args.fiber else args.out, shape_check=args.shape_check,
    )
    if args.fiber:
        from milotile.refine.fiber import trace_fibers

        fibers = trace_fibers(picks, link_distance=args.link_distance, min_points=args.min_points,
                              spacing=args.spacing, max_residual=args.max_residual,
                              max_curvature=args.max_curvature)
        col.write_table("fibers", fibers)
        if args.out:
            write_picks(fibers, args.out)
        print(f"{len(picks)} picks -> {fibers['fiber_id'].nunique() if len(fibers) else 0} fibres, "
              f"{len(fibers)} resampled points (tables/fibers.parquet)")
    else:
        print(f"{len(picks)} picks in {picks['tomogram'].nunique() if len(picks) else 0} tomograms "
              "(tables/picks.parquet)")
    return 0
