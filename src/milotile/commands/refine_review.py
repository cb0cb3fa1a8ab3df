"""``milotile refine review`` (the review page) and ``milotile refine retrain`` (the next round), registered by ``refine``."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_review_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``refine review`` and ``explore serve --picks``."""
    p.add_argument("--name", default="review",
                   help="review name: verdicts go to tables/labels-NAME and tables/negatives-NAME (default review)")
    p.add_argument("--who", default=None, help="reviewer recorded with each verdict (default the login name)")
    p.add_argument("--threshold", type=float, default=None,
                   help="the picks' threshold (default the table's, else the median score)")
    p.add_argument("--box", type=float, default=None,
                   help="thumbnail box in voxels (default the picker's bbox; imported picks: 2 x radius, else 32)")
    p.add_argument("--sample-every", type=int, default=3,
                   help="every N-th queue item is drawn at random from all picks (the unbiased sample; default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")


def review_app(col: object, picks: str, args: argparse.Namespace) -> object:
    """The :class:`milotile.explore.serve.review.ReviewApp` the options describe."""
    from milotile.explore.serve.review import ReviewApp

    return ReviewApp(col, picks, name=args.name, who=args.who, threshold=args.threshold, box=args.box,
                     sample_every=args.sample_every, seed=args.seed)


