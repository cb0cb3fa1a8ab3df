"""What running work needs, without setting a cluster up: the process's CPU thread budget, the
active Dask client, the GPU probe and progress bars. Layer 0: imported by the store, the stages and
the models alike; it imports neither dask nor torch at module level (the CLI imports it first).

The thread budget
-----------------
One owner decides how many threads this process computes with: :func:`cpu_budget` counts the CPUs
the process may actually use (its affinity mask, the cgroup's CPU quota, SLURM's allocation, or
``MILOTILE_THREADS``), :func:`init_threads` applies it once, as early as possible (the OpenMP / MKL /
OpenBLAS environment before torch or numpy load their runtimes, torch's intra- and inter-op pools
after), and :func:`threads_per_task` divides it among concurrent Dask tasks, so Dask threads ×
torch threads never exceed the budget. ``MILOTILE_THREAD_BUDGET=off`` restores the library
defaults (every core, spinning OpenMP waits): the "before" of ``benchmarks/contention.py``.

While a model trains or predicts, :func:`adapt_threads` (called by the training and prediction loops,
at most every :data:`ADAPT_INTERVAL_S`) shrinks torch's intra-op pool to the CPUs other processes leave
free and grows it back when they go. Two OpenMP processes whose threads outnumber the cores stall at
every barrier: two pickers training side by side, 2 threads each on 2 cores, took 12x their time alone
(6x their fair share; 3.8x with the governor, 1.8x with one thread each: ``benchmarks/contention_steps.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "CpuBudget",
    "LogProgress",
    "active_client",
    "adapt_threads",
    "budget_enabled",
    "compute_with_progress",
    "cpu_budget",
    "gpu_resources",
    "init_threads",
    "others_cpu_use",
    "set_threads",
    "threads_per_task",
    "wait_policy",
]

#: environment variables read by the BLAS / OpenMP runtimes when they load (numpy, scipy, torch)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class CpuBudget:
    """CPUs this process may compute on, and where each limit came from.

    Attributes
    ----------
    count : int
        The budget: the smallest of ``limits`` (or the ``MILOTILE_THREADS`` override).
    limits : dict
        Every limit found, e.g. ``{"affinity": 2, "cgroup": 1, "slurm": 4}``.
    source : str
        The key of ``limits`` that decided ``count``.
    """

    count: int
    limits: dict[str, int]
    source: str


def budget_enabled() -> bool:
    """False when ``MILOTILE_THREAD_BUDGET=off``: threads are left at the libraries' defaults."""
    return os.environ.get("MILOTILE_THREAD_BUDGET", "on").strip().lower() not in ("off", "0", "no", "false")


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS / Windows
        return os.cpu_count() or 1


