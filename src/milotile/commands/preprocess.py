"""``milotile preprocess STORE``: Gaussian, global normalisation, contrast clip (and z compression/binning)."""

from __future__ import annotations

import argparse
import logging
from functools import partial

from milotile.commands import parse_floats

logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``preprocess`` sub-command."""
    p = subparsers.add_parser(
        "preprocess",
        help="denoise and normalise every tomogram and tilt series into the store",
        description="Gaussian denoising, global z-score and MiLoPYP's contrast clip to [0, 1], chunk by chunk; "
        "results go to derived/preprocessed/<name> and are reused when the parameters are unchanged.",
    )
    p.add_argument("store", help="collection store (path or URL)")
    p.add_argument("--gauss", type=float, default=0.8, help="Gaussian sigma in voxels, 0 for none (default 0.8)")
    p.add_argument("--compress", action="store_true", help="combine pairs of z slices (max, like MiLoPYP)")
    p.add_argument("--compress-how", choices=("max", "mean"), default="max", help="how two slices combine (default max)")
    p.add_argument("--bin", type=int, default=1, help="mean-binning factor (default 1)")
    p.add_argument("--clip", type=partial(parse_floats, n=2, what="--clip"), default=None, metavar="LO,HI",
                   help="contrast clip in std (default -3,3; -2.5,2 when --gauss 0)")
    p.add_argument("--quantize", action="store_true", help="round to 256 grey levels (MiLoPYP's uint8 step)")
    p.add_argument("--names", default=None, help="comma-separated tomogram names (default all)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if unchanged")
    p.set_defaults(handler=run, needs_cluster=True)


def run(args: argparse.Namespace) -> int:
    """Handler: :func:`milotile.stages.preprocess.preprocess`."""
    from milotile.stages.preprocess import preprocess
    from milotile.store import open_collection

    col = open_collection(args.store)
    names = [n for n in args.names.split(",") if n] if args.names else None
    done = preprocess(col, gauss=args.gauss, compress=args.compress, bin=args.bin, clip=args.clip,
                      compress_how=args.compress_how, quantize=args.quantize, names=names, overwrite=args.overwrite)
    logger.info("preprocessed %d tomograms", len(done))
    return 0
