"""The one worker-side model cache: a model is loaded once per worker process, not once per task.

Tasks carry a checkpoint path (cheap to send) and call :func:`cached`; the first task on a worker
loads the model, later ones reuse it. Keys are the loader, the checkpoint's absolute path, its
modification time (a rewritten checkpoint is reloaded) and any extra arguments (the device). Used by
tiled prediction (pickers) and by embedding (encoders) alike; at most :data:`MAX_MODELS` stay
resident per process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MAX_MODELS", "cache_info", "cached", "clear", "seed"]

#: models kept per process (least recently used ones are dropped)
MAX_MODELS = 2

_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_LOCK = threading.Lock()
_LOADS = {"n": 0}


def _key(loader: Callable[..., Any], path: str | os.PathLike, extra: tuple) -> tuple:
    p = os.path.abspath(os.fspath(path))
    mtime = os.stat(p).st_mtime_ns if os.path.exists(p) else None
    return (f"{getattr(loader, '__module__', '')}.{getattr(loader, '__qualname__', repr(loader))}", p, mtime, extra)


def _put(key: tuple, obj: Any) -> None:
    _CACHE[key] = obj
    _CACHE.move_to_end(key)
    while len(_CACHE) > MAX_MODELS:
        _CACHE.popitem(last=False)


def cached(loader: Callable[..., Any], path: str | os.PathLike, *extra: Any) -> Any:
    """``loader(path, *extra)``, loaded once per process and then reused."""
    key = _key(loader, path, extra)
    with _LOCK:
        obj = _CACHE.get(key)
        if obj is None:
            t0 = time.perf_counter()
            obj = loader(os.fspath(path), *extra)
            _LOADS["n"] += 1
            log.info("loaded model %s in %.2f s (pid %d)", path, time.perf_counter() - t0, os.getpid())
        _put(key, obj)
    return obj


def seed(obj: Any, loader: Callable[..., Any], path: str | os.PathLike, *extra: Any) -> None:
    """Put an already loaded model into this process's cache (the driver holds it anyway)."""
    with _LOCK:
        _put(_key(loader, path, extra), obj)


def clear() -> None:
    """Forget every cached model and reset the load counter."""
    with _LOCK:
        _CACHE.clear()
        _LOADS["n"] = 0


def cache_info() -> dict[str, int]:
    """``{"cached": ..., "loads": ...}`` for this process (loads since the last :func:`clear`)."""
    with _LOCK:
        return {"cached": len(_CACHE), "loads": _LOADS["n"]}
