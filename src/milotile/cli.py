"""The ``milotile`` command: one sub-command per stage, a thin layer over the Python API.

Global options choose the Dask cluster (``--scheduler``, ``--workers``, ``--threads-per-worker``,
``--cluster-config``); stages that compute start it before running. Bad input is reported as one
sentence on stderr with exit status 2, without a traceback; a full disk, a quota, a read-only or
forbidden folder (:data:`FS_ERRORS`) with one sentence naming the path and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import math
import sys
import time
from collections.abc import Sequence

from milotile.errors import InputError, StoreError

log = logging.getLogger("milotile")

# stage modules under milotile.commands, in the order they appear in --help
COMMAND_MODULES = (
    "store_cmds", "synth", "preprocess", "mine", "patches", "explore", "refine", "export", "demo",
    "segments",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="milotile",
        description=(
            "Map and pick macromolecules across whole collections of cryo-electron tomograms. "
            "Stages: synth -> ingest -> preprocess -> mine -> patches -> explore train/embed/atlas/serve/select -> "
            "refine train/pick -> export; segments ingest/features/train/embed/cluster for segmented objects; "
            "`milotile demo` runs them end to end on generated data."
        ),
    )
    parser.add_argument("--scheduler", metavar="ADDRESS", help="connect to a running Dask scheduler")
    parser.add_argument("--workers", type=int, metavar="N", help="local Dask workers (default: one per core, at most 8)")
    parser.add_argument("--threads-per-worker", type=int, metavar="N", help="threads per local worker (default 1)")
    parser.add_argument("--cluster-config", metavar="YAML", help="cluster description (see config/cluster.yaml)")
    parser.add_argument("--local-scheduler", choices=["auto", "cluster", "threads", "sync"], default="auto",
                        help="without --scheduler/--cluster-config: auto (default) runs inputs below "
                        "MILOTILE_SMALL_JOB_MB (96 MiB) and CPU-only model inference (refine pick, explore embed) "
                        "in-process on threads and starts a LocalCluster otherwise; cluster / threads / sync force one")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(f"milotile.commands.{mod}").register(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("numba", "asyncio", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    # distributed's INFO lines (and its port warnings) only with -v
    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 1 else logging.INFO)
    if verbose >= 1:
        import os

        os.environ["MILOTILE_DASK_VERBOSE"] = "1"


def _work_bytes(args: argparse.Namespace) -> int | None:
    """Bytes of input a computing stage will read: source files (ingest) or the store's level-0 volumes."""
    import os

    sources = getattr(args, "sources", None)
    if sources:
        total = 0
        for src in sources:
            if os.path.isdir(src):
                total += sum(e.stat().st_size for e in os.scandir(src) if e.is_file())
            elif os.path.isfile(src):
                total += os.path.getsize(src)
        return total
    store = getattr(args, "store", None)
    if not store or not os.path.isdir(store):
        return None  # a remote store: leave the choice to the cluster
    from milotile.store import open_collection

    try:
        col = open_collection(store, mode="r")
        return int(sum(4 * math.prod(t.shape) for t in col))
    except (InputError, StoreError, OSError, KeyError):
        return None


@contextlib.contextmanager
def cluster_from_args(args: argparse.Namespace):
    """Start the Dask cluster described by the global options (used by computing sub-commands)."""
    from milotile.cluster import SMALL_JOB_BYTES, cluster, cuda_devices, local_scheduler

    kind = getattr(args, "local_scheduler", "auto")
    if args.scheduler is None and args.cluster_config is None and kind != "cluster":
        if kind == "auto" and getattr(args, "model_stage", False) and cuda_devices() == 0:
            # a network on the CPU releases the GIL and threads itself: worker processes only add start-up and
            # transfers (refine pick of 25 M voxels on 2 cores: 28 s with a LocalCluster, 17 s in-process)
            log.info("model inference on the CPU: in-process threads (--local-scheduler cluster starts workers)")
            kind = "threads"
        if kind == "auto":
            size = _work_bytes(args)
            if size is not None and size < SMALL_JOB_BYTES:
                log.info("input %.1f MiB < %.0f MiB: no process cluster needed", size / 2**20, SMALL_JOB_BYTES / 2**20)
                kind = "threads"
        if kind in ("threads", "sync"):
            with local_scheduler(kind, threads=args.threads_per_worker or args.workers):
                yield None
            return
    with cluster(
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        config=args.cluster_config,
    ) as client:
        yield client


