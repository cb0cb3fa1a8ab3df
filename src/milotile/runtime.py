"""What running work needs from Dask, without setting a cluster up: the active client, the GPU
probe and progress bars. Layer 0: imported by the store, the stages and the models alike."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import dask

log = logging.getLogger(__name__)

__all__ = ["LogProgress", "active_client", "compute_with_progress", "gpu_resources"]


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
        import time

        self.total, self.desc, self.done = int(total), desc, 0
        self.interval = float(os.environ.get("MILOTILE_PROGRESS_INTERVAL", 30) if interval is None else interval)
        self._t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` finished tasks; log when ``interval`` seconds passed since the last line."""
        import time

        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._log(now)

    def close(self) -> None:
        """Log the final count (only when the work took longer than one interval)."""
        import time

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
