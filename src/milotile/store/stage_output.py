"""The one stage-output helper: complete flag, parameters, source fingerprints, reuse, writer lock.

Every stage writes its result through :class:`StageOutput` (``col.stage_output(path, params,
sources)``)::

    out = col.stage_output("derived/preprocessed/tomo_000", params, {"tomograms/tomo_000": tok})
    if out.reusable:                      # complete, same parameters, same source fingerprints
        return out.meta
    with out:                             # takes the writer lock (issue 10 plugs it in below)
        group = out.begin()               # attrs: params, sources, complete=False
        ...                               # write arrays into group
        out.finish(stats=...)             # attrs: ..., token, complete=True

``sources`` maps the store path of everything the output depends on (the tomogram, its tilt series,
upstream stage outputs and tables, a checkpoint file) to that input's *token* (:func:`source_token`).
An output is reused only when its parameters **and** every source token are unchanged, so a
re-ingested tomogram or tilt series, or a recomputed upstream output with other parameters, makes
it stale (:func:`output_status`). An output's own token is a hash of its parameters and sources,
so what is downstream of it sees a change exactly when its inputs changed.

Tables (``tables/<name>``) are written atomically, so they carry no complete flag; their parameters,
sources and token live in the parquet metadata (:meth:`Collection.write_table`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import zarr

log = logging.getLogger(__name__)

__all__ = ["StageOutput", "canonical", "file_source", "file_token", "jsonable", "make_token", "output_status", "source_token", "writer_lock"]


def jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def canonical(value: Any) -> Any:
    """``value`` as it comes back from JSON attributes (tuples -> lists, numpy -> Python)."""
    return json.loads(json.dumps(value, default=jsonable, sort_keys=True))


def make_token(*parts: Any) -> str:
    """Short content token (SHA-1 of the canonical JSON of ``parts``)."""
    raw = json.dumps(canonical(list(parts)), sort_keys=True).encode()
    return hashlib.sha1(raw, usedforsecurity=False).hexdigest()[:20]


def file_token(path: str | os.PathLike | None) -> str | None:
    """Token of a plain file outside the store (a checkpoint): file name, size and modification time.

    The folder is left out so that moving the project (store and run folders together) keeps outputs
    up to date.
    """
    if path is None or not os.path.exists(path):
        return None
    st = os.stat(path)
    return make_token(os.path.basename(os.fspath(path)), st.st_size, st.st_mtime_ns)


def file_source(col: Any, path: str | os.PathLike) -> tuple[str, str | None]:
    """Source entry ``("file:<path relative to the store>", token)`` of a plain file (a checkpoint).

    Relative, so that no local absolute path is stored in attributes (resolved again with
    ``col.resolve_path`` when the status is checked).
    """
    rel = col.relative_path(path) if hasattr(col, "relative_path") else os.path.abspath(path)
    return f"file:{rel}", file_token(path)


def _file_path(col: Any, key: str) -> str:
    rel = key[len("file:"):]
    return col.resolve_path(rel) if hasattr(col, "resolve_path") else rel


@contextlib.contextmanager
def writer_lock(col: Any, path: str) -> Iterator[None]:
    """Hold the store-level writer lock of the output at ``path`` while it is written.

    The single call site of the lock: every :class:`StageOutput` takes it in :meth:`StageOutput.begin`
    and releases it when its ``with`` block ends. A second writer of the same output gets
    :class:`milotile.store.lock.StoreLockedError` (see :mod:`milotile.store.lock`).
    """
    from milotile.store import lock

    with lock.writer_lock(col, path):
        yield


def _attrs(node: Any) -> dict:
    return dict(node.attrs.get("milotile", {})) if node is not None else {}


def _node(col: Any, path: str) -> zarr.Group | zarr.Array | None:
    if hasattr(col, "node"):
        return col.node(path)
    try:
        return col.zarr_group[path]
    except KeyError:
        return None


def source_token(col: Any, path: str) -> str | None:
    """Current token of the store input at ``path`` (``None`` when missing or incomplete).

    Tomograms and tilt series carry the token ingest wrote from their content fingerprints;
    stage outputs the token of their parameters and sources; tables the token in their metadata.
    """
    if path.startswith("tables/"):
        name = path[len("tables/"):]
        return col.table_sources(name).get("token") if col.has_table(name) else None
    meta = _attrs(_node(col, path))
    if not meta.get("complete"):
        return None
    return meta.get("token") or meta.get("fingerprint")


def output_status(col: Any, path: str) -> str:
    """``"complete"``, ``"incomplete"`` (interrupted or being written) or ``"stale"`` (a source changed).

    An output written without source records (older stores) counts as complete when its flag says so.
    """
    if path.startswith("tables/"):
        info = col.table_sources(path[len("tables/"):])
    else:
        info = _attrs(_node(col, path))
        if not info.get("complete"):
            return "incomplete"
    for src, tok in (info.get("sources") or {}).items():
        if src.startswith("file:"):
            if file_token(_file_path(col, src)) != tok:
                return "stale"
        elif source_token(col, src) != tok:
            return "stale"
        elif not src.startswith(("tomograms/", "tilts/")) and output_status(col, src) != "complete":
            return "stale"  # an upstream output that is itself stale: transitively stale
    return "complete"


class StageOutput:
    """One output of a stage at ``path`` (a group, or an array the stage creates), see the module notes.

    Parameters
    ----------
    col : Collection
        The store.
    path : str
        Store path of the output (``derived/preprocessed/<name>``, ``patches/<key>``, ...).
    params : dict
        The stage parameters that make this output (JSON-able).
    sources : dict
        ``{store path or "file:<path>": token}`` of everything it depends on.
    """

    def __init__(self, col: Any, path: str, params: Mapping[str, Any], sources: Mapping[str, str | None]):
        self.col = col
        self.path = path.strip("/")
        self.params = canonical(dict(params))
        self.sources = canonical(dict(sources))
        self.token = make_token(self.params, self.sources)
        self.node: zarr.Group | zarr.Array | None = None
        self._lock: contextlib.ExitStack | None = None

    @property
    def meta(self) -> dict:
        """The output's current ``milotile`` attributes (empty when it does not exist)."""
        return _attrs(self.node if self.node is not None else _node(self.col, self.path))

    @property
    def reusable(self) -> bool:
        """Complete, written with the same parameters and from the same sources."""
        old = self.meta
        return bool(old.get("complete")) and old.get("params") == self.params and old.get("sources") == self.sources

    def __enter__(self) -> StageOutput:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def begin(self, node: zarr.Group | zarr.Array | None = None) -> Any:
        """Take the writer lock and mark the output incomplete; returns its group (or ``node``)."""
        if self._lock is None:
            self._lock = contextlib.ExitStack()
            self._lock.enter_context(writer_lock(self.col, self.path))
        self.node = node if node is not None else self.col.group(self.path, create=True)
        if hasattr(self.col, "note_written"):  # for consolidate(written_only=True) at the stage end
            self.col.note_written(self.path)
        self.node.attrs["milotile"] = {"params": self.params, "sources": self.sources, "complete": False}
        return self.node

    def finish(self, **meta: Any) -> dict:
        """Record ``meta`` (statistics, grid, ...) and flip the output to complete."""
        if self.node is None:
            raise RuntimeError(f"StageOutput {self.path}: finish() before begin()")
        attrs = canonical({**meta, "params": self.params, "sources": self.sources, "token": self.token})
        attrs["complete"] = True
        self.node.attrs["milotile"] = attrs
        if hasattr(self.col, "note_written"):  # its attributes changed: consolidate them again
            self.col.note_written(self.path)
        return attrs
