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
from milotile.runtime import (  # noqa: F401  (re-exported)
    active_client,
    compute_with_progress,
    gpu_resources,
    init_threads,
    set_threads,
    threads_per_task,
)

log = logging.getLogger(__name__)


#: GPUs ``nvidia-smi -L`` listed (one call per process: a command asks twice, for the scheduler and the cluster)
_SMI_GPUS: list[int] = []


def cuda_devices() -> int:
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
    if not _SMI_GPUS:
        if shutil.which("nvidia-smi") is None:
            return 0
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return 0
        _SMI_GPUS.append(sum(1 for line in out.splitlines() if line.startswith("GPU ")))
    n = _SMI_GPUS[0]
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
    with _quiet_port_warnings():
        cluster = getattr(dask_jobqueue, classes[kind])(**opts)
    n = int(cfg.get("jobs", 1))
    if cfg.get("adapt"):
        cluster.adapt(minimum_jobs=int(cfg.get("minimum_jobs", 0)), maximum_jobs=n)
    else:
        cluster.scale(jobs=n)
    log.info("%s: submitted %d batch job(s) for Dask workers", classes[kind], n)
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
        Number of local workers (default: the CPU budget of :func:`milotile.runtime.cpu_budget`, at
        most 8; one per GPU when CUDA is present).
    threads_per_worker : int, optional
        Threads per local worker (default 1: scipy filters hold the GIL). Torch in a worker uses the
        worker's share of the budget divided by its threads.
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
    import dask
    from distributed import Client, LocalCluster

    quiet_dask_logs()  # before the cluster starts: distributed resets its levels on import
    _check_count("--workers", workers)
    _check_count("--threads-per-worker", threads_per_worker)
    owned = None
    wait_s = None
    if config is not None and scheduler is None:
        cfg = _load_config(config)
        if str(cfg.get("kind", "local")).lower() != "local":
            owned = _jobqueue_cluster(cfg)
            wait_s = float(cfg.get("wait_for_workers_s", 600))
        else:
            workers = workers if workers is not None else cfg.get("workers")
            threads_per_worker = threads_per_worker if threads_per_worker is not None else cfg.get("threads_per_worker")
            _check_count(f"workers in {config}", workers)
            _check_count(f"threads_per_worker in {config}", threads_per_worker)
    if scheduler is not None:
        client = connect(scheduler)
    else:
        if owned is None:
            n_gpu = cuda_devices()
            ncores = init_threads()
            n = int(workers) if workers is not None else (n_gpu if n_gpu else min(ncores, 8))
            tpw = int(threads_per_worker) if threads_per_worker is not None else max(1, ncores // n if n_gpu else 1)
            kwargs: dict[str, Any] = dict(
                n_workers=n, threads_per_worker=tpw, processes=processes,
                dashboard_address=_free_dashboard(dashboard_address), memory_limit=memory_limit,
            )
            if n_gpu:
                kwargs["resources"] = {"GPU": 1}
            with _quiet_port_warnings(), dask.config.set(_worker_log_config()):
                owned = LocalCluster(**kwargs)
        client = Client(owned)
    quiet_dask_logs()
    link = getattr(client, "dashboard_link", None)
    if wait_s:
        log.info("waiting for the first worker (batch job) to start; dashboard at %s", link)
        client.wait_for_workers(1, timeout=wait_s)
    info = client.scheduler_info()
    nworkers = len(info.get("workers", {}))
    local_cores = None
    if owned is not None and scheduler is None and isinstance(owned, LocalCluster):
        local_cores = threads_per_task(nworkers)
    client.register_plugin(worker_setup(local_cores), name="milotile-worker-setup")
    log.info("Dask cluster ready: %d workers; dashboard at %s", nworkers, link)
    try:
        yield client
    finally:
        _shutdown(client, owned)


def _free_dashboard(address: str | None) -> str | None:
    """``address``, or ``"127.0.0.1:0"`` (a free local port) when its port is taken, instead of distributed's warning."""
    import socket

    if not address or not address.startswith(":"):
        return address
    with socket.socket() as s:
        try:
            s.bind(("", int(address[1:])))
        except (OSError, ValueError):
            return "127.0.0.1:0"
    return address


def _check_count(what: str, value: Any) -> None:
    """Refuse a worker/thread count below 1 instead of silently using the default."""
    if value is None:
        return
    try:
        ok = int(value) == value and int(value) >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{what} must be a whole number of at least 1, got {value!r}")


def connect(address: str, timeout: float | None = None) -> Any:
    """A client of the running scheduler at ``address``; a bad or unreachable address is an InputError.

    ``timeout`` (seconds; default ``MILOTILE_SCHEDULER_TIMEOUT`` or 10) bounds the wait for the
    scheduler, so a wrong port fails fast instead of after distributed's 30 s default.
    """
    from distributed import Client
    from distributed.comm.addressing import parse_address, parse_host_port

    timeout = float(timeout if timeout is not None else os.environ.get("MILOTILE_SCHEDULER_TIMEOUT", 10))
    try:
        proto, loc = parse_address(address)
        if proto in ("tcp", "tls", "ws", "wss", "ucx"):
            parse_host_port(loc)  # "notanaddress" has no port
    except (ValueError, TypeError):
        raise InputError(f"--scheduler {address!r} is not a Dask scheduler address (expected tcp://HOST:PORT)") from None
    try:
        return Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(
            f"no Dask scheduler answered at {address} within {timeout:g} s ({type(exc).__name__}); "
            "start one with `dask scheduler` or drop --scheduler"
        ) from None


def _shutdown(client: Any, owned: Any) -> None:
    """Close the client, then the cluster it owns, without shutdown chatter.

    Workers of a closing local cluster may log a failed heartbeat with a traceback when the
    scheduler goes first; the work is done by then, so distributed's loggers are silenced (here and
    in the worker processes) for the shutdown only.
    """
    quiet = logging.CRITICAL + 1
    if owned is not None:
        with contextlib.suppress(Exception):
            client.run(_silence_distributed, quiet)
    old = {n: logging.getLogger(n).level for n in ("distributed", "tornado", "asyncio")}
    for name in old:
        logging.getLogger(name).setLevel(quiet)
    try:
        client.close()
        if owned is not None:
            owned.close()
    finally:
        for name, level in old.items():
            logging.getLogger(name).setLevel(level)


def _silence_distributed(level: int) -> None:
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(level)


#: below this many bytes of input the CLI runs a stage on the threaded scheduler in-process
#: instead of starting a LocalCluster (its start-up costs ~4 s on 2 cores; see benchmarks/collection.py)
SMALL_JOB_BYTES = int(float(os.environ.get("MILOTILE_SMALL_JOB_MB", "96")) * 2**20)


def _verbose() -> bool:
    return logging.getLogger("milotile").getEffectiveLevel() <= logging.DEBUG or bool(
        os.environ.get("MILOTILE_DASK_VERBOSE")
    )


@contextlib.contextmanager
def _quiet_port_warnings() -> Iterator[None]:
    """Hide distributed's "Port 8787 is already in use" warning unless verbose (a free port is used)."""
    import warnings

    with warnings.catch_warnings():
        if not _verbose():
            warnings.filterwarnings("ignore", message=".*already in use.*")
        yield


def _worker_log_config() -> dict:
    """dask config that keeps worker processes' distributed INFO lines off stderr unless verbose."""
    if _verbose():
        return {}
    return {"logging": {"distributed": "warning", "distributed.worker": "warning",
                        "distributed.nanny": "warning", "distributed.scheduler": "warning"}}


def worker_setup(cores: int | None = None) -> Any:
    """A worker plugin: count store I/O (:mod:`milotile.iostats`) and size torch's thread pool.

    Each worker's torch uses ``cores // nthreads`` intra-op threads (at least 1), where ``cores`` is
    the worker's share of the machine (local clusters) or, when unknown, its thread count (a remote
    worker started with ``--nthreads N`` on N cores), so concurrent tasks never oversubscribe.
    """
    from distributed.diagnostics.plugin import WorkerPlugin

    class _Setup(WorkerPlugin):
        def __init__(self, cores: int | None):
            self.cores = cores

        def setup(self, worker: Any) -> None:
            import milotile.iostats as iostats

            iostats.enable()
            nthreads = int(getattr(worker.state, "nthreads", 1) or 1)
            set_threads(threads_per_task(nthreads, self.cores or nthreads))

    return _Setup(cores)


@contextlib.contextmanager
def local_scheduler(kind: str = "threads", threads: int | None = None) -> Iterator[None]:
    """Run dask in this process without a cluster: ``threads`` (a thread pool) or ``sync``.

    For small jobs, where a process cluster's start-up costs more than it saves. Torch gets
    ``cores // threads`` intra-op threads.
    """
    if kind not in ("threads", "sync"):
        raise InputError(f"unknown local scheduler {kind!r}; use threads or sync")
    import milotile.iostats as iostats

    iostats.enable()
    import dask

    ncores = init_threads()
    nthreads = 1 if kind == "sync" else int(threads or ncores)
    set_threads(threads_per_task(nthreads, ncores))
    cfg: dict[str, Any] = {"scheduler": "synchronous" if kind == "sync" else "threads"}
    if kind == "threads":
        cfg["num_workers"] = nthreads
    log.info("running in-process on dask's %s scheduler (%d thread%s); no cluster started",
             kind, nthreads, "" if nthreads == 1 else "s")
    with dask.config.set(cfg):
        yield


def quiet_dask_logs(level: int | None = None) -> None:
    """Keep distributed's own INFO chatter out of milotile's log (it resets levels on import)."""
    level = level if level is not None else (logging.INFO if _verbose() else logging.WARNING)
    logging.getLogger("distributed").setLevel(level)
    for name, floor in (("bokeh", logging.ERROR), ("tornado", logging.CRITICAL)):  # distributed's own defaults
        logging.getLogger(name).setLevel(max(level, floor) if level > logging.DEBUG else level)
