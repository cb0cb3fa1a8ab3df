"""``milotile ingest`` and ``milotile info``."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ingest`` and ``info``."""
    p = sub.add_parser(
        "ingest",
        help="ingest MRC tomograms (+ aligned tilt series) into a collection store",
        description="SOURCE is a MiLoPYP manifest (image_name rec_path [tilt_path angle_path]), a folder of "
        ".rec/.mrc (matching .tlt + tilt stack picked up by name) or single files. Volumes are copied chunk by "
        "chunk (bounded memory) into OME-Zarr multiscale images (z, y, x in Å). Re-ingesting an unchanged "
        "file is a no-op.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--store", required=True, help="collection store path or URL (created if missing)")
    p.add_argument("--order", choices=["zxy", "xzy", "xyz", "yxz"], default=None,
                   help="which MRC axis is the depth (default: the MRC sections, zxy)")
    p.add_argument("--voxel-size", type=float, default=None, metavar="A", help="override the header voxel size (Å)")
    p.add_argument("--tilt-axis-angle", type=float, default=0.0, metavar="DEG",
                   help="tilt-axis direction of the aligned stacks, degrees from the image y axis (0 = IMOD)")
    p.add_argument("--overwrite", action="store_true", help="replace tomograms whose source changed")
    p.add_argument("--quick-check", action="store_true",
                   help="tell unchanged sources by size, mtime and 64 sampled blocks (milliseconds) instead of "
                   "hashing every byte again (default: the whole-file SHA-1, which sees any edit)")
    p.add_argument("--copick-tomo-type", default=None, metavar="TYPE",
                   help="copick projects (a copick_config.json SOURCE): tomogram type to ingest (default: the only "
                   "or first); the project's picks go into the table copick-picks; the project is never written")
    p.set_defaults(handler=run_ingest, needs_cluster=True)

    q = sub.add_parser("info", help="list the tomograms and derived data of a store")
    q.add_argument("store")
    q.set_defaults(handler=run_info, needs_cluster=False)

    u = sub.add_parser("unlock", help="remove the writer lock a dead process left on a store output",
                       description="A writer lock (STORE/.locks/) whose process died on this host is cleared "
                       "automatically by the next writer; a lock left by a process on another host is removed "
                       "with this command once that process is known to be gone. `milotile info` lists locks.")
    u.add_argument("store")
    u.add_argument("path", help="the locked output, as printed (e.g. derived/preprocessed/tomo_001)")
    u.set_defaults(handler=run_unlock, needs_cluster=False)


def run_ingest(args: argparse.Namespace) -> int:
    """Handler of ``milotile ingest``."""
    from milotile.store import ingest
    from milotile.store.copick_tree import is_copick_config

    col = ingest(args.sources, args.store, order=args.order, voxel_size=args.voxel_size,
                 tilt_axis_angle=args.tilt_axis_angle, overwrite=args.overwrite,
                 copick_tomo_type=args.copick_tomo_type, quick_check=args.quick_check)
    configs = [s for s in args.sources if is_copick_config(s)]
    if configs:
        import pandas as pd

        from milotile.formats._common import collection_info
        from milotile.formats.copick import COPICK_PICKS_TABLE, copick_picks

        info = collection_info(col)
        tables = [t for t in (copick_picks(c, info) for c in configs) if t is not None]
        if tables:
            picks = pd.concat(tables, ignore_index=True)
            col.write_table(COPICK_PICKS_TABLE, picks)
            log.info("copick picks: %d points into table %s", len(picks), COPICK_PICKS_TABLE)
    log.info("%s now holds %d tomograms", col.url, len(col))
    return 0


def run_unlock(args: argparse.Namespace) -> int:
    """Handler of ``milotile unlock``: remove the writer lock of a dead writer."""
    from milotile.store.lock import unlock

    info = unlock(args.store, args.path)
    print(f"removed the writer lock of {args.path} held by pid {info.get('pid', '?')} on {info.get('host', '?')}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Handler of ``milotile info``: prints names, shapes, voxel sizes and derived data."""
    from milotile.store import open_collection

    col = open_collection(args.store, mode="r")
    info = col.info()
    print(f"{col.url}: {len(col)} tomograms")
    if len(info):
        print(info.to_string(index=False))
        print("re-ingest compares each source's whole-file fingerprint (`ingest --quick-check`: size, mtime and "
              "sampled blocks)")
    derived = col.derived(status=True)
    if derived:
        print("derived:")
        for stage, names in derived.items():
            print(f"  {stage}: {', '.join(_label(n, st) for n, st in names.items())}")
    tables = col.tables()
    if tables:
        print("tables:")
        for t in tables:
            print(f"  {t}: {len(col.read_table(t))} rows{_mark(col.output_status(f'tables/{t}'))}")
    for kind, title in (("patches", "patch banks"), ("embeddings", "embeddings")):
        g = col.group(kind)
        if g is not None:
            print(f"{title}: " + ", ".join(_label(n, col.output_status(f"{kind}/{n}")) for n, _ in g.members()))
    _print_locks(col)
    images = col.image_paths()
    if images:
        print("images (open with: napari --plugin napari-ome-zarr <store>/<path>):")
        for kind, paths in images.items():
            for p in paths:
                print(f"  {kind:13s} {p}")
    return 0


def _mark(status: str) -> str:
    """`` (stale)`` / `` (incomplete)``: an output is never listed as done when it is not."""
    return "" if status == "complete" else f" ({status})"


def _label(name: str, status: str) -> str:
    return name + _mark(status)


def _print_locks(col) -> None:  # noqa: ANN001
    from milotile.store.lock import list_locks

    locks = list_locks(col)
    if locks:
        print("writer locks:")
        for lk in locks:
            state = "stale, cleared by the next writer on this host" if lk["stale"] else "held"
            print(f"  {lk.get('path')}: {lk.get('command', '?')} (pid {lk.get('pid', '?')} on {lk.get('host', '?')}; {state})")
