"""``milotile explore train|embed``: SimSiam exploration model training and embedding."""

from __future__ import annotations

import argparse
import logging

from milotile.commands import parse_ints
from milotile.commands.recipe_options import add_recipe_options, recipe_from_args
from milotile.errors import InputError
from milotile.explore.recipe import FEATURES, ExploreRecipe

log = logging.getLogger(__name__)

#: the embedding outputs (milotile.explore.recipe imports no torch)
_FEATURES = FEATURES

__all__ = ["register", "run", "run_train", "run_embed", "run_atlas", "run_serve", "run_select"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``explore`` sub-command with ``train`` and ``embed``."""
    p = subparsers.add_parser(
        "explore",
        help="SimSiam exploration: train, embed, atlas (map + over-clusters), serve (selection app), select",
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
                   help="3d: slab patches; 2d3d: tilt halves (or MiLoPYP's tilt sum) + slice patches (default: from the bank)")
    t.add_argument("--key", default=None, help="patch bank key (default: the only bank)")
    t.add_argument("--out", default=None, help="run folder (default STORE/runs/explore-<mode>-<key>)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt with its recipe (--epochs may grow)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    t.add_argument("--weights", default=None, metavar="PATH", help="local weights file for initialisation")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel training in N processes (DDP: one per GPU, or gloo CPU processes); "
                   "under torchrun the group is taken from its environment instead")
    add_recipe_options(t.add_argument_group("recipe (milotile.explore.recipe.ExploreRecipe)"), ExploreRecipe)
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
    e.add_argument("--feature", choices=_FEATURES, default=None,
                   help="embedding output (default: the model's)")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average each embedding over the 8 flips/90° rotations of its patch (default: the model's)")
    e.add_argument("--out-key", default=None, help="output name (default: the bank key)")
    e.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    e.add_argument("--overwrite", action="store_true", help="recompute even if up to date")
    e.set_defaults(handler=run, needs_cluster=True, model_stage=True)
    _register_atlas(sub)


def _register_atlas(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``explore atlas`` / ``serve`` / ``select`` (the exploration atlas and target selection)."""

    a = sub.add_parser(
        "atlas",
        help="2D map, over-clusters, colours, plots and 3D colour maps of the embeddings",
        description="Fit the projection and over-clustering on a sample, apply them to every embedding in "
        "blocks on the Dask workers, and write tables/atlas-<key>.parquet, runs/atlas-<key>/ (reducer, "
        "plots) and a labels image per tomogram; reused when the parameters are unchanged.",
    )
    a.add_argument("store", help="collection store (path or URL)")
    a.add_argument("--key", default=None, help="embeddings key (default: the only one)")
    a.add_argument("--method", choices=["umap", "tsne", "pca"], default="umap", help="2D projection (default umap)")
    a.add_argument("--n-clusters", type=int, default=48, help="final clusters (default 48)")
    a.add_argument("--overcluster", type=int, default=256, help="k-means centroids before spectral clustering (default 256)")
    a.add_argument("--cluster-method", choices=["spectral", "hdbscan"], default="spectral",
                   help="k-means + spectral (MiLoPYP) or HDBSCAN on the map (default spectral)")
    a.add_argument("--neighbors", type=int, default=40, help="UMAP n_neighbors / t-SNE perplexity (default 40)")
    a.add_argument("--min-dist", type=float, default=0.3, help="UMAP min_dist (default 0.3)")
    a.add_argument("--fit-sample", type=int, default=50_000, help="rows the map and clusters are fitted on (default 50000)")
    a.add_argument("--pca", type=int, default=50, help="PCA dimensions before fitting; 0 keeps all (default 50)")
    a.add_argument("--outlier-z", type=float, default=3.0,
                   help="distance z-score above which a point is unassigned; 0 disables (default 3)")
    a.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    a.add_argument("--transform", choices=["knn", "model"], default="knn",
                   help="place rows outside --fit-sample by k-NN interpolation on the map (default) or with "
                   "the projection's own transform (~1.4 ms per row on 2 shared cores)")
    a.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    a.add_argument("--no-colormap3d", action="store_true", help="skip the per-tomogram 3D colour map")
    a.add_argument("--slices", type=lambda s: parse_ints(s, what="--slices"), default=None,
                   help="z slices to render in RGB, e.g. 40,60 (default: 3 through the candidates)")
    a.add_argument("--export-thumbnails", metavar="DIR", default=None, help="also write one PNG per candidate to DIR")
    a.add_argument("--overwrite", action="store_true", help="recompute even if up to date")
    a.set_defaults(handler=run, needs_cluster=True)

    s = sub.add_parser(
        "serve",
        help="the selection web app on one port",
        description="Serve the atlas map (WebGL), thumbnails, lasso/box selection and export on one port; "
        "from a laptop: ssh -L 7000:localhost:7000 HOST, then open http://localhost:7000/.",
    )
    s.add_argument("store", help="collection store (path or URL)")
    s.add_argument("--key", default=None, help="atlas key (default: the only atlas)")
    s.add_argument("--port", type=int, default=7000, help="port (default 7000)")
    s.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0 for all)")
    s.add_argument("--picks", default=None, metavar="TABLE",
                   help="also serve the review page (/review) for these picks (see `milotile refine review`)")
    from milotile.commands.refine_review import add_review_options

    add_review_options(s)
    s.set_defaults(handler=run, needs_cluster=False)

    c = sub.add_parser(
        "select",
        help="labels from chosen clusters, an app selection or a Phoenix/nextPYP parquet",
        description="Write tables/labels-<name>.parquet (read by `milotile refine train --labels`), a "
        "MiLoPYP coordinate TSV and MiLoPYP's interactive_info parquet.",
    )
    c.add_argument("store", help="collection store (path or URL)")
    c.add_argument("--key", default=None, help="atlas key (default: the only atlas)")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--clusters", type=lambda v: parse_ints(v, what="--clusters"), help="cluster ids, e.g. 3,7,12")
    g.add_argument("--subclusters", type=lambda v: parse_ints(v, what="--subclusters"),
                   help="sub-cluster ids (the atlas's k-means over-clusters, column subcluster), e.g. 40,113")
    g.add_argument("--selection", help="name of a selection exported from the app")
    g.add_argument("--parquet", help="parquet exported by nextPYP/Phoenix (name, coord) or a tomogram/x/y/z table")
    c.add_argument("--name", default=None, help="output name (default from the source)")
    c.add_argument("--class-name", default=None, help="class column value (default: the name)")
    c.add_argument("--tsv", default=None, metavar="FILE", help="also copy the MiLoPYP TSV to FILE")
    c.add_argument("--negatives", type=lambda v: v if v == "rest" else parse_ints(v, what="--negatives"),
                   metavar="IDS|rest",
                   help="cluster ids that are NOT the target (other species, membranes, gold): written to "
                        "tables/negatives-<name>.parquet for `milotile refine train --negatives`; 'rest': every "
                        "cluster holding none of the selection (the label-free rule: the picker learns what the "
                        "target is not)")
    c.set_defaults(handler=run, needs_cluster=False)