def register_review(refine_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``review`` and ``retrain`` to the ``milotile refine`` sub-commands."""
    p = refine_sub.add_parser(
        "review",
        help="accept or reject picks in the browser (one port)",
        description="Serves the review page: the picks as thumbnails (xy, xz, yz slices at the picker's box), the "
        "ones nearest the threshold first, every third one from a random sample stratified at the threshold (unbiased precision and recall estimates); "
        "keys y / n / 1-4 (reject with a reason) / u (undo) / arrows; a slice view with the picks as circles, the "
        "heatmap and click-to-add. Verdicts are written into STORE as they are made: tables/labels-NAME "
        "(accepted and added) and tables/negatives-NAME (rejected). From a laptop: ssh -L 7000:localhost:7000 HOST.",
    )
    p.add_argument("store", metavar="STORE")
    p.add_argument("--picks", default="picks", metavar="TABLE",
                   help="a table of STORE (default picks; `picks-all` after retrain holds the candidates below the "
                        "threshold too) or a file: STAR, copick JSON, IMOD .mod, MiLoPYP TSV, parquet/CSV")
    add_review_options(p)
    p.add_argument("--port", type=int, default=7000, help="port (default 7000)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0 for all)")
    p.set_defaults(handler=run_review, needs_cluster=False)

    r = refine_sub.add_parser(
        "retrain",
        help="the next round: fine-tune with the review's verdicts, pick, threshold from the reviewed sample",
        description="Fine-tunes the picker of RUN (its weights and recipe, a third of the epochs) on its labels plus "
        "the accepted and added particles, its negatives plus the rejected picks; the random-sample verdicts are "
        "held out (unless --train-on-sample) and choose the new threshold (estimated F1 optimum, Wilson intervals). "
        "Prints the estimates of both rounds: the new picks and the reviewed ones re-thresholded without training "
        "(`refine rethreshold` writes those). "
        "Writes the new run, tables/picks (at the threshold) and tables/picks-all (every candidate down to --floor, "
        "for the next review).",
    )
    r.add_argument("store", metavar="STORE")
    r.add_argument("--from", dest="run", required=True, metavar="RUN", help="previous picker (run folder or best.pt)")
    r.add_argument("--name", default="review", help="review name (tables labels-NAME, negatives-NAME)")
    r.add_argument("--out", default=None, metavar="RUN", help="new run folder (default RUN-r<k> beside RUN)")
    r.add_argument("--train-on-sample", action="store_true",
                   help="also train on the random-sample verdicts (the threshold estimate is then optimistic)")
    r.add_argument("--target-precision", type=float, default=None,
                   help="lowest threshold reaching this estimated precision (default: best estimated F1)")
    r.add_argument("--floor", type=float, default=0.05, help="lowest score kept in tables/picks-all (default 0.05)")
    r.add_argument("--table", default="picks", help="picks table to write (default picks)")
    r.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default a third of a fresh run's)")
    r.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    r.set_defaults(handler=run_retrain, needs_cluster=False)

    t = refine_sub.add_parser(
        "rethreshold",
        help="the round without training: the reviewed picks at the threshold their verdicts choose",
        description="Chooses the threshold of the reviewed picks table from its verdicts (estimated F1 optimum of the "
        "informative and random-sample verdicts, or --target-precision) and writes the picks kept at it to --table. "
        "Seconds instead of a retraining; the threshold can only move within the reviewed table (review picks-all, "
        "the candidates down to the floor, to let it move down).",
    )
    t.add_argument("store", metavar="STORE")
    t.add_argument("--name", default="review", help="review name (tables labels-NAME, negatives-NAME)")
    t.add_argument("--picks", default=None, metavar="TABLE",
                   help="the reviewed picks table (default: the table of the latest verdict)")
    t.add_argument("--table", default="picks-reviewed", help="table to write (default picks-reviewed)")
    t.add_argument("--target-precision", type=float, default=None,
                   help="lowest threshold reaching this estimated precision (default: best estimated F1)")
    t.set_defaults(handler=run_rethreshold, needs_cluster=False)


def run_review(args: argparse.Namespace) -> int:
    """Handler of ``milotile refine review``."""
    from milotile.explore.serve import serve
    from milotile.store import open_collection

    col = open_collection(args.store)
    serve(col, host=args.host, port=args.port, review=review_app(col, args.picks, args), atlas=False)
    return 0


def run_retrain(args: argparse.Namespace) -> int:
    """Handler of ``milotile refine retrain``."""
    from milotile.refine.review import retrain
    from milotile.store import open_collection

    col = open_collection(args.store)
    over = {"epochs": args.epochs} if args.epochs is not None else {}
    res = retrain(col, args.run, name=args.name, out=args.out, train_on_sample=args.train_on_sample,
                  floor=args.floor, table=args.table, target_precision=args.target_precision, device=args.device,
                  **over)
    est = res["estimate"]
    line = (f"{len(res['picks'])} picks at threshold {res['threshold']:.3f} (run {res['run']}; "
            f"{res['n_labels']} labels, {res['n_negatives']} negatives; train {res['train_s']} s, pick {res['pick_s']} s)")
    if est is not None:
        line += f"; {_estimate_text(est)} from {est['n_sample']} sample verdicts"
    print(line)
    prev = res["previous"]
    if prev is not None:
        print(f"without training (`milotile refine rethreshold`): {prev['table']} at {prev['threshold']:.3f}, "
              f"{_estimate_text(prev['estimate'])} (estimates from 16-25 sample verdicts err by 0.1-0.2)")
    return 0


def _estimate_text(est: dict) -> str:
    return (f"estimated precision {est['precision']:.2f} [{est['precision_ci'][0]:.2f}-{est['precision_ci'][1]:.2f}], "
            f"recall {est['recall']:.2f} [{est['recall_ci'][0]:.2f}-{est['recall_ci'][1]:.2f}] (of the particles among the "
            f"reviewed picks; missed ones the picker never proposed do not count), F1 {est['f1']:.2f}")


def run_rethreshold(args: argparse.Namespace) -> int:
    """Handler of ``milotile refine rethreshold``."""
    from milotile.refine.review import apply_rethreshold
    from milotile.store import open_collection

    col = open_collection(args.store)
    res = apply_rethreshold(col, args.name, table=args.table, source=args.picks, target_precision=args.target_precision)
    print(f"{len(res['picks'])} of {len(res['candidates'])} picks of {res['table']} at threshold {res['threshold']:.3f} "
          f"-> tables/{args.table}; {_estimate_text(res)} from {res['n_sample']} reviewed picks")
    return 0
