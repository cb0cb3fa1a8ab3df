"""Store-level writer locks: one writer per stage output, the second one refused with a clear message.

Two commands writing the same output (two ``preprocess`` runs with different ``--gauss``) would
otherwise interleave their chunks into one array and the last one to finish would mark it
complete with voxels from both. :func:`writer_lock` prevents that: before a stage writes
``<relpath>`` (``derived/preprocessed/tomo_001``, ``tables/candidates``, ...) it creates the lock file
``<store>/.locks/<relpath with / as ~>.lock`` exclusively. The file is JSON naming the owner (user),
host, pid, the process start time, the time the lock was taken, the command line and a run id.

A lock that exists already is read:

* if it belongs to a process on **this host that no longer runs** (its pid is gone, or the pid now
  belongs to a process started at another time) the lock is stale: it is removed with a warning
  and taken (``kill -9`` of a previous run therefore needs no manual step);
* otherwise the new writer is refused with :class:`StoreLockedError` (a
  :class:`~milotile.errors.StoreError`; the CLI prints it and exits 2), naming who holds it and how
  to clear it if that process is gone on another host: ``milotile unlock STORE PATH``.

Local stores use ``O_CREAT | O_EXCL``; object stores use fsspec's exclusive-create mode where the
filesystem supports it (else an exists-then-write check, which narrows but cannot close the race).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from milotile.errors import InputError, StoreError

__all__ = ["LOCKS", "StoreLockedError", "list_locks", "lock_is_stale", "read_lock", "unlock", "writer_lock"]

log = logging.getLogger(__name__)

LOCKS = ".locks"


class StoreLockedError(StoreError):
    """Another process holds the writer lock of a stage output."""


def _fs_root(root: Any) -> tuple[Any, str, str]:
    """``(fs, root_path, url)`` of a Collection or a store path/URL."""
    if hasattr(root, "fs") and hasattr(root, "url"):
        return root.fs, root.path.rstrip("/"), root.url
    from milotile.store.identity import absolute_url

    url = absolute_url(root)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/"), url


def _lock_path(root_path: str, relpath: str) -> str:
    rel = relpath.strip("/")
    if not rel or ".." in rel.split("/"):
        raise InputError(f"invalid store path {relpath!r} for a lock")
    return f"{root_path}/{LOCKS}/{rel.replace('/', '~')}.lock"


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - no psutil, no such process, no permission: unknown
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(info: dict) -> bool:
    """True when ``info`` names a process on this host that no longer runs (or a reused pid)."""
    if info.get("host") != socket.gethostname():
        return False
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if not _pid_alive(pid):
        return True
    started, now_started = info.get("started"), _process_start(pid)
    return started is not None and now_started is not None and abs(float(started) - now_started) > 1.0


def read_lock(fs: Any, path: str) -> dict | None:
    """The JSON content of a lock file, ``None`` when it is gone; ``{}`` when unreadable."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _create_exclusive(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; True when this call created it."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True
    try:
        with fs.open(path, "xb") as fh:
            fh.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError):  # no exclusive mode on this filesystem
        if fs.exists(path):
            return False
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return True


def _describe(info: dict) -> str:
    if not info:
        return "an unreadable lock file"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("time", 0))))
    return (f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
            f"user {info.get('owner', '?')}, since {when})")


def _remove_stale(fs: Any, path: str, seen: dict) -> None:
    """Remove the stale lock ``seen`` unless someone replaced it meanwhile."""
    aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        fs.mv(path, aside)
    except FileNotFoundError:
        return  # another process cleared it first
    moved = read_lock(fs, aside)
    if moved is not None and moved.get("run_id") != seen.get("run_id"):
        with contextlib.suppress(Exception):  # a fresh lock was taken in between: put it back
            fs.mv(aside, path)
        return
    with contextlib.suppress(FileNotFoundError):
        fs.rm(aside)


@contextlib.contextmanager
def writer_lock(root: Any, relpath: str, *, command: str | None = None) -> Iterator[dict]:
    """Hold the writer lock of ``relpath`` in the store ``root`` for the duration of the block.

    Parameters
    ----------
    root : Collection, str or path
        The store (a :class:`~milotile.store.Collection` or its path/URL).
    relpath : str
        The output inside the store, e.g. ``"derived/preprocessed/tomo_001"``.
    command : str, optional
        What is writing (default: this process's command line), shown to a refused writer.

    Yields
    ------
    dict
        The lock record (owner, host, pid, started, time, command, run_id, path).

    Raises
    ------
    StoreLockedError
        When a live process (or one on another host) holds the lock.
    """
    fs, root_path, url = _fs_root(root)
    path = _lock_path(root_path, relpath)
    info = {
        "owner": _user(), "host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
        "time": time.time(), "command": command or " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]]),
        "run_id": uuid.uuid4().hex, "path": relpath.strip("/"),
    }
    data = json.dumps(info).encode()
    for _attempt in range(5):
        if _create_exclusive(fs, path, data):
            break
        other = read_lock(fs, path)
        if other is None:
            continue  # released between our create and read: try again
        if lock_is_stale(other):
            log.warning("removing the stale lock of %s left by %s", relpath, _describe(other))
            _remove_stale(fs, path, other)
            continue
        raise StoreLockedError(
            f"{relpath} in {url} is being written by {_describe(other)}; wait for it to finish, or if that "
            f"process is gone run `milotile unlock {url} {relpath}`"
        )
    else:
        raise StoreLockedError(f"could not take the writer lock of {relpath} in {url} (it keeps changing)")
    try:
        yield info
    finally:
        mine = read_lock(fs, path)
        if mine is not None and mine.get("run_id") == info["run_id"]:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid()) if hasattr(os, "getuid") else "?"


def list_locks(root: Any) -> list[dict]:
    """Every lock in the store: its record plus ``stale`` (True/False) and ``lock_file``."""
    fs, root_path, _ = _fs_root(root)
    d = f"{root_path}/{LOCKS}"
    if not fs.exists(d):
        return []
    out = []
    for p in sorted(fs.ls(d, detail=False)):
        if not p.endswith(".lock"):
            continue
        info = read_lock(fs, p)
        if info is None:
            continue
        rec = dict(info)
        rec.setdefault("path", os.path.basename(p)[: -len(".lock")].replace("~", "/"))
        rec["stale"] = lock_is_stale(info) if info else True
        rec["lock_file"] = p
        out.append(rec)
    return out


def unlock(root: Any, relpath: str) -> dict:
    """Remove the lock of ``relpath`` (for a writer that died on another host); returns its record.

    Raises
    ------
    InputError
        When there is no such lock, or it belongs to a process still running on this host.
    """
    fs, root_path, url = _fs_root(root)
    path = _lock_path(root_path, relpath)
    info = read_lock(fs, path)
    if info is None:
        raise InputError(f"{url} has no writer lock on {relpath}")
    if info and info.get("host") == socket.gethostname() and not lock_is_stale(info):
        raise InputError(f"{relpath} is locked by {_describe(info)}, which is still running; stop it first")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)
    return info
