"""What running work needs from Dask, without setting a cluster up: the active client, the GPU
probe and progress bars. Layer 0: imported by the store, the stages and the models alike."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import dask

log = logging.getLogger(__name__)

__all__ = ["active_client", "compute_with_progress", "gpu_resources"]


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


def compute_with_progress(collections: Sequence[Any], *, desc: str = "compute") -> list:
    """Compute dask collections, showing a progress bar (tqdm on distributed, dask's locally).

    Returns the computed results in order.
    """
    client = active_client()
    if client is None:
        from dask.diagnostics import ProgressBar

        if log.isEnabledFor(logging.INFO) and os.environ.get("MILOTILE_PROGRESS", "1") != "0":
            with ProgressBar(minimum=2.0):
                return list(dask.compute(*collections))
        return list(dask.compute(*collections))
    from distributed import as_completed
    from tqdm.auto import tqdm

    futures = client.compute(list(collections))
    disable = os.environ.get("MILOTILE_PROGRESS", "1") == "0"
    with tqdm(total=len(futures), desc=desc, disable=disable, leave=False) as bar:
        for _ in as_completed(futures):
            bar.update(1)
    return client.gather(futures)
