"""``milotile mine STORE``: DoG candidates (local maxima, global threshold, NMS) into tables/candidates."""

from __future__ import annotations

import argparse
import logging
from functools import partial

from milotile.commands import parse_floats

logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``mine`` sub-command."""
    p = subparsers.add_parser(
        "mine",
        help="find particle candidates with a DoG pyramid",
        description="MiLoPYP candidate mining, chunk by chunk: DoG levels (larger blur minus smaller), local "
        "maxima, threshold mean + k*std of the positive responses, border exclusion, NMS across chunk seams.",
    )
    p.add_argument("store", help="collection store (path or URL)")
    p.add_argument("--dog", type=partial(parse_floats, what="--dog"), default=(3.0, 5.0), metavar="S1,S2[,..]",
                   help="increasing DoG sigmas in voxels (default 3,5)")
    p.add_argument("--threshold-std", type=float, default=0.5, help="k in mean + k*std (default 0.5)")
    p.add_argument("--nms-distance", "--min-distance", dest="nms_distance", type=float, default=7.0,
                   help="NMS radius in voxels of the processed grid (default 7; --min-distance is the MiLoPYP name)")
    p.add_argument("--border", type=int, default=30, help="excluded band in x and y (default 30)")
    p.add_argument("--border-z", type=int, default=10, help="excluded band in z (default 10)")
    p.add_argument("--invert", action="store_true", help="bright particles instead of dark ones")
    p.add_argument("--top-k", type=int, default=None, help="at most K candidates per tomogram")
    p.add_argument("--recentre", default="auto", metavar="R|auto|off",
                   help="move each candidate onto its blob's density centre (a mean shift of radius R level-0 voxels, "
                   "about the largest particle's radius), then NMS again; auto (default): 2.4 x the largest --dog "
                   "sigma, 12 at the default; off: MiLoPYP's DoG peaks, which sit on the lobes of large particles")
    p.add_argument("--table", default="candidates", help="output table name (default candidates)")
    p.add_argument("--names", default=None, help="comma-separated tomogram names (default all)")
    p.set_defaults(handler=run, needs_cluster=True)


def run(args: argparse.Namespace) -> int:
    """Handler: :func:`milotile.stages.mine.mine`."""
    from milotile.stages.mine import mine
    from milotile.store import open_collection

    col = open_collection(args.store)
    names = [n for n in args.names.split(",") if n] if args.names else None
    df = mine(col, dog=args.dog, threshold_std=args.threshold_std, nms_distance=args.nms_distance,
              border=args.border, border_z=args.border_z, invert=args.invert, names=names, table=args.table,
              top_k=args.top_k, recentre=args.recentre)
    logger.info("mined %d candidates in %d tomograms -> tables/%s.parquet", len(df), df["tomogram"].nunique(), args.table)
    return 0
