"""``milotile segments ingest|index|features|train|embed|cluster``: segment clustering (EManalysis, fixed)."""

from __future__ import annotations

import argparse
import json
import logging

from milotile.commands import parse_floats, parse_ints
from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["register", "run"]


def _voxel(text: str) -> tuple[float, ...]:
    vals = parse_floats(text, None, "--voxel-size")
    if len(vals) not in (1, 3):
        raise argparse.ArgumentTypeError(f"--voxel-size needs 1 or 3 comma-separated numbers (z,y,x Å), got {text!r}")
    return vals * 3 if len(vals) == 1 else vals


def _weights(text: str) -> tuple[float, ...]:
    return parse_floats(text, None, "--weights")


def _chunks(text: str) -> tuple[int, ...]:
    return parse_ints(text, 3, "--chunks")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``segments`` sub-command and its actions."""
    p = subparsers.add_parser(
        "segments",
        help="cluster segmented objects (mitochondria, organelles) by hand-crafted and learned shape features",
        description="EManalysis's capabilities on chunked label volumes of any size: ingest -> features -> "
        "(train -> embed) -> cluster, all stored in STORE.",
    )
    sub = p.add_subparsers(dest="segments_command", metavar="ACTION", required=True)

    i = sub.add_parser("ingest", help="copy an EM volume and its instance labels into the store and index objects",
                       description="Inputs: MRC, multi-page TIFF, a folder of PNG/TIFF slices (natural order), "
                       "HDF5 (--dataset) or Zarr/OME-Zarr. Labels: integer object ids (0 = background).")
    i.add_argument("--em", required=True, help="EM volume")
    i.add_argument("--labels", required=True, help="instance labels (or a semantic mask with --connected-components)")
    i.add_argument("--store", required=True, help="collection store (created if missing)")
    i.add_argument("--classes", default=None,
                   help="class volume, or per-object table (parquet/csv with id,class), for evaluation")
    i.add_argument("--voxel-size", type=_voxel, default=None, metavar="Z,Y,X",
                   help="Å per voxel (default: from the EM file, else voxel units)")
    i.add_argument("--name", default="volume", help="volume name in the store (default 'volume')")
    i.add_argument("--dataset", default=None, help="HDF5 dataset / Zarr array path of the EM input")
    i.add_argument("--labels-dataset", default=None, help="HDF5 dataset / Zarr array path of the labels (default --dataset)")
    i.add_argument("--connected-components", action="store_true",
                   help="split a semantic mask into 6-connected objects across chunk seams")
    i.add_argument("--chunks", type=_chunks, default=(64, 256, 256), metavar="Z,Y,X", help="zarr chunks (default 64,256,256)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing volume of that name")
    i.set_defaults(handler=run, needs_cluster=True, creates_store=True)

    x = sub.add_parser("index", help="recompute tables/objects.parquet from the stored labels")
    x.add_argument("store")
    x.add_argument("--name", default=None, help="segment volume (default: the only one)")
    x.set_defaults(handler=run, needs_cluster=True)

    f = sub.add_parser("features", help="hand-crafted features, shape cubes and surface points per object",
                       description="Writes tables/segment-features.parquet (units in its metadata), "
                       "segments/<name>/crops and segments/<name>/points.")
    f.add_argument("store")
    f.add_argument("--name", default=None)
    f.add_argument("--crop-size", type=int, default=32, help="shape cube side for learned features (0: none; default 32)")
    f.add_argument("--points", type=int, default=256, help="surface points per object (0: none; default 256)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(handler=run, needs_cluster=True)

    t = sub.add_parser("train", help="train a learned shape model (simsiam, vae, pointae) on the objects")
    t.add_argument("store")
    t.add_argument("--kind", required=True, choices=["simsiam", "vae", "pointae"])
    t.add_argument("--name", default=None)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default per kind)")
    t.add_argument("--out", default=None, help="run folder (default STORE/runs/segments-<kind>-<name>)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    t.set_defaults(handler=run, needs_cluster=True)

    e = sub.add_parser("embed", help="embed every object with a trained model -> tables/segment-<kind>.parquet")
    e.add_argument("store")
    e.add_argument("--kind", required=True, choices=["simsiam", "vae", "pointae"])
    e.add_argument("--name", default=None)
    e.add_argument("--model", default=None, help="checkpoint (default: the run folder's last.pt)")
    e.add_argument("--device", default=None)
    e.add_argument("--batch-size", type=int, default=256)
    e.set_defaults(handler=run, needs_cluster=True)

    c = sub.add_parser("cluster", help="cluster the objects on weighted feature groups and evaluate vs classes",
                       description="Feature groups: size, surface, sphericity, circularity, skeleton, axes, "
                       "thickness, nn, scale, simsiam, vae, pointae. Writes tables/segment-clusters.parquet, "
                       "labels/clusters (value = cluster + 1) and plots.")
    c.add_argument("store")
    c.add_argument("--name", default=None)
    c.add_argument("--features", default="size,sphericity,skeleton,axes", help="comma-separated feature groups")
    c.add_argument("--weights", type=_weights, default=None, help="one weight per feature group (default 1)")
    c.add_argument("--algorithm", default="kmeans",
                   choices=["kmeans", "affinity", "spectral", "agglomerative", "dbscan", "hdbscan"])
    c.add_argument("--n-clusters", type=int, default=4, help="for kmeans, spectral, agglomerative (default 4)")
    c.add_argument("--eps", type=float, default=0.5, help="dbscan radius on standardised rows (default 0.5)")
    c.add_argument("--min-samples", type=int, default=5, help="dbscan/hdbscan (default 5)")
    c.add_argument("--min-cluster-size", type=int, default=10, help="hdbscan (default 10)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-relabel", action="store_true", help="do not write labels/clusters")
    c.add_argument("--plots", default=None, metavar="DIR", help="plot folder (default STORE/plots/segments-<name>)")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("--map", choices=["auto", "umap", "pca"], default="auto", help="2-D map method (default auto)")
    # clustering runs in this process (scikit-learn on N feature rows); the relabelled mask is
    # written with dask's threads, so no cluster start-up is paid here
    c.set_defaults(handler=run, needs_cluster=False)


def run(args: argparse.Namespace) -> int:  # noqa: C901 - a flat dispatch
    """Dispatch the ``segments`` actions."""
    import milotile.segments as sg

    act = args.segments_command
    if act == "ingest":
        vol = sg.ingest_segments(args.em, args.labels, args.store, name=args.name, classes=args.classes,
                                 voxel_size=args.voxel_size, dataset=args.dataset, labels_dataset=args.labels_dataset,
                                 connected_components=args.connected_components, chunks=args.chunks,
                                 overwrite=args.overwrite)
        log.info("segments: %d objects in %s/segments/%s", vol.meta["n_objects"], args.store, vol.name)
    elif act == "index":
        ob = sg.index_objects(args.store, args.name)
        log.info("segments index: %d objects", len(ob))
    elif act == "features":
        ft = sg.compute_features(args.store, args.name, crop_size=args.crop_size, n_points=args.points, seed=args.seed)
        log.info("segments features: %d objects", len(ft))
    elif act == "train":
        ck = sg.train_model(args.store, args.kind, name=args.name, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, out=args.out, resume=args.resume, seed=args.seed, device=args.device)
        log.info("model: %s", ck)
    elif act == "embed":
        sg.embed_objects(args.store, args.kind, name=args.name, model=args.model, device=args.device,
                         batch_size=args.batch_size)
    elif act == "cluster":
        res = sg.cluster_objects(args.store, name=args.name, features=args.features, weights=args.weights,
                                 algorithm=args.algorithm, n_clusters=args.n_clusters, seed=args.seed,
                                 relabel=not args.no_relabel, **_options(args))
        if not args.no_plots:
            sg.plot_clusters(args.store, args.plots, name=args.name, method=args.map, seed=args.seed)
        print(json.dumps({"algorithm": res.algorithm, "features": res.features, "clusters": res.n_clusters,
                          "objects": len(res.table), "scores": res.scores}))
    else:  # pragma: no cover - argparse restricts the choices
        raise InputError(f"unknown segments action {act!r}.")
    return 0


def _options(args: argparse.Namespace) -> dict:
    if args.algorithm == "dbscan":
        return {"eps": args.eps, "min_samples": args.min_samples}
    if args.algorithm == "hdbscan":
        return {"min_samples": args.min_samples, "min_cluster_size": args.min_cluster_size}
    return {}
