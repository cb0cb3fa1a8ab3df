"""``milotile patches STORE``: cut a patch bank (slab, slice, cube, tilt sum) for a coordinate table."""

from __future__ import annotations

import argparse
import logging
import re
from functools import partial

from milotile.commands import parse_floats

logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``patches`` sub-command."""
    p = subparsers.add_parser(
        "patches",
        help="extract a patch bank for a coordinate table",
        description="Patches grouped by chunk and cut on workers into patches/<key>/data (N, S, C, bbox, bbox) "
        "with the aligned rows in tables/patches-<key>.parquet. 'tiltsum'/'tilthalves' check the tilt geometry first.",
    )
    p._negative_number_matcher = re.compile(r"^-\.?\d[\d.,:eE+-]*$")
    p.add_argument("store", help="collection store (path or URL)")
    p.add_argument("--table", default="candidates", help="coordinate table (default candidates)")
    p.add_argument("--bbox", type=int, default=36, help="patch side in pixels (default 36)")
    p.add_argument("--mode", default="slab", help="slab|slice|cube|tiltsum|tilthalves, comma-separated for channels (default slab; "
                   "2d3d: tilthalves,slice)")
    p.add_argument("--shifts", action="store_true", help="add MiLoPYP's four neighbour-shifted copies")
    p.add_argument("--no-normalize", dest="normalize", action="store_const", const=None, default="minmax",
                   help="keep raw values instead of per-patch min-max")
    # stages.patches.DEFAULT_TILT_WINDOW, spelled out so that parsing does not import dask (a test keeps them equal)
    p.add_argument("--tilt-window", type=partial(parse_floats, n=2, what="--tilt-window"), default=(-60.0, 60.0),
                   metavar="LOW,HIGH", help="tilt angles summed by tiltsum/tilthalves (default -60,60, every tilt of a "
                   "usual series; MiLoPYP: -20,20)")
    p.add_argument("--tilt-sign", default="auto", choices=("auto", "1", "-1", "+1"),
                   help="projection handedness; auto checks it per tomogram (default)")
    p.add_argument("--out-of-bounds", choices=("pad", "drop"), default="pad",
                   help="reflect-pad and flag patches leaving the volume, or drop them (default pad)")
    p.add_argument("--key", default=None, help="bank name (default derived from the options)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if unchanged")
    p.set_defaults(handler=run, needs_cluster=True)


def run(args: argparse.Namespace) -> int:
    """Handler: :func:`milotile.stages.patches.extract_patches`."""
    from milotile.stages.patches import extract_patches
    from milotile.store import open_collection

    col = open_collection(args.store)
    key = extract_patches(col, table=args.table, bbox=args.bbox, modes=args.mode, shifts=args.shifts,
                          normalize=args.normalize, tilt_window=tuple(args.tilt_window), tilt_sign=args.tilt_sign,
                          out_of_bounds=args.out_of_bounds, key=args.key, overwrite=args.overwrite)
    logger.info("patch bank patches/%s", key)
    return 0
