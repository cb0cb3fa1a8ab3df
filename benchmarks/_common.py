"""Shared helpers of the benchmark scripts: peak-RSS sampling of a process tree, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


class PeakRSS:
    """Sample the resident memory of a process and all its children (workers) every ``interval`` s."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.proc = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree_rss(self) -> int:
        total = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._tree_rss())


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd`` as a subprocess; return (wall seconds, peak tree RSS in bytes, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    with PeakRSS(proc.pid) as rss:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, rss.peak, out


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MILOTILE_TORCH_THREADS")


def threads() -> dict:
    """Thread settings of this process: torch intra/inter-op threads (if torch is imported) and the env vars."""
    out: dict = {k: os.environ.get(k) for k in _THREAD_VARS}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    try:
        out["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    out["nice"] = os.nice(0)
    return out


def machine() -> dict:
    """What the figures were measured on: CPU, memory, load average (1, 5, 15 min), threads, CPU peak."""
    from _peak import cpu_peak

    vm = psutil.virtual_memory()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(vm.total / 2**30, 1),
        "available_gib": round(vm.available / 2**30, 1),
        "load_avg_1m": os.getloadavg()[0],
        "load_avg": list(os.getloadavg()),
        "threads": threads(),
        "cpu_peak": cpu_peak(),
    }


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``timeout``, a time budget) into ``SystemExit`` so ``finally`` blocks remove temporary stores."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def result_path(name: str) -> Path:
    """``benchmarks/results/<name><suffix>.json``; the suffix comes from ``MILOTILE_BENCH_SUFFIX`` (e.g. ``_quiet``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}{os.environ.get('MILOTILE_BENCH_SUFFIX', '')}.json"


def write_results(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name><suffix>.json`` (see :func:`result_path`) and return its path."""
    path = result_path(name)
    payload = {"benchmark": name, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path
