"""Process-wide counters of Zarr store traffic: reads, writes, listings, bytes and time spent.

:func:`enable` wraps the methods of zarr's ``LocalStore`` and ``FsspecStore`` classes once per
process (workers included, see ``milotile.cluster.worker_setup``), so every array and group opened anywhere
in the process is counted without passing a special store around. Counters:

* ``meta_reads`` -- ``get`` of a metadata document (``zarr.json``, ``.zarray``, ``.zattrs``, ``.zgroup``)
* ``chunk_reads`` / ``bytes_read`` -- every other ``get`` / ``get_partial_values`` and its bytes
* ``writes`` / ``bytes_written`` -- ``set`` calls and their bytes
* ``exists`` / ``listings`` -- existence checks and directory listings
* ``io_seconds`` -- wall time inside those calls, summed over concurrent calls (an upper bound on
  the I/O share; divide by the number of concurrent workers for a wall-time estimate)

Parquet tables and run folders are read with pandas/fsspec directly and are not counted.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from typing import Any

__all__ = ["enable", "reset", "snapshot", "merge", "COUNTERS"]

COUNTERS = ("meta_reads", "chunk_reads", "bytes_read", "writes", "bytes_written", "exists", "listings",
            "io_seconds")
_META = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
_LOCK = threading.Lock()
_STATS: dict[str, float] = dict.fromkeys(COUNTERS, 0)
_ENABLED = {"done": False}


def _add(**kw: float) -> None:
    with _LOCK:
        for k, v in kw.items():
            _STATS[k] += v


def _nbytes(buf: Any) -> int:
    if buf is None:
        return 0
    try:
        return len(buf)
    except TypeError:
        return 0


def _wrap_get(fn: Any) -> Any:
    @functools.wraps(fn)
    async def get(self: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = await fn(self, key, *args, **kwargs)
        dt = time.perf_counter() - t0
        if key.endswith(_META):
            _add(meta_reads=1, io_seconds=dt)
        else:
            _add(chunk_reads=1, bytes_read=_nbytes(out), io_seconds=dt)
        return out

    return get


def _wrap_partial(fn: Any) -> Any:
    @functools.wraps(fn)
    async def get_partial_values(self: Any, prototype: Any, key_ranges: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = await fn(self, prototype, key_ranges, *args, **kw)
        _add(chunk_reads=len(out), bytes_read=sum(_nbytes(o) for o in out), io_seconds=time.perf_counter() - t0)
        return out

    return get_partial_values


def _wrap_set(fn: Any) -> Any:
    @functools.wraps(fn)
    async def set_(self: Any, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = await fn(self, key, value, *args, **kwargs)
        _add(writes=1, bytes_written=_nbytes(value), io_seconds=time.perf_counter() - t0)
        return out

    return set_


def _wrap_count(fn: Any, counter: str) -> Any:
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def agen(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            async for item in fn(*args, **kwargs):
                yield item
            _add(**{counter: 1, "io_seconds": time.perf_counter() - t0})

        return agen

    @functools.wraps(fn)
    async def coro(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = await fn(*args, **kwargs)
        _add(**{counter: 1, "io_seconds": time.perf_counter() - t0})
        return out

    return coro


def enable() -> None:
    """Start counting in this process (idempotent; cheap: a lock and a clock read per call)."""
    with _LOCK:
        if _ENABLED["done"]:
            return
        _ENABLED["done"] = True
    from zarr.storage import FsspecStore, LocalStore

    for cls in (LocalStore, FsspecStore):
        d = cls.__dict__
        if "get" in d:
            cls.get = _wrap_get(d["get"])
        if "get_partial_values" in d:
            cls.get_partial_values = _wrap_partial(d["get_partial_values"])
        if "set" in d:
            cls.set = _wrap_set(d["set"])
        if "exists" in d:
            cls.exists = _wrap_count(d["exists"], "exists")
        for name in ("list", "list_dir", "list_prefix"):
            if name in d:
                setattr(cls, name, _wrap_count(d[name], "listings"))


def reset() -> None:
    """Set every counter of this process to zero."""
    with _LOCK:
        for k in COUNTERS:
            _STATS[k] = 0


def snapshot() -> dict[str, float]:
    """The counters of this process (a copy)."""
    with _LOCK:
        return dict(_STATS)


def merge(parts: list[dict[str, float]]) -> dict[str, float]:
    """Sum counter dictionaries (this process and each worker)."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for p in parts:
        for k in COUNTERS:
            out[k] += float(p.get(k, 0))
    return out
