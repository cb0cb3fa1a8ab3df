"""``milotile explore train|embed``: SimSiam exploration model training and embedding."""

from __future__ import annotations

import argparse
import logging

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["register", "run", "run_train", "run_embed"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``explore`` sub-command with ``train`` and ``embed``."""
    p = subparsers.add_parser(
        "explore",
        help="train the SimSiam exploration model and embed candidate patches",
        description="Self-supervised exploration (MiLoPYP): train on a patch bank, then embed every patch.",
    )
    sub = p.add_subparsers(dest="explore_command", metavar="ACTION", required=True)

    t = sub.add_parser(
        "train",
        help="train on the store's patch bank",
        description="Train a SimSiam model on patches/<key> of STORE; writes a run folder with "
        "options.json, log.csv/log.jsonl, loss.png, last.pt and checkpoints/epoch-N.pt.",
    )
    t.add_argument("store", help="collection store (path or URL)")
    t.add_argument("--mode", choices=["3d", "2d3d"], default=None,
                   help="3d: slab patches; 2d3d: tilt-sum + slice patches (default: from the bank)")
    t.add_argument("--key", default=None, help="patch bank key (default: the only bank)")
    t.add_argument("--bbox", type=int, default=None, help="patch side in pixels; smaller than the bank = centre crop")
    t.add_argument("--epochs", type=int, default=20, help="number of epochs (default 20)")
    t.add_argument("--batch-size", type=int, default=256, help="patches per step (default 256)")
    t.add_argument("--lr", type=float, default=0.05, help="base learning rate (default 0.05)")
    t.add_argument("--optimizer", choices=["sgd", "sgd-plain", "adamw"], default="sgd",
                   help="sgd: momentum 0.9 + weight decay; sgd-plain: MiLoPYP's plain SGD (default sgd)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    t.add_argument("--no-cosine", action="store_true", help="constant learning rate instead of cosine decay")
    t.add_argument("--out", default=None, help="run folder (default STORE/runs/explore-<mode>-<key>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--save-every", type=int, default=10, help="keep a checkpoint every N epochs (default 10)")
    t.add_argument("--seed", type=int, default=317, help="random seed (default 317)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    t.add_argument("--weights", default=None, metavar="PATH", help="local weights file for initialisation")
    t.add_argument("--feature", choices=["pred", "proj", "fc", "trunk"], default="pred",
                   help="default embedding output stored with the model (default pred, as MiLoPYP)")
    t.set_defaults(handler=run, needs_cluster=False)

    e = sub.add_parser(
        "embed",
        help="embed every patch of a bank with a trained model",
        description="Write embeddings/<key> (N x D float32) and tables/embeddings-<key>.parquet; the "
        "model's contract supplies mode, bbox and normalisation.",
    )
    e.add_argument("store", help="collection store (path or URL)")
    e.add_argument("--model", required=True, metavar="CKPT", help="checkpoint written by `explore train`")
    e.add_argument("--key", default=None, help="patch bank key (default: the only / the trained bank)")
    e.add_argument("--batch-size", type=int, default=512, help="patches per forward pass (default 512)")
    e.add_argument("--feature", choices=["pred", "proj", "fc", "trunk"], default=None,
                   help="embedding output (default: the model's)")
    e.add_argument("--out-key", default=None, help="output name (default: the bank key)")
    e.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    e.add_argument("--overwrite", action="store_true", help="recompute even if up to date")
    e.set_defaults(handler=run, needs_cluster=True)


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``explore train``."""
    from milotile.explore import train

    enc = train(
        args.store, key=args.key, mode=args.mode, bbox=args.bbox, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
        cosine=not args.no_cosine, out=args.out, seed=args.seed, resume=args.resume,
        save_every=args.save_every, device=args.device, weights=args.weights, feature=args.feature,
    )
    log.info("model: %s", enc.path)
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """Handler of ``explore embed``."""
    from milotile.explore import embed

    emb = embed(
        args.store, model=args.model, key=args.key, batch_size=args.batch_size, feature=args.feature,
        out_key=args.out_key, device=args.device, overwrite=args.overwrite,
    )
    log.info("embeddings: %d x %d in embeddings/%s", len(emb), emb.array.shape[1], emb.key)
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``explore train`` / ``explore embed``."""
    if args.explore_command == "train":
        return run_train(args)
    if args.explore_command == "embed":
        return run_embed(args)
    raise InputError(f"unknown explore action {args.explore_command!r}; use train or embed.")