def run_atlas(args: argparse.Namespace) -> int:
    """Handler of ``explore atlas``."""
    from milotile.explore.atlas import atlas
    from milotile.explore.colormap3d import colour_map_3d
    from milotile.explore.plots import export_thumbnails, plot_all

    a = atlas(
        args.store, args.key, method=args.method, n_clusters=args.n_clusters, overcluster=args.overcluster,
        cluster_method=args.cluster_method, neighbors=args.neighbors, min_dist=args.min_dist,
        fit_sample=args.fit_sample, pca=args.pca or None, outlier_z=args.outlier_z or None, seed=args.seed,
        transform=args.transform, overwrite=args.overwrite,
    )
    log.info("atlas: tables/%s.parquet (%d points, %d clusters)", a.table_name, len(a), int(a.table["cluster"].max()) + 1)
    if not args.no_plots:
        for name, path in plot_all(a).items():
            log.info("plot %s: %s", name, path)
    if not args.no_colormap3d:
        res = colour_map_3d(a, slices=list(args.slices) if args.slices else 3)
        log.info("3D colour maps: %s", ", ".join(v["labels"] for v in res.values()))
    if args.export_thumbnails:
        export_thumbnails(a, args.export_thumbnails)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Handler of ``explore serve``."""
    from milotile.explore.serve import serve

    if args.picks is None:
        serve(args.store, args.key, host=args.host, port=args.port)
        return 0
    from milotile.commands.refine_review import review_app
    from milotile.store import open_collection

    col = open_collection(args.store)
    serve(col, args.key, host=args.host, port=args.port, review=review_app(col, args.picks, args))
    return 0


def run_select(args: argparse.Namespace) -> int:
    """Handler of ``explore select``."""
    import shutil

    from milotile.explore.atlas import load_atlas
    from milotile.explore.select import select, selection_dir

    labels = select(args.store, args.key, clusters=args.clusters, subclusters=args.subclusters,
                    selection=args.selection, parquet=args.parquet,
                    name=args.name, class_name=args.class_name, negatives=args.negatives)
    a = load_atlas(args.store, args.key)
    name = args.name or labels.attrs.get("name") or ""
    table = a.collection._table_path(f"labels-{name}") if name else None
    log.info("%d labels -> %s", len(labels), table or "tables/labels-<name>.parquet")
    if "negatives" in labels.attrs:
        log.info("%d negatives -> %s (refine train --negatives)", len(labels.attrs["negatives"]),
                 a.collection._table_path(f"negatives-{name}"))
    if args.tsv:
        shutil.copy(selection_dir(a) / f"{name}.tsv", args.tsv)
        log.info("MiLoPYP TSV: %s", args.tsv)
    return 0


def _train_rank(kwargs: dict) -> str | None:
    """One DDP rank of ``explore train --nproc N`` (module level so that it can be spawned)."""
    from milotile.explore import train

    kw = dict(kwargs)
    enc = train(kw.pop("store"), **kw)
    return None if enc.path is None else str(enc.path)


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``explore train`` (``--nproc N``: N DDP processes, see :mod:`milotile.nn.ddp`)."""
    from milotile.nn import ddp

    kwargs = dict(store=args.store, recipe=recipe_from_args(ExploreRecipe, args), key=args.key, mode=args.mode,
                  out=args.out, resume=args.resume, device=args.device, weights=args.weights)
    ddp.init_from_env()  # under torchrun: join its process group
    if args.nproc > 1 and not ddp.is_distributed():
        path = ddp.launch(_train_rank, args.nproc, kwargs)[0]
    else:
        path = _train_rank(kwargs)
    log.info("model: %s", path)
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """Handler of ``explore embed``."""
    from milotile.explore import embed

    emb = embed(
        args.store, model=args.model, key=args.key, batch_size=args.batch_size, feature=args.feature,
        out_key=args.out_key, device=args.device, overwrite=args.overwrite, tta=getattr(args, "tta", None),
    )
    log.info("embeddings: %d x %d in embeddings/%s", len(emb), emb.array.shape[1], emb.key)
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch ``explore train`` / ``explore embed``."""
    if args.explore_command == "train":
        return run_train(args)
    if args.explore_command == "embed":
        return run_embed(args)
    handlers = {"atlas": run_atlas, "serve": run_serve, "select": run_select}
    if args.explore_command in handlers:
        return handlers[args.explore_command](args)
    raise InputError(f"unknown explore action {args.explore_command!r}; use train, embed, atlas, serve or select.")
