"""``milotile refine train``: train the positive-unlabeled picker (``refine pick`` is added by refine_pick)."""

from __future__ import annotations

import argparse
import logging
from functools import partial

from milotile.commands import parse_ints

logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def _tau(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--tau must be a number in (0, 1) or 'auto', got {text!r}") from exc


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``refine`` group with ``train`` (and ``pick`` when :mod:`refine_pick` is present)."""
    grp = subparsers.add_parser(
        "refine",
        help="train a picker from sparse labels, pick particles",
        description="MiLoPYP's refinement module: a 2.5D U-Net trained with a positive-unlabeled focal loss, "
        "debiased voxel contrastive regularisation and flip consistency from a few labelled particles; "
        "picks are checked against the labels' radial density profiles (the shape check).",
    )
    sub = grp.add_subparsers(dest="refine_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "train",
        help="train the PU picker",
        description="Streams crops around the labelled particles (plus random crops) from STORE, trains, validates "
        "on held-out labelled regions (Hungarian matching, P/R/F1) and writes RUN/best.pt, RUN/last.pt, "
        "options.json, log.csv and plots. Labels: any layout `milotile export`/formats reads (parquet/CSV table, "
        "MiLoPYP TSV, txt folder with --order, IMOD .mod, RELION STAR, copick JSON).",
    )
    p.add_argument("store", metavar="STORE", help="collection store (path or URL)")
    p.add_argument("--labels", required=True, metavar="FILE", help="training coordinates")
    p.add_argument("--val-labels", metavar="FILE", help="held-out coordinates for validation")
    p.add_argument("--order", choices=("xyz", "xzy", "zxy", "yxz"), help="column order of bare txt coordinate files")
    p.add_argument("--out", metavar="RUN", help="run folder (default STORE/runs/refine-<time>)")
    p.add_argument("--bbox", type=float, default=16, help="particle box in level-0 voxels (default 16)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs (default: about 600 labelled crops, 6-20 epochs: 20 for 6 labels, 7 for 18)")
    p.add_argument("--arch", default="unet4", choices=("unet4", "unet5", "ressmall", "unet_4", "unet_5", "ressmall_18"),
                   help="architecture (default unet4)")
    p.add_argument("--start-filts", type=int, default=None, help="U-Net width of the first level (default 16)")
    p.add_argument("--z-dilation", type=int, default=None,
                   help="z dilation of the 3D head: 1 = 7 slices of z context, 2 = 11, 4 = 19 "
                        "(default from --bbox: clip(round(bbox/6), 2, 4))")
    p.add_argument("--batch-size", type=int, default=4, help="crops per step (default 4)")
    p.add_argument("--crop", type=partial(parse_ints, n=3, what="--crop"), default=None, metavar="Z,Y,X",
                   help="model-input crop (default DEPTH,64,64 with DEPTH = 4 z-dilation + 4: 12 for --bbox 10, "
                        "20 for --bbox 24; z in compressed slices with --compress)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--tau", type=_tau, default=0.01,
                   help="PU class prior (default 0.01), or 'auto': estimated from the labelled tomograms")
    p.add_argument("--tta", type=int, default=4, help="in-plane symmetries averaged when predicting (1-8, default 4; 1 = none)")
    p.add_argument("--temp", type=float, default=0.07, help="InfoNCE temperature (default 0.07)")
    p.add_argument("--cr-weight", type=float, default=0.1, help="contrastive weight (default 0.1)")
    p.set_defaults(no_contrastive=True)
    p.add_argument("--contrastive", dest="no_contrastive", action="store_false",
                   help="add MiLoPYP's voxel contrastive + flip-consistency terms (two views: twice the cost)")
    p.add_argument("--no-contrastive", dest="no_contrastive", action="store_true",
                   help="train the PU focal loss only (default)")
    p.add_argument("--thresh", type=float, default=0.8, help="target value of hard positives (default 0.8)")
    p.add_argument("--classes", nargs="?", const="all", default=None, metavar="A,B",
                   help="one output channel per class (all classes, or the comma-separated ones)")
    p.add_argument("--gauss", type=float, default=0.0, help="Gaussian pre-filter sigma (default 0 = off)")
    p.add_argument("--compress", action="store_true", help="max-compress slice pairs along z")
    p.add_argument("--val-fraction", type=float, default=None, help="labels held out when no --val-labels")
    p.add_argument("--repeats", type=int, default=5, help="crops per labelled particle and epoch (default 5)")
    p.add_argument("--self-training", type=int, default=0, metavar="ROUNDS",
                   help="rounds in which confident picks of the labelled tomograms become extra positives (default 0)")
    p.add_argument("--extra-positives", metavar="FILE",
                   help="more positives trained on like labels but not used to choose the pick threshold "
                        "(e.g. `explore select` output)")
    p.add_argument("--no-shape-check", dest="shape_check", action="store_false",
                   help="do not fit the shape check (radial profiles of the labels, used by `refine pick` to lower "
                        "the scores of peaks unlike them)")
    p.add_argument("--pu-risk", choices=("clip", "nnpu", "pn"), default="clip",
                   help="non-negative correction of the PU risk (default clip, as MiLoPYP)")
    p.add_argument("--debug-slices", type=partial(parse_ints, what="--debug-slices"), default=None, metavar="Z1,Z2",
                   help="draw these z slices of the validation regions as PNGs")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=317, help="random seed (default 317)")
    p.add_argument("--resume", action="store_true", help="continue RUN/last.pt")
    p.set_defaults(handler=run)
    from milotile.commands.refine_pick import register_pick

    register_pick(sub)


def _arch_config(args: argparse.Namespace) -> dict | None:
    cfg = {k: v for k, v in (("start_filts", args.start_filts), ("z_dilation", args.z_dilation)) if v is not None}
    return cfg or None


def run(args: argparse.Namespace) -> int:
    """Handler of ``refine train``: :func:`milotile.refine.train`."""
    from milotile.formats import read_labels
    from milotile.refine.labels import load_label_table
    from milotile.refine.train import train
    from milotile.store import open_collection

    col = open_collection(args.store)
    labels = args.labels
    if args.order is not None:
        labels = read_labels(args.labels, col, order=args.order)
    val = args.val_labels
    if val is not None and args.order is not None:
        val = read_labels(val, col, order=args.order)
    labels = load_label_table(labels, col, "labels")
    classes = None
    if args.classes == "all":
        classes = True
    elif args.classes:
        classes = [c for c in args.classes.split(",") if c]
    picker = train(
        col, labels, val_labels=val, bbox=args.bbox, epochs=args.epochs, arch=args.arch,
        arch_config=_arch_config(args), batch_size=args.batch_size,
        crop=args.crop, lr=args.lr, tau=args.tau, temp=args.temp, cr_weight=args.cr_weight,
        contrastive=not args.no_contrastive, thresh=args.thresh, classes=classes, gauss=args.gauss,
        compress=args.compress, out=args.out, resume=args.resume, seed=args.seed, device=args.device,
        val_fraction=args.val_fraction, repeats=args.repeats, tta=args.tta, debug_slices=args.debug_slices,
        num_workers=args.num_workers, self_training=args.self_training, shape_check=args.shape_check,
        pu_risk=args.pu_risk, extra_positives=load_label_table(args.extra_positives, col, "extra positives") if args.extra_positives else None,
    )
    logger.info("trained picker %s -> %s", picker, picker.path)
    return 0
