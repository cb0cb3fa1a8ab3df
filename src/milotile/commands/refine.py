"""``milotile refine train``: train the positive-unlabeled picker (``pick``, ``review``, ``retrain``: refine_pick, refine_review)."""

from __future__ import annotations

import argparse
import logging
from functools import partial
from typing import Any

from milotile.commands import parse_ints
from milotile.commands.recipe_options import add_recipe_options, recipe_from_args

logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``refine`` group with ``train`` (and ``pick`` when :mod:`refine_pick` is present)."""
    from milotile.refine.recipe import PickerRecipe

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
        "options.json, log.csv and plots. Labels (and --negatives): any layout `milotile export`/formats reads "
        "(parquet/CSV/TSV table with a header, MiLoPYP TSV, txt folder with --order, IMOD .mod, RELION STAR, "
        "copick JSON). The recipe options below default to milotile.refine.recipe.PickerRecipe, the recipe "
        "chosen on benchmarks/refine_hard.py; --init-from fine-tunes a previous picker with its own recipe.",
    )
    p.add_argument("store", metavar="STORE", help="collection store (path or URL)")
    p.add_argument("--labels", required=True, metavar="FILE", help="training coordinates")
    p.add_argument("--negatives", metavar="FILE",
                   help="coordinates that are NOT the target (another species, junk, gold; e.g. `explore select "
                        "--negatives` output), trained as labelled negatives next to the PU term")
    p.add_argument("--val-labels", metavar="FILE", help="held-out coordinates for validation")
    p.add_argument("--order", choices=("xyz", "xzy", "zxy", "yxz"), help="column order of bare txt coordinate files")
    p.add_argument("--out", metavar="RUN", help="run folder (default STORE/runs/refine-<time>)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="fine-tune from this picker (RUN/best.pt or its run folder): its weights, recipe and geometry, "
                        "a fresh optimiser and a third of the epochs by default")
    p.add_argument("--classes", nargs="?", const="all", default=None, metavar="A,B",
                   help="one output channel per class (all classes, or the comma-separated ones)")
    p.add_argument("--extra-positives", metavar="FILE",
                   help="more positives trained on like labels but not used to choose the pick threshold "
                        "(e.g. `explore select` output)")
    p.add_argument("--debug-slices", type=partial(parse_ints, what="--debug-slices"), default=None, metavar="Z1,Z2",
                   help="draw these z slices of the validation regions as PNGs")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true", help="continue RUN/last.pt")
    add_recipe_options(p.add_argument_group("recipe (milotile.refine.recipe.PickerRecipe)"), PickerRecipe)
    p.set_defaults(handler=run)
    from milotile.commands.refine_pick import register_pick
    from milotile.commands.refine_review import register_review

    register_pick(sub)
    register_review(sub)


def run(args: argparse.Namespace) -> int:
    """Handler of ``refine train``: :func:`milotile.refine.train`."""
    from milotile.formats import read_labels
    from milotile.refine.labels import load_label_table
    from milotile.refine.recipe import PickerRecipe
    from milotile.refine.train import train
    from milotile.store import open_collection

    col = open_collection(args.store)

    def table(path: str | None, what: str) -> Any:
        if path is None:
            return None
        data = read_labels(path, col, order=args.order) if args.order is not None else path
        return load_label_table(data, col, what)

    classes: bool | list[str] | None = None
    if args.classes == "all":
        classes = True
    elif args.classes:
        classes = [c for c in args.classes.split(",") if c]
    given = recipe_from_args(PickerRecipe, args)
    picker = train(
        col, table(args.labels, "labels"), given if args.init_from is None else None,
        val_labels=table(args.val_labels, "validation labels"), negatives=table(args.negatives, "negatives"),
        extra_positives=table(args.extra_positives, "extra positives"), init_from=args.init_from, classes=classes,
        out=args.out, resume=args.resume, device=args.device, num_workers=args.num_workers,
        debug_slices=args.debug_slices, **(given.changed() if args.init_from is not None else {}),
    )
    logger.info("trained picker %s -> %s", picker, picker.path)
    return 0