def _cgroup_cpus(root: str | os.PathLike = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) of this process, or None.

    The quota of the process's own cgroup and of each ancestor is read; the smallest wins, rounded up
    (a quota of 1.5 CPUs gives 2 threads: the last one is often idle on I/O).
    """
    root = Path(root)
    v2_path, v1_path = None, None
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if parts[0] == "0" and parts[1] == "":
                v2_path = parts[2]
            elif "cpu" in parts[1].split(","):
                v1_path = parts[2]
    except OSError:
        pass
    found: list[float] = []

    def chain(base: Path, rel: str | None) -> list[Path]:
        rel_parts = [p for p in (rel or "/").split("/") if p]
        dirs = [base.joinpath(*rel_parts[:i]) for i in range(len(rel_parts), -1, -1)]
        return [d for d in dirs if d.is_dir()]

    for d in chain(root, v2_path):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and float(period) > 0:
            found.append(float(quota) / float(period))
    for base in (root / "cpu", root / "cpu,cpuacct"):
        for d in chain(base, v1_path):
            try:
                quota = float((d / "cpu.cfs_quota_us").read_text())
                period = float((d / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                found.append(quota / period)
    return max(1, math.ceil(min(found) - 1e-6)) if found else None


def _slurm_cpus(env: dict[str, str] | os._Environ = os.environ) -> int | None:
    """CPUs SLURM gave this task: ``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE`` inside a job."""
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = env.get(var, "").strip()
        if var == "SLURM_CPUS_ON_NODE" and not env.get("SLURM_JOB_ID"):
            continue
        try:
            # SLURM_CPUS_ON_NODE may read "4(x2)"; the count before the bracket is this node's
            n = int(value.split("(")[0])
        except ValueError:
            continue
        if n >= 1:
            return n
    return None


def cpu_budget() -> CpuBudget:
    """The CPUs this process may compute on: its affinity mask, cgroup quota and SLURM allocation.

    ``MILOTILE_THREADS=N`` overrides the detection (a whole number of at least 1).

    Returns
    -------
    CpuBudget
        ``count`` is the smallest limit found; ``limits`` lists them all.
    """
    override = os.environ.get("MILOTILE_THREADS", "").strip()
    if override:
        try:
            n = int(override)
        except ValueError:
            n = 0
        if n < 1:
            from milotile.errors import InputError

            raise InputError(f"MILOTILE_THREADS must be a whole number of at least 1, got {override!r}")
        return CpuBudget(n, {"MILOTILE_THREADS": n}, "MILOTILE_THREADS")
    limits = {"affinity": _affinity_cpus()}
    cg = _cgroup_cpus()
    if cg is not None:
        limits["cgroup"] = cg
    slurm = _slurm_cpus()
    if slurm is not None:
        limits["slurm"] = slurm
    source = min(limits, key=lambda k: limits[k])
    return CpuBudget(int(limits[source]), limits, source)


_STATE: dict[str, Any] = {"budget": None, "interop": False, "torch": False, "target": None, "adapt": None}


def init_threads(budget: int | None = None) -> int:
    """Apply the thread budget to this process, once; call it before torch or numpy are imported.

    Sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` (unless the user set
    them), OpenMP's wait policy (:func:`wait_policy`) and, when torch is loaded, its intra-op pool
    to ``budget`` and its inter-op pool to 1. Later calls return the budget set first; to change the
    intra-op count for a part of the work use :func:`set_threads`.

    Parameters
    ----------
    budget : int, optional
        Threads to use (default :func:`cpu_budget`).

    Returns
    -------
    int
        The budget (``os.cpu_count()`` when ``MILOTILE_THREAD_BUDGET=off``).
    """
    if _STATE["budget"] is not None:
        if budget_enabled() and not _STATE["torch"]:
            _apply_torch(int(_STATE["budget"]))  # torch was imported after the first call
        return int(_STATE["budget"])
    if not budget_enabled():
        _STATE["budget"] = os.cpu_count() or 1
        return int(_STATE["budget"])
    info = cpu_budget()
    n = max(1, int(budget if budget is not None else info.count))
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(n))
    wait = {} if "torch" in sys.modules else wait_policy(n)  # read when OpenMP loads, with torch
    for var, value in wait.items():
        os.environ.setdefault(var, value)
    _STATE["budget"] = n
    log.debug("thread budget %d (%s; limits %s)%s", n, info.source, info.limits,
              "; busy machine: passive OpenMP waits" if wait else "")
    _apply_torch(n)
    return n


#: OpenMP's passive waiting (libgomp and Intel OpenMP): an idle thread sleeps at once instead of spinning.
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def wait_policy(budget: int, load: float | None = None, cpus: int | None = None) -> dict[str, str]:
    """OpenMP wait settings for a process that computes on ``budget`` threads.

    On a busy machine (the 1-minute load average above the CPUs left to other work, i.e.
    ``load > cpus - budget + 0.5``) idle OpenMP threads must sleep: spinning for libgomp's default
    300 000 iterations keeps the cores from the threads that hold the work (issue 26: 4.5x slower
    beside two busy processes on two cores, against 2x for the CPU share). On a quiet machine the
    default spin is kept: passive waiting cost 25 % there (``benchmarks/contention.py`` measures both).

    Returns
    -------
    dict
        :data:`PASSIVE_WAIT` when busy, else ``{}``.
    """
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return {}
    cpus = cpus if cpus is not None else (os.cpu_count() or budget)
    return dict(PASSIVE_WAIT) if load > cpus - budget + 0.5 else {}


def _apply_torch(n: int) -> None:
    _STATE["target"] = int(n)
    torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.set_num_threads(n)
    _STATE["torch"] = True
    if budget_enabled() and not _STATE["interop"]:
        try:  # allowed once, before any inter-op work; milotile runs no parallel inter-op graphs
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        _STATE["interop"] = True


#: Fewest seconds between two looks of :func:`adapt_threads` at the other processes' CPU use.
ADAPT_INTERVAL_S = 1.0


def _cpu_jiffies(cpus: set[int] | None) -> float | None:
    """Busy time (USER_HZ ticks) of ``cpus`` (all when None) since boot, from ``/proc/stat``."""
    try:
        with open("/proc/stat") as fh:
            lines = [ln.split() for ln in fh if ln.startswith("cpu")]
    except OSError:
        return None
    busy = 0.0
    for f in lines:
        name = f[0]
        if cpus is None:
            if name != "cpu":
                continue
        elif name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [float(x) for x in f[1:]]
        busy += sum(v[:8]) - v[3] - v[4]  # user nice system (idle iowait) irq softirq steal
    return busy


def _own_cpu_s() -> float:
    t = os.times()
    return float(t.user + t.system)


def others_cpu_use(state: dict[str, Any], now: float) -> float | None:
    """CPUs (of this process's affinity set) that other processes kept busy since the last call with ``state``.

    ``state["sample"]`` keeps the previous look (time, busy ticks of the CPUs, this process's CPU seconds); the
    first call only takes it and returns None.
    """
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    busy = _cpu_jiffies(cpus)
    if busy is None:
        return None
    own = _own_cpu_s()
    hz = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
    prev = state.get("sample")
    state["sample"] = (now, busy, own)
    if prev is None or now - prev[0] <= 0:
        return None
    dt = now - prev[0]
    return max(0.0, ((busy - prev[1]) / hz - (own - prev[2])) / dt)


def adapt_threads(now: float | None = None, *, others: float | None = None) -> int | None:
    """Fit torch's intra-op threads to the CPUs other processes leave free; call it often from a compute loop.

    At most every :data:`ADAPT_INTERVAL_S` seconds it measures how many CPUs of this process's affinity set
    other processes kept busy since the last look (``/proc/stat`` minus this process's own CPU time; its own
    child processes count as others) and sets torch's intra-op pool to ``floor(cpus - others + 0.75)``
    threads, at least 1 and at most the count the budget's owner chose (:func:`init_threads`,
    :func:`set_threads`). It shrinks the pool only when two looks in a row ask for it (a burst of other work
    shorter than that is cheaper to ride out) and grows it back at once. Off with
    ``MILOTILE_THREAD_BUDGET=off`` or ``MILOTILE_ADAPT_THREADS=0``.

    Parameters
    ----------
    now : float, optional
        ``time.monotonic()`` (tests pass their own clock).
    others : float, optional
        The other processes' CPU use to act on instead of measuring it (tests).

    Returns
    -------
    int or None
        The thread count set when it changed, else None.
    """
    if not budget_enabled() or os.environ.get("MILOTILE_ADAPT_THREADS", "1") == "0":
        return None
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    now = time.monotonic() if now is None else float(now)
    st = _STATE["adapt"]
    if st is None:
        st = _STATE["adapt"] = {"last": -math.inf}
    if others is None and now - st["last"] < ADAPT_INTERVAL_S:
        return None
    st["last"] = now
    if others is None:
        others = others_cpu_use(st, now)
        if others is None:
            return None
    ceiling = int(_STATE["target"] or init_threads())
    ncpu = _affinity_cpus()
    # a CPU counts as taken from 0.25 of it busy elsewhere (the background of a quiet machine stays below)
    want = max(1, min(ceiling, int(math.floor(ncpu - others + 0.75))))
    current = torch.get_num_threads()
    if want < current:  # shrink only when two looks in a row agree: a burst of 2 s costs less than a second
        st["low"] = st.get("low", 0) + 1
        if st["low"] < 2:
            return None
    st["low"] = 0
    if want == current:
        return None
    log.info("%.1f of %d CPUs busy with other work: computing on %d thread%s", others, ncpu, want,
             "" if want == 1 else "s")
    torch.set_num_threads(want)
    return want


def set_threads(n: int) -> int:
    """Use ``n`` intra-op threads in this process (torch, and the OpenMP / BLAS env for what loads later).

    With the budget on, ``n`` is capped at the budget. Returns the count applied.
    """
    n = max(1, int(n))
    if budget_enabled():
        n = min(n, init_threads())
    for var in THREAD_VARS:
        os.environ[var] = str(n)
    _apply_torch(n)
    return n


def threads_per_task(concurrent: int, budget: int | None = None) -> int:
    """Intra-op threads for each of ``concurrent`` tasks sharing ``budget`` CPUs (default: this process's).

    ``budget // concurrent``, at least 1: Dask worker threads × torch threads stay within the budget.
    """
    budget = budget if budget is not None else init_threads()
    return max(1, int(budget) // max(1, int(concurrent)))


def active_client() -> Any | None:
    """The current distributed client, or ``None`` when none is running."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def gpu_resources(client: Any | None = None) -> dict | None:
    """``{"GPU": 1}`` when the cluster (``client`` or the active one) has GPU workers, else ``None``.

    The one GPU probe: model tasks (prediction, embedding) ask for these resources.
    """
    client = client if client is not None else active_client()
    if client is None:
        return None
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # older distributed
        workers = client.scheduler_info().get("workers", {})
    if any((w.get("resources") or {}).get("GPU", 0) > 0 for w in workers.values()):
        return {"GPU": 1}
    return None


def _interactive() -> bool:
    """Whether progress may be drawn as a bar: stderr is a terminal (not a log file or a pipe)."""
    try:
        return os.isatty(2)
    except OSError:
        return False


class LogProgress:
    """Progress as periodic log lines (``ingest: 12/40 tasks (30 %), 14 s``), for logs that are not a terminal.

    A line at most every ``interval`` seconds (``MILOTILE_PROGRESS_INTERVAL``, default 30) and one at
    the end, so a log file gets no carriage-return runs.
    """

    def __init__(self, total: int, desc: str, interval: float | None = None) -> None:
        self.total, self.desc, self.done = int(total), desc, 0
        self.interval = float(os.environ.get("MILOTILE_PROGRESS_INTERVAL", 30) if interval is None else interval)
        self._t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` finished tasks; log when ``interval`` seconds passed since the last line."""
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._log(now)

    def close(self) -> None:
        """Log the final count (only when the work took longer than one interval)."""
        now = time.monotonic()
        if now - self._t0 >= self.interval:
            self._log(now)

    def _log(self, now: float) -> None:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        log.info("%s: %d/%d tasks (%.0f %%), %.0f s", self.desc, self.done, self.total, pct, now - self._t0)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _local_log_callback(desc: str) -> Any:
    """A dask callback for the local schedulers that feeds a :class:`LogProgress`."""
    from dask.callbacks import Callback

    class _Cb(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            self.bar = LogProgress(sum(len(state[k]) for k in ("ready", "waiting", "running")), desc)

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            self.bar.update(1)

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            if hasattr(self, "bar"):
                self.bar.close()

    return _Cb()


def compute_with_progress(collections: Sequence[Any], *, desc: str = "compute") -> list:
    """Compute dask collections, showing progress: a bar on a terminal (tqdm on distributed, dask's
    locally), periodic log lines (:class:`LogProgress`) when stderr is a log file or a pipe.

    ``MILOTILE_PROGRESS=0`` turns progress off. Returns the computed results in order.
    """
    enabled = os.environ.get("MILOTILE_PROGRESS", "1") != "0" and log.isEnabledFor(logging.INFO)
    tty = _interactive()
    import dask

    client = active_client()
    if client is None:
        if not enabled:
            return list(dask.compute(*collections))
        if tty:
            from dask.diagnostics import ProgressBar

            with ProgressBar(minimum=2.0):
                return list(dask.compute(*collections))
        with _local_log_callback(desc):
            return list(dask.compute(*collections))
    from distributed import as_completed

    futures = client.compute(list(collections))
    if enabled and tty:
        from tqdm.auto import tqdm

        bar: Any = tqdm(total=len(futures), desc=desc, leave=False)
    else:
        bar = LogProgress(len(futures), desc, interval=None if enabled else float("inf"))
    with bar:
        for _ in as_completed(futures):
            bar.update(1)
    return client.gather(futures)
