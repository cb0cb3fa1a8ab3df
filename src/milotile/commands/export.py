"""``milotile export``: write a picks table as MiLoPYP txt, IMOD, RELION-5 STAR, copick, ndjson or CSV."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("milopyp", "imod", "star", "copick", "ndjson", "csv")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export``."""
    p = sub.add_parser(
        "export",
        help="export picks to MiLoPYP txt, IMOD .mod, RELION-5 STAR, copick, portal ndjson or CSV",
        description="PICKS is a picks table (parquet/CSV, or any coordinate file milotile reads) or the name of a "
        "table in --store (e.g. 'picks'). Coordinates are level-0 voxels; STAR and copick need the tomogram "
        "size / voxel size, taken from --store (or --voxel-size for copick). With --store, copick exports a "
        "complete project (config, picks and every tomogram as OME-NGFF 0.4 / Zarr v2); STAR writes "
        "tomograms.star beside the particles; IMOD points follow IMOD's pixel convention (x, y + 0.5).",
    )
    p.add_argument("picks", metavar="PICKS")
    p.add_argument("--format", "-f", dest="fmt", choices=FORMATS, required=True)
    p.add_argument("--out", "-o", required=True, help="output folder or file")
    p.add_argument("--store", default=None, help="collection store the picks belong to")
    p.add_argument("--user-id", default="milotile", help="copick user id (no underscores)")
    p.add_argument("--session-id", default="0", help="copick session id (no underscores; '0' = tool output)")
    p.add_argument("--object-name", default=None, help="copick / ndjson object name (default: the class column)")
    p.add_argument("--order", choices=["xzy", "xyz", "zxy", "yxz"], default=None,
                   help="column order: milopyp txt (default xzy, MiLoPYP's 'x z y') or IMOD points (default xyz)")
    p.add_argument("--voxel-size", type=float, default=None, metavar="A", help="voxel size (Å) when no --store")
    p.add_argument("--no-score", action="store_true", help="milopyp: leave out the score column")
    p.add_argument("--radius", type=float, default=None, metavar="VOXELS",
                   help="particle radius in voxels: IMOD point size, copick pickable-object radius (Å from it); "
                   "default for a store's picks table: half the picker's box")
    p.add_argument("--tomo-type", default="wbp", help="copick: tomogram type of the exported volumes (with --store)")
    p.add_argument("--overlay-root", default=None, metavar="URL",
                   help="copick: overlay_root written into a new config (default local://<absolute OUT>, which "
                   "copick opens from any folder; 'local://.' keeps the project movable but copick must then "
                   "run from inside it)")
    p.set_defaults(handler=run, needs_cluster=False)

    q = sub.add_parser(
        "export-ngff",
        help="write tomograms as OME-NGFF 0.4 / Zarr v2 (<out>/<name>.zarr; CryoET Data Portal / copick layout)",
        description="Every pyramid level, scale in Å, 256³ chunks, Blosc-LZ4, written chunk by chunk.",
    )
    q.add_argument("--store", required=True, help="collection store")
    q.add_argument("--out", "-o", required=True, help="output folder")
    q.add_argument("--names", nargs="*", default=None, help="tomograms (default all)")
    q.set_defaults(handler=run_ngff, needs_cluster=False)


def load_picks(spec: str, store: str | None):
    """A picks table from a file, or from ``tables/<spec>.parquet`` of ``store``.

    A store table written by ``refine pick`` gets a ``radius`` column (level-0 voxels, half the picker's
    box) when it has none, so exports (copick pickable objects, IMOD point size) carry the particle size.
    """
    import pandas as pd

    from milotile.errors import InputError
    from milotile.formats import read_labels

    path = Path(spec)
    if path.exists():
        if path.suffix.lower() in (".parquet", ".pq", ".csv"):
            df = pd.read_parquet(path) if path.suffix.lower() != ".csv" else pd.read_csv(path)
            if {"tomogram", "x", "y", "z"} <= set(df.columns):
                return df
        return read_labels(path, store)
    if store is not None:
        from milotile.store import open_collection

        col = open_collection(store, mode="r")
        if col.has_table(spec):
            df = col.read_table(spec)
            params = col.table_params(spec)
            radius = params.get("radius") or params.get("nms_distance")  # older picks: NMS radius = half the box
            if "radius" not in df.columns and radius:
                df = df.assign(radius=float(radius))
            return df
    raise InputError(f"Picks {spec!r} is neither a file nor a table of the store {store!r}.")


def run(args: argparse.Namespace) -> int:
    """Handler of ``milotile export``."""
    from milotile.formats import export

    col = None
    if args.store is not None:
        from milotile.store import open_collection

        col = open_collection(args.store, mode="r")
    picks = load_picks(args.picks, args.store)
    opts: dict = {}
    if args.radius is not None:
        picks = picks.assign(radius=float(args.radius))
    if args.fmt == "copick":
        opts.update(user_id=args.user_id, session_id=args.session_id, object_name=args.object_name,
                    tomo_type=args.tomo_type, overlay_root=args.overlay_root)
    elif args.fmt == "ndjson":
        opts.update(object_name=args.object_name)
    elif args.fmt == "milopyp":
        opts.update(with_score=not args.no_score)
        if args.order:
            opts["order"] = args.order
    elif args.fmt == "imod" and args.order:
        opts["order"] = args.order
    if args.voxel_size:
        opts["voxel_size"] = args.voxel_size
    files = export(picks, args.fmt, args.out, col=col, **opts)
    log.info("exported %d picks as %s: %d file(s) under %s", len(picks), args.fmt, len(files), args.out)
    print(f"wrote {len(files)} file(s) to {args.out}")
    return 0


def run_ngff(args: argparse.Namespace) -> int:
    """Handler of ``milotile export-ngff``."""
    from milotile.store import as_collection
    from milotile.store.ngff import export_tomograms_ngff04

    col = as_collection(args.store, mode="r")
    written = export_tomograms_ngff04(col, args.out, args.names)
    print(f"wrote {len(written)} OME-NGFF 0.4 image(s) to {args.out}")
    return 0
