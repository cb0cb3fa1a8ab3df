"""Dask cluster set-up: a LocalCluster sized to the machine, an existing scheduler, or dask-jobqueue.

Usage::

    with milotile.cluster() as client:            # LocalCluster
        ...
    with milotile.cluster(scheduler="tcp://head:8786"):
        ...
    with milotile.cluster(config="config/cluster.yaml"):   # SLURM / PBS via dask-jobqueue
        ...

Workers on machines with a CUDA device advertise ``resources={"GPU": 1}``; model tasks ask for it
(:func:`gpu_resources`). The dashboard link is logged when a cluster starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from milotile.errors import InputError
from milotile.runtime import active_client, compute_with_progress, gpu_resources  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def _cuda_devices() -> int:
    """Number of CUDA devices, without importing torch when it is not loaded yet (it costs ~300 MB)."""
    import shutil
    import subprocess
    import sys

    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def _load_config(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise InputError(f"cluster config {p} does not exist")
    cfg = yaml.safe_load(p.read_text()) or {}
    if not isinstance(cfg, dict) or "cluster" not in cfg:
        raise InputError(f"cluster config {p} must have a top-level 'cluster' mapping")
    return cfg["cluster"]


def _jobqueue_cluster(cfg: dict) -> Any:
    kind = str(cfg.get("kind", "")).lower()
    try:
        import dask_jobqueue
    except ImportError:
        raise InputError(
            f"cluster kind {kind!r} needs dask-jobqueue; install it with `pip install milotile[cluster]`"
        ) from None
    classes = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
    if kind not in classes:
        raise InputError(f"unknown cluster kind {kind!r}; choose local, {', '.join(classes)}")
    opts = dict(cfg.get("options", {}))
    if cfg.get("gpu"):
        opts.setdefault("worker_extra_args", []).extend(["--resources", "GPU=1"])
    cluster = getattr(dask_jobqueue, classes[kind])(**opts)
    n = int(cfg.get("jobs", 1))
    if cfg.get("adapt"):
        cluster.adapt(minimum_jobs=int(cfg.get("minimum_jobs", 0)), maximum_jobs=n)
    else:
        cluster.scale(jobs=n)
    return cluster


@contextlib.contextmanager
def cluster(
    scheduler: str | None = None,
    *,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    config: str | os.PathLike | None = None,
    memory_limit: str | None = "auto",
    dashboard_address: str | None = ":8787",
    processes: bool = True,
) -> Iterator[Any]:
    """Start (or connect to) a Dask cluster and make its client the default scheduler.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``); no cluster is started.
    workers : int, optional
        Number of local workers (default: number of cores, at most 8; one per GPU when CUDA is present).
    threads_per_worker : int, optional
        Threads per local worker (default 1: scipy filters hold the GIL).
    config : path, optional
        YAML file with a ``cluster`` mapping (``kind: slurm|pbs|...``, ``options``, ``jobs``, ``gpu``),
        see ``config/cluster.yaml``; ``kind: local`` uses its ``workers``/``threads_per_worker``.
    memory_limit : str, optional
        Per-worker memory limit for local clusters.
    dashboard_address : str, optional
        Dashboard address for local clusters (a free port is chosen if taken).
    processes : bool
        Local workers as processes (True) or threads.

    Yields
    ------
    distributed.Client
    """
    from distributed import Client, LocalCluster

    owned = None
    if config is not None and scheduler is None:
        cfg = _load_config(config)
        if str(cfg.get("kind", "local")).lower() != "local":
            owned = _jobqueue_cluster(cfg)
        else:
            workers = workers or cfg.get("workers")
            threads_per_worker = threads_per_worker or cfg.get("threads_per_worker")
    if scheduler is not None:
        client = Client(scheduler)
    else:
        if owned is None:
            n_gpu = _cuda_devices()
            ncores = os.cpu_count() or 1
            n = workers or (n_gpu if n_gpu else min(ncores, 8))
            if n < 1:
                raise InputError(f"--workers must be at least 1, got {n}")
            tpw = threads_per_worker or max(1, ncores // n if n_gpu else 1)
            kwargs: dict[str, Any] = dict(
                n_workers=n, threads_per_worker=tpw, processes=processes,
                dashboard_address=dashboard_address, memory_limit=memory_limit,
            )
            if n_gpu:
                kwargs["resources"] = {"GPU": 1}
            owned = LocalCluster(**kwargs)
        client = Client(owned)
    quiet_dask_logs()
    link = getattr(client, "dashboard_link", None)
    nworkers = len(client.scheduler_info().get("workers", {}))
    log.info("Dask cluster ready: %d workers; dashboard at %s", nworkers, link)
    try:
        yield client
    finally:
        client.close()
        if owned is not None:
            owned.close()


def quiet_dask_logs(level: int | None = None) -> None:
    """Keep distributed's own INFO chatter out of milotile's log (it resets levels on import)."""
    root = logging.getLogger("milotile").getEffectiveLevel()
    level = level if level is not None else (logging.INFO if root <= logging.DEBUG else logging.WARNING)
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(level)
