"""The ``milotile`` command: one sub-command per stage, a thin layer over the Python API.

Global options choose the Dask cluster (``--scheduler``, ``--workers``, ``--threads-per-worker``,
``--cluster-config``); stages that compute start it before running. Bad input is reported as one
sentence on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence

from milotile.errors import InputError, StoreError

log = logging.getLogger("milotile")

# stage modules under milotile.commands, in the order they appear in --help
COMMAND_MODULES = (
    "store_cmds", "synth", "preprocess", "mine", "patches", "explore", "refine", "export", "demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="milotile",
        description=(
            "Map and pick macromolecules across whole collections of cryo-electron tomograms. "
            "Stages: synth -> ingest -> preprocess -> mine -> patches -> explore train/embed -> "
            "refine train/pick -> export; `milotile demo` runs them end to end on generated data."
        ),
    )
    parser.add_argument("--scheduler", metavar="ADDRESS", help="connect to a running Dask scheduler")
    parser.add_argument("--workers", type=int, metavar="N", help="local Dask workers (default: one per core)")
    parser.add_argument("--threads-per-worker", type=int, metavar="N", help="threads per local worker (default 1)")
    parser.add_argument("--cluster-config", metavar="YAML", help="cluster description (see config/cluster.yaml)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(f"milotile.commands.{mod}").register(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("distributed", "bokeh", "tornado", "numba", "asyncio", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


@contextlib.contextmanager
def cluster_from_args(args: argparse.Namespace):
    """Start the Dask cluster described by the global options (used by computing sub-commands)."""
    from milotile.cluster import cluster

    with cluster(
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        config=args.cluster_config,
    ) as client:
        yield client


def _check_cluster_args(args: argparse.Namespace) -> None:
    """Refuse ``--workers 0`` / ``--threads-per-worker 0`` for every command (not only computing ones)."""
    from milotile.cluster import _check_count

    _check_count("--workers", args.workers)
    _check_count("--threads-per-worker", args.threads_per_worker)


def _check_store_arg(args: argparse.Namespace) -> None:
    """A wrong STORE fails before a cluster starts (seconds instead of a cluster start-up)."""
    store = getattr(args, "store", None)
    if isinstance(store, str) and store:
        from milotile.store.collection import check_store

        check_store(store, must_exist=args.command != "ingest")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``milotile`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        _check_cluster_args(args)
        if getattr(args, "needs_cluster", False):
            _check_store_arg(args)
            with cluster_from_args(args):
                return int(args.handler(args) or 0)
        return int(args.handler(args) or 0)
    except (InputError, StoreError) as exc:
        print(f"milotile {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("milotile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