def _io_snapshot(client) -> tuple[dict, int]:
    """Store I/O counters of this process plus every worker, and the number of parallel slots."""

    import milotile.iostats as iostats

    parts = [iostats.snapshot()]
    slots = 1
    if client is not None:
        try:
            parts += list(client.run(iostats.snapshot).values())
            slots = max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
        except Exception:  # noqa: BLE001 - a report must not fail the stage
            pass
    else:
        import dask

        from milotile.runtime import init_threads

        slots = int(dask.config.get("num_workers", None) or init_threads())
    return iostats.merge(parts), slots


def _report(command: str, t_ready: float, t_end: float, client, startup: float) -> dict:
    """Log one line: stage wall time = start-up + I/O + compute (and store traffic).

    Appended as a JSON line to ``$MILOTILE_REPORT_JSON`` when that is set.
    """
    import os

    io, slots = _io_snapshot(client)
    stage = t_end - t_ready
    io_wall = min(stage, io["io_seconds"] / slots)
    rep = {"command": command, "startup_s": startup, "io_s": io_wall, "compute_s": max(0.0, stage - io_wall),
           "wall_s": startup + stage, **io}
    log.info(
        "%s: %.1f s = start-up %.1f s + I/O %.1f s + compute %.1f s (store: %d metadata reads, %d chunk "
        "reads %.1f MiB, %d writes %.1f MiB, %d listings)", command, rep["wall_s"], startup, io_wall,
        rep["compute_s"], io["meta_reads"], io["chunk_reads"], io["bytes_read"] / 2**20, io["writes"],
        io["bytes_written"] / 2**20, io["listings"],
    )
    dest = os.environ.get("MILOTILE_REPORT_JSON")
    if dest:  # benchmarks collect the reports (one JSON line per stage)
        import json

        with open(dest, "a") as fh:
            fh.write(json.dumps(rep) + "\n")
    return rep


def _process_start() -> float:
    """When this process started (epoch seconds): start-up includes interpreter, imports and cluster."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except (ImportError, OSError):
        return time.time()


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

        # commands that create their store set ``creates_store`` (``segments ingest``)
        check_store(store, must_exist=args.command != "ingest" and not getattr(args, "creates_store", False))


#: File-system errors a write can meet, told in one sentence instead of a traceback (exit status 1).
FS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def fs_error(exc: BaseException) -> OSError | None:
    """The file-system error of :data:`FS_ERRORS` behind ``exc`` (itself, or its cause/context chain)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in FS_ERRORS:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def fs_error_message(err: OSError, args: argparse.Namespace) -> str:
    """One sentence: which path, what went wrong, and that the output is left incomplete."""
    path = err.filename or getattr(args, "store", None) or getattr(args, "out", None) or "the output"
    verb = "access" if err.errno in (errno.EACCES, errno.EPERM) else "write to"
    return (f"cannot {verb} {path}: {FS_ERRORS[err.errno]}; what was being written is left marked incomplete "
            "(`milotile info` shows it) and is redone by the next run once the cause is fixed")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``milotile`` console script."""
    from milotile.runtime import init_threads

    try:  # before any stage imports numpy or torch: their thread pools read the environment once
        init_threads()
    except InputError as exc:
        print(f"milotile: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        _check_cluster_args(args)
        if getattr(args, "needs_cluster", False):
            import milotile.iostats as iostats

            iostats.enable()
            _check_store_arg(args)
            with cluster_from_args(args) as client:
                t_ready = time.time()
                startup = t_ready - _process_start()
                iostats.reset()
                if client is not None:
                    client.run(iostats.reset)
                rc = int(args.handler(args) or 0)
                _report(args.command, t_ready, time.time(), client, startup)
                return rc
        return int(args.handler(args) or 0)
    except (InputError, StoreError) as exc:
        print(f"milotile {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("milotile: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk, a read-only folder, a quota: one sentence, not a traceback
        err = fs_error(exc)
        if err is None:
            raise
        log.debug("file-system error", exc_info=True)
        print(f"milotile {args.command}: error: {fs_error_message(err, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
