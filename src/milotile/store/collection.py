"""The collection store: one Zarr v3 group holding tomograms, tilt series, derived data and tables.

Layout (see ``docs/architecture.md``)::

    <store>/tomograms/<name>/{0,1,2}   OME-NGFF 0.5 multiscale, z,y,x in Å
    <store>/tilts/<name>/0              aligned tilt series (n, y, x) + angles
    <store>/derived/<stage>/<name>/     derived volumes with their parameters
    <store>/patches/<key>/data          patch banks
    <store>/tables/<table>.parquet      candidates, picks, embeddings index
    <store>/runs/<run_id>/              training runs

``tables`` and ``runs`` are *opaque* nodes: each holds a ``zarr.json`` of an empty array, so zarr
treats the folder as an array and never lists the plain files beside it (listing the store with
zarr-python raises no warnings). Stores made before this layout get the marker the first time they
are opened writable. :meth:`Collection.consolidate` writes consolidated metadata for remote readers
after each stage; milotile itself always lists the store directly (never the consolidated copy).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import fsspec
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from milotile.errors import InputError, StoreError
from milotile.store.identity import absolute_url, new_store_id, open_store
from milotile.store.lock import LOCKS, StoreLockedError, writer_lock
from milotile.store.producers import missing_input
from milotile.store.stage_output import (
    StageOutput,
    canonical,
    jsonable,
    make_token,
    output_status,
    source_token,
)

log = logging.getLogger(__name__)

STORE_VERSION = 1
TOMOGRAMS = "tomograms"
TILTS = "tilts"
DERIVED = "derived"
TABLES = "tables"
RUNS = "runs"
#: Folders of plain files inside the store, hidden from zarr behind an empty-array marker.
OPAQUE = (TABLES, RUNS, LOCKS)
#: Where ingest stages its writes (never part of the consolidated metadata).
STAGING = "staging"
LAYOUT_DOC = "docs/architecture.md#collection-store"


def _attrs(node: zarr.Group | zarr.Array) -> dict:
    return dict(node.attrs.get("milotile", {}))


@dataclass
class TiltSeries:
    """An aligned tilt series stored with its angles and tilt-axis metadata."""

    name: str
    group: zarr.Group
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False, compare=False)

    @property
    def array(self) -> zarr.Array:
        """The stored tilt images (opened once per object)."""
        if "0" not in self._arrays:
            self._arrays["0"] = self.group["0"]
        return self._arrays["0"]

    @property
    def meta(self) -> dict:
        """The ``milotile`` attributes (angles, tilt axis, pixel size, source...)."""
        return _attrs(self.group)

    @property
    def data(self) -> da.Array:
        """The tilt images as a dask array ``(n_tilts, y, x)`` float32."""
        return da.from_zarr(self.array)

    @property
    def angles(self) -> np.ndarray:
        """Tilt angles in degrees, one per image."""
        return np.asarray(self.meta["angles"], dtype=np.float64)

    @property
    def tilt_axis_angle(self) -> float:
        """Tilt-axis direction, degrees counter-clockwise from the image y axis (0 for IMOD)."""
        return float(self.meta.get("tilt_axis_angle", 0.0))

    @property
    def pixel_size(self) -> float:
        """Pixel size of the tilt images in Å."""
        return float(self.meta["pixel_size"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_tilts, y, x)``."""
        return tuple(self.array.shape)


@dataclass
class Tomogram:
    """One tomogram of a collection (an OME-Zarr multiscale image)."""

    name: str
    group: zarr.Group
    collection: Collection
    _arrays: dict[int, zarr.Array] = field(default_factory=dict, repr=False, compare=False)

    def _array(self, level: int) -> zarr.Array:
        """Pyramid array ``level``, opened once per Tomogram object (one metadata read)."""
        if level not in self._arrays:
            self._arrays[level] = self.group[str(level)]
        return self._arrays[level]

    @property
    def meta(self) -> dict:
        """The ``milotile`` attributes (source, fingerprint, voxel size, order...)."""
        return _attrs(self.group)

    @property
    def voxel_size(self) -> float:
        """Voxel size of level 0 in Å."""
        return float(self.meta["voxel_size"])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Level-0 shape ``(z, y, x)``."""
        return tuple(self._array(0).shape)

    @property
    def levels(self) -> list[int]:
        """Available pyramid levels (0 = full resolution)."""
        ds = self.group.attrs["ome"]["multiscales"][0]["datasets"]
        return [int(d["path"]) for d in ds]

    def data(self, level: int = 0) -> da.Array:
        """Lazy dask array ``(z, y, x)`` float32 of pyramid ``level``, chunked like the store."""
        if level not in self.levels:
            raise InputError(f"tomogram {self.name} has no level {level}; levels are {self.levels}")
        return da.from_zarr(self._array(level))

    def volume(self, level: int = 0) -> xr.DataArray:
        """Lazy ``xarray.DataArray`` of ``level`` with ``z, y, x`` coordinates in Å.

        Coordinates follow the OME scale/translation of the level, so every level overlays level 0.
        """
        arr = self.data(level)
        ds = self.group.attrs["ome"]["multiscales"][0]["datasets"][self.levels.index(level)]
        scale = [1.0, 1.0, 1.0]
        trans = [0.0, 0.0, 0.0]
        for t in ds["coordinateTransformations"]:
            if t["type"] == "scale":
                scale = t["scale"]
            elif t["type"] == "translation":
                trans = t["translation"]
        coords = {
            ax: np.arange(n) * scale[i] + trans[i] for i, (ax, n) in enumerate(zip("zyx", arr.shape, strict=True))
        }
        return xr.DataArray(
            arr,
            dims=("z", "y", "x"),
            coords=coords,
            name=self.name,
            attrs={"units": "angstrom", "voxel_size": scale[-1], "level": level},
        )

    @property
    def tilt_series(self) -> TiltSeries | None:
        """The aligned tilt series ingested with this tomogram, if any."""
        return self.collection.tilt_series(self.name)

    def __repr__(self) -> str:
        return f"Tomogram({self.name!r}, shape={self.shape}, voxel_size={self.voxel_size:g} Å)"


class Collection:
    """A collection store opened from a local path or an fsspec URL.

    Use :func:`milotile.open` to open one and :func:`milotile.ingest` to fill it.
    """

    def __init__(self, url: str | os.PathLike, *, mode: str = "a", storage_options: dict | None = None):
        self._members: dict[str, list[str]] = {}
        self._nodes: dict[str, dict[str, zarr.Group]] = {}
        self._tomos: dict[str, Tomogram] = {}
        self._tilts: dict[str, TiltSeries] = {}
        self._written: list[str] = []  # stage outputs begun since the last consolidation
        self.storage_options = storage_options or {}
        #: False for a read-only open (``mode="r"``): nothing is ever written through this object
        self.writable = mode != "r"
        # absolute before any zarr object exists: a Dask worker elsewhere resolves it the same way
        self.url = absolute_url(url, self.storage_options)
        self.fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        meta = _store_meta(self.fs, self._root, self.url, must_exist=mode == "r") or {}
        created = not meta
        check_version(meta, self.url, writable=mode != "r")
        self.store_id: str | None = meta.get("store_id")
        if self.store_id is None and mode != "r":
            self.store_id = new_store_id()
        store = open_store(self.url, self.storage_options, read_only=mode == "r", store_id=self.store_id)
        # milotile lists the store itself, never a (possibly stale) consolidated copy
        self.zarr_group = zarr.open_group(store=store, mode="r" if mode == "r" else "a", zarr_format=3,
                                          use_consolidated=False)
        if mode != "r" and meta.get("store_id") != self.store_id:
            meta.update({"kind": "collection", "store_id": self.store_id})
            meta.setdefault("version", STORE_VERSION)
            self.zarr_group.attrs["milotile"] = meta
        self._migrate_opaque(writable=mode != "r")
        if mode != "r":
            # every writable open makes sure of the markers, before any plain file appears under them:
            # a folder created later by any writer (a run folder, a lock file, a table) is never listed
            for name in OPAQUE:
                self._ensure_opaque(name)
        if mode != "r" and created:
            self.consolidate()  # a new store: consolidated metadata from the start (stages update it)

    # -- paths --------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """Root path (local path for local stores)."""
        return self._root

    def _join(self, *parts: str) -> str:
        return "/".join([self._root.rstrip("/"), *parts])

    def _migrate_opaque(self, *, writable: bool) -> None:
        for name in OPAQUE:
            folder = self._join(name)
            if self.fs.exists(folder) and not self.fs.exists(self._join(name, "zarr.json")):
                if writable:
                    self._ensure_opaque(name)
                    log.info("%s: marked %s/ as an opaque node (zarr no longer lists its files)", self.url, name)
                else:
                    log.warning(
                        "%s holds %s/ without its zarr marker (a store from an older milotile); zarr-python "
                        "warns when listing it until a milotile command writes to the store (it adds the marker).",
                        self.url, name,
                    )

    def _ensure_opaque(self, name: str) -> None:
        """Make ``<store>/<name>`` an empty zarr array, so zarr never lists the files inside it."""
        if self.fs.exists(self._join(name, "zarr.json")):
            return
        arr = self.zarr_group.create_array(name, shape=(0,), chunks=(1,), dtype="uint8", overwrite=False)
        arr.attrs["milotile"] = {
            "kind": name,
            "note": "plain files (not zarr data) live in this folder; see docs/architecture.md",
        }
        self.note_written(name)

    def runs_dir(self, run: str) -> str:
        """Path of ``<store>/runs/<run>`` for training runs (the ``runs`` marker is created)."""
        if not run or "/" in run or run.startswith("."):
            raise InputError(f"invalid run name {run!r}")
        self._ensure_opaque(RUNS)
        return self._join(RUNS, run)

    def relative_path(self, path: str | os.PathLike) -> str:
        """``path`` relative to the store folder (posix), for attributes that must not hold local paths.

        Remote stores and paths on another drive keep only the file name.
        """
        p = str(path)
        if "://" in self.url and not self.url.startswith("file://"):
            return os.path.basename(p)
        try:
            return os.path.relpath(os.path.abspath(p), os.path.abspath(self._root)).replace(os.sep, "/")
        except ValueError:
            return os.path.basename(p)

    def resolve_path(self, rel: str) -> str:
        """Inverse of :meth:`relative_path` for local stores (absolute paths pass unchanged)."""
        if os.path.isabs(rel) or "://" in rel:
            return rel
        return os.path.normpath(os.path.join(self._root, rel))

    def image_paths(self) -> dict[str, list[str]]:
        """Every OME-NGFF image of the store by kind, as paths relative to the store root.

        Kinds: ``tomograms``, ``labels`` (``<image>/labels/<name>``), ``preprocessed``, ``heatmaps``
        and other ``derived/<stage>`` outputs. Each path opens in napari
        (``napari --plugin napari-ome-zarr <store>/<path>``) and in ome-zarr-py.
        """
        return _images({path: dict(node.attrs) for path, node in self.zarr_group.members(max_depth=None)
                        if isinstance(node, zarr.Group)})

    def consolidate(self, nodes: Iterable[str] | None = None, drop: Iterable[str] = (), *,
                    written_only: bool = False) -> None:
        """Write consolidated metadata (``zarr.json`` of the root) for remote readers.

        Called at the end of every stage; readers that open the store with
        ``zarr.open_group(..., use_consolidated=True)`` then need one request for the whole tree.
        The root attributes also list the images (:meth:`image_paths`) under
        ``milotile.images`` so that a reader sees what to open without walking the tree.

        Parameters
        ----------
        nodes : iterable of str, optional
            Update only these node paths (one metadata read each, no listing) in the consolidated
            metadata already in the root, after removing every entry at or under ``drop``. For a
            stage that knows exactly which nodes it wrote (ingest), so its cost does not grow with
            the store. Default (or when the root holds no consolidated metadata yet): walk the
            whole store once.
        drop : iterable of str
            Subtrees whose old entries are removed first (the nodes written replace them).
        written_only : bool
            Update only the stage outputs this collection object began since the last
            consolidation (:meth:`note_written`; each is walked, its parents are read), for a stage
            that writes nothing else: outputs it reused cost nothing.
        """
        walk: list[str] = []
        if written_only and nodes is None:
            walk, nodes = sorted(set(self._written)), []
        with self._root_lock():  # two processes updating the root at once would lose entries
            if nodes is not None and self._consolidate_nodes(list(nodes), list(drop), walk):
                return
            self._consolidate_all()

    def _consolidate_all(self) -> None:
        """Walk the whole store once and write its consolidated metadata and image list."""
        import warnings

        with warnings.catch_warnings():
            # zarr-python notes that consolidated metadata is not (yet) in the v3 spec
            warnings.simplefilter("ignore")
            root = zarr.consolidate_metadata(self.zarr_group.store)  # the one walk of the tree
        flat = root.metadata.consolidated_metadata.flattened_metadata
        meta = _attrs(root)
        meta["images"] = _images({k: v.attributes for k, v in flat.items() if v.node_type == "group"})
        meta["layout"] = LAYOUT_DOC
        root.attrs["milotile"] = meta  # rewrites the root with its consolidated metadata
        self.zarr_group = self._open_root()
        self._written.clear()
        log.debug("consolidated metadata of %s", self.url)

    @contextlib.contextmanager
    def _root_lock(self, wait_s: float = 120.0) -> Iterator[None]:
        """Hold the writer lock of the root ``zarr.json``, waiting while another process holds it."""
        import time

        deadline = time.monotonic() + wait_s
        with contextlib.ExitStack() as stack:
            while True:
                try:
                    stack.enter_context(writer_lock(self, "zarr.json", command="consolidate metadata"))
                    break
                except StoreLockedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield

    def note_written(self, path: str) -> None:
        """Record that a stage output at ``path`` is being written (see ``consolidate(written_only=True)``)."""
        self._written.append(path.strip("/"))

    def _consolidate_nodes(self, nodes: list[str], drop: list[str], walk: list[str]) -> bool:
        """Update ``nodes`` and the subtrees ``walk`` in the root's consolidated metadata (JSON level);
        ``False`` when the root has none yet."""
        import json

        store = self.zarr_group.store
        root = json.loads(_get_bytes(store, "zarr.json") or b"{}")
        cm = root.get("consolidated_metadata") or {}
        if not isinstance(cm.get("metadata"), dict):
            return False
        gone = [STAGING, *drop, *walk]
        flat = {k: v for k, v in cm["metadata"].items() if not any(k == d or k.startswith(d + "/") for d in gone)}
        parents = {"/".join(w.split("/")[:i]) for w in walk for i in range(1, w.count("/") + 1)}
        for path in [*nodes, *sorted(parents - set(nodes))]:
            raw = _get_bytes(store, f"{path}/zarr.json")
            if raw is None:
                flat.pop(path, None)
            else:
                flat[path] = _consolidated_doc(json.loads(raw))
        for path in walk:
            flat.update(self._walk_docs(path))
        cm["metadata"] = dict(sorted(flat.items()))
        root["consolidated_metadata"] = cm
        meta = dict(root.get("attributes", {}).get("milotile", {}))
        meta["images"] = _images({k: v.get("attributes", {}) for k, v in flat.items() if v.get("node_type") == "group"})
        meta["layout"] = LAYOUT_DOC
        root.setdefault("attributes", {})["milotile"] = meta
        _set_bytes(store, "zarr.json", json.dumps(root, indent=2).encode())
        self.zarr_group = self._open_root()
        self._written.clear()
        log.debug("updated %d nodes and %d subtrees of the consolidated metadata of %s", len(nodes), len(walk),
                  self.url)
        return True

    def _walk_docs(self, path: str) -> dict[str, dict]:
        """``{path: zarr.json document}`` of the node at ``path`` and everything below it."""
        import json

        from zarr.core.buffer import default_buffer_prototype

        def doc(node: zarr.Group | zarr.Array) -> dict:
            raw = node.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
            return _consolidated_doc(json.loads(raw))

        try:
            top = self.zarr_group[path]
        except KeyError:
            return {}
        out = {path: doc(top)}
        if isinstance(top, zarr.Group):
            out.update({f"{path}/{sub}": doc(node) for sub, node in top.members(max_depth=None)})
        return out

    def _open_root(self) -> zarr.Group:
        """The root group, read again (milotile lists the store itself, never the consolidated copy)."""
        return zarr.open_group(store=self.zarr_group.store, mode="r" if self.zarr_group.read_only else "a",
                               zarr_format=3, use_consolidated=False)

    def group(self, path: str, *, create: bool = False) -> zarr.Group | None:
        """Sub-group at ``path`` (``"a/b/c"``); created when ``create`` is true, else ``None`` if missing.

        An existing group costs one metadata read (its own ``zarr.json``), not one per level.
        """
        path = "/".join(p for p in path.split("/") if p)
        if not path:
            return self.zarr_group
        try:
            node = self.zarr_group[path]
        except KeyError:
            node = None
        if node is None and create:
            try:  # zarr writes the missing parents and refuses an array among them
                node = self.zarr_group.require_group(path)
            except ValueError as exc:  # an array among the parents
                raise StoreError(f"{path} in {self.url} cannot be a group: {exc}") from None
        if node is not None and not isinstance(node, zarr.Group):
            raise StoreError(f"{path} in {self.url} is an array, not a group")
        return node

    # -- tomograms ----------------------------------------------------------------------------
    def _complete_members(self, kind: str) -> list[str]:
        """Complete members of ``tomograms``/``tilts``, listed once per collection object (cached)."""
        cached = self._members.get(kind)
        if cached is not None:
            return cached
        g = self.group(kind)
        nodes = {}
        if g is not None:
            for name, node in g.members():
                if isinstance(node, zarr.Group) and _attrs(node).get("complete"):
                    nodes[name] = node
        self._nodes[kind] = nodes  # the groups just read: looking a tomogram up reads nothing again
        self._members[kind] = sorted(nodes)
        return self._members[kind]

    def node(self, path: str) -> zarr.Group | zarr.Array | None:
        """The node at ``path`` (``None`` when missing); an ingested tomogram or tilt series of an
        already listed kind comes from the listing, without another metadata read."""
        kind, _, name = path.strip("/").partition("/")
        cached = self._nodes.get(kind, {}).get(name) if "/" not in name else None
        if cached is not None:
            return cached
        try:
            return self.zarr_group[path]
        except KeyError:
            return None

    def refresh(self) -> None:
        """Forget the cached tomogram / tilt-series listings (after ingest wrote new ones)."""
        self._members.clear()
        self._nodes.clear()
        self._tomos.clear()
        self._tilts.clear()

    @property
    def names(self) -> list[str]:
        """Names of the completely ingested tomograms, sorted (the store is listed once, then cached)."""
        return list(self._complete_members(TOMOGRAMS))

    def __contains__(self, name: str) -> bool:
        return name in self._complete_members(TOMOGRAMS)

    def __getitem__(self, name: str) -> Tomogram:
        if name not in self._complete_members(TOMOGRAMS):
            known = ", ".join(self.names[:8]) or "none"
            raise InputError(f"no tomogram named {name!r} in {self.url} (known: {known})")
        if name not in self._tomos:  # one object per name: its arrays are opened once
            self._tomos[name] = Tomogram(name, self._nodes[TOMOGRAMS][name], self)
        return self._tomos[name]

    def __iter__(self) -> Iterator[Tomogram]:
        for name in self.names:
            yield self[name]

    def __len__(self) -> int:
        return len(self.names)

    def tilt_series(self, name: str) -> TiltSeries | None:
        """The tilt series stored for tomogram ``name``, or ``None``."""
        if name not in self._complete_members(TILTS):
            return None
        if name not in self._tilts:  # one object per name: its array is opened once
            self._tilts[name] = TiltSeries(name, self._nodes[TILTS][name])
        return self._tilts[name]

    # -- tables -------------------------------------------------------------------------------
    def _table_path(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise InputError(f"invalid table name {name!r}")
        return self._join(TABLES, f"{name}.parquet")

    def has_table(self, name: str) -> bool:
        """Whether ``tables/<name>.parquet`` exists."""
        return self.fs.exists(self._table_path(name))

    def write_table(self, name: str, df: pd.DataFrame, params: dict | None = None,
                    sources: dict[str, str | None] | None = None, *, written_only: bool = False,
                    consolidate: bool = True) -> str:
        """Write ``df`` to ``tables/<name>.parquet`` atomically (temporary file, then rename).

        ``params`` (JSON-able: the stage parameters that made the table) are stored in the parquet
        metadata and come back from :meth:`table_params`; ``sources`` (``{store path: token}`` of
        the inputs, see :mod:`milotile.store.stage_output`) and the table's own token come back
        from :meth:`table_sources`. ``written_only``: the calling stage wrote its Zarr nodes only
        through stage outputs, so the consolidated metadata is updated from those alone
        (``consolidate(written_only=True)``) instead of a walk of the store. ``consolidate=False``
        writes the parquet file and nothing else (a table is a file inside the opaque ``tables``
        node, so the consolidated metadata does not list it): for frequent small writers such as
        the review page's verdict tables.
        """
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._table_path(name)
        made = not self.fs.exists(self._join(TABLES, "zarr.json"))
        self._ensure_opaque(TABLES)
        buf = io.BytesIO()
        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        if params is not None:
            meta[b"milotile"] = json.dumps(params, default=jsonable).encode()
        src = canonical(dict(sources or {}))
        token = make_token(canonical(params or {}), src, len(df))
        meta[b"milotile_sources"] = json.dumps({"sources": src, "token": token}).encode()
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, buf)
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"  # unique: two writers never share a temporary file
        with self.fs.open(tmp, "wb") as fh:
            fh.write(buf.getvalue())
        self.fs.mv(tmp, path)
        log.info("wrote table %s (%d rows)", path, len(df))
        # a stage's table is its last output: refresh the consolidated metadata for remote readers
        if consolidate or made:
            self.consolidate(written_only=written_only)
        return path

    def read_table(self, name: str) -> pd.DataFrame:
        """Read ``tables/<name>.parquet``."""
        path = self._table_path(name)
        if not self.fs.exists(path):
            raise missing_input(self.url, name)
        with self.fs.open(path, "rb") as fh:
            return pd.read_parquet(fh)

    def _table_meta(self, name: str, key: bytes) -> dict:
        import json

        import pyarrow.parquet as pq

        path = self._table_path(name)
        if not self.fs.exists(path):
            raise missing_input(self.url, name)
        with self.fs.open(path, "rb") as fh:
            meta = pq.read_schema(fh).metadata or {}
        raw = meta.get(key)
        return json.loads(raw) if raw else {}

    def table_params(self, name: str) -> dict:
        """The stage parameters stored with ``tables/<name>.parquet`` (empty if none)."""
        return self._table_meta(name, b"milotile")

    def table_sources(self, name: str) -> dict:
        """``{"sources": {...}, "token": ...}`` stored with ``tables/<name>.parquet`` (empty if none)."""
        return self._table_meta(name, b"milotile_sources")

    # -- stage outputs ------------------------------------------------------------------------
    def stage_output(self, path: str, params: dict, sources: dict[str, str | None]) -> StageOutput:
        """The :class:`~milotile.store.stage_output.StageOutput` of a stage writing ``path``."""
        return StageOutput(self, path, params, sources)

    def source_token(self, path: str) -> str | None:
        """Current token of the input at ``path`` (see :func:`milotile.store.stage_output.source_token`)."""
        return source_token(self, path)

    def output_status(self, path: str) -> str:
        """``complete``, ``incomplete`` or ``stale`` (see :func:`milotile.store.stage_output.output_status`)."""
        return output_status(self, path)

    def tables(self) -> list[str]:
        """Names of the tables in the store."""
        d = self._join(TABLES)
        if not self.fs.exists(d):
            return []
        return sorted(
            os.path.basename(p)[: -len(".parquet")] for p in self.fs.ls(d, detail=False) if p.endswith(".parquet")
        )

    # -- summaries ----------------------------------------------------------------------------
    def derived(self, status: bool = False) -> dict[str, list[str]] | dict[str, dict[str, str]]:
        """Derived outputs per stage, ``{stage: [names...]}`` of the complete, up-to-date ones.

        With ``status=True``: ``{stage: {name: "complete" | "incomplete" | "stale"}}`` of all of them
        (nested outputs such as ``heatmaps/<run>/<name>`` are named ``<run>/<name>``).
        """
        full: dict[str, dict[str, str]] = {}
        g = self.group(DERIVED)
        if g is not None:
            for stage, node in g.members():
                if isinstance(node, zarr.Group):
                    full[stage] = {n: output_status(self, f"{DERIVED}/{stage}/{n}") for n in _outputs(node)}
        if status:
            return full
        return {k: sorted(n for n, st in v.items() if st == "complete") for k, v in full.items()}

    def info(self) -> pd.DataFrame:
        """One row per tomogram: shape, voxel size, tilt series, source."""
        rows: list[dict[str, Any]] = []
        for t in self:
            ts = t.tilt_series
            rows.append(
                {
                    "name": t.name,
                    "shape_zyx": "x".join(map(str, t.shape)),
                    "voxel_size_A": t.voxel_size,
                    "levels": len(t.levels),
                    "tilts": ts.shape[0] if ts is not None else 0,
                    "source": t.meta.get("source", ""),
                    "fingerprint": _fingerprint_label(t.meta),
                }
            )
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        return f"Collection({self.url!r}, {len(self)} tomograms)"



def _fingerprint_label(meta: dict) -> str:
    """``"<first 10 hex digits> (<what was hashed>)"`` for ``info``: the check re-ingest compares."""
    fp = str(meta.get("fingerprint") or "")
    kind = meta.get("fingerprint_kind") or ("sha1 of the whole file" if fp else "none")
    return f"{fp[:10]} ({kind})" if fp else kind


def check_version(meta: dict, url: str, *, writable: bool) -> None:
    """Refuse to write a store made by a newer milotile; reading it only logs a warning.

    A newer layout may hold nodes this code does not know, so writing could leave a store that neither
    version reads correctly; reading shows what this version understands and says so.
    """
    try:
        version = int(meta.get("version", STORE_VERSION))
    except (TypeError, ValueError):
        raise InputError(f"{url} has an unreadable store version {meta.get('version')!r}") from None
    if version <= STORE_VERSION:
        return
    if writable:
        raise InputError(
            f"{url} was written by a newer milotile (store version {version}, this milotile writes version "
            f"{STORE_VERSION}); upgrade milotile to write to it"
        )
    log.warning("%s has store version %d, newer than this milotile's %d: reading what this version knows",
                url, version, STORE_VERSION)


def _root_metadata(fs: Any, path: str, url: str) -> dict | None:
    """The parsed root ``zarr.json`` (``None`` when there is none); refuses arrays and non-Zarr files."""
    import json

    try:
        raw = fs.cat_file(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{url} is not a Zarr v3 store ({path} is not valid JSON)") from None
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3:
        raise InputError(f"{url} is not a Zarr v3 store (its zarr.json has no zarr_format 3)")
    if doc.get("node_type") != "group":
        raise InputError(f"{url} is a Zarr {doc.get('node_type', 'node')}, not a milotile collection store (a group)")
    return doc


def _outputs(node: zarr.Group, prefix: str = "") -> list[str]:
    """Names of the stage outputs under a stage group: groups holding ``milotile`` attributes."""
    out = []
    for name, sub in node.members():
        if not isinstance(sub, zarr.Group):
            continue
        if "milotile" in sub.attrs:
            out.append(prefix + name)
        else:
            out.extend(_outputs(sub, f"{prefix}{name}/"))
    return sorted(out)


def _images(groups: dict[str, dict]) -> dict[str, list[str]]:
    """OME-NGFF images by kind from ``{group path: attributes}`` (see :meth:`Collection.image_paths`)."""
    out: dict[str, list[str]] = {}
    for path, attrs in groups.items():
        if "multiscales" not in dict(attrs.get("ome", {})):
            continue
        parts = path.split("/")
        if "labels" in parts[:-1]:
            kind = "labels"
        elif parts[0] == DERIVED and len(parts) > 2:
            kind = parts[1]
        else:
            kind = parts[0]
        out.setdefault(kind, []).append(path)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _consolidated_doc(doc: dict) -> dict:
    """A node's ``zarr.json`` as an entry of the consolidated metadata (groups carry an empty one)."""
    if doc.get("node_type") == "group":
        doc.setdefault("consolidated_metadata", {"kind": "inline", "must_understand": False, "metadata": {}})
    return doc


def _get_bytes(store: Any, key: str) -> bytes | None:
    """One document of a zarr store (``None`` when missing), through the store (counted by iostats)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _set_bytes(store: Any, key: str, data: bytes) -> None:
    """Write one document of a zarr store."""
    from zarr.core.buffer import cpu
    from zarr.core.sync import sync

    sync(store.set(key, cpu.Buffer.from_bytes(data)))


def _store_meta(fs: Any, root: str, url: str, *, must_exist: bool) -> dict | None:
    """The root ``milotile`` attributes of the store at ``root`` (``None`` when there is no store yet).

    Refuses a missing store (when ``must_exist``), a file, a Zarr array and a Zarr group that is not
    a milotile collection, each with one sentence.
    """
    doc = _root_metadata(fs, root.rstrip("/") + "/zarr.json", url)
    if doc is None:
        if must_exist:
            raise InputError(f"{url} is not a milotile store (no zarr.json); create it with `milotile ingest`")
        if fs.isfile(root):
            raise InputError(f"{url} is a file, not a milotile collection store")
        return None
    meta = dict(doc.get("attributes", {}).get("milotile", {}))
    if meta.get("kind") != "collection":
        raise InputError(f"{url} is a Zarr group but not a milotile collection store")
    return meta


def check_store(url: str | os.PathLike, *, must_exist: bool = True, storage_options: dict | None = None) -> None:
    """Refuse what is not a collection store (missing, a Zarr array, another Zarr group, a file) cheaply.

    Reads only the root ``zarr.json``; the CLI calls it before starting a Dask cluster so a wrong
    store path fails in a second. ``must_exist=False`` accepts a path where a store will be created.
    """
    abs_url = absolute_url(url, storage_options)
    fs, root = fsspec.core.url_to_fs(abs_url, **(storage_options or {}))
    _store_meta(fs, root, abs_url, must_exist=must_exist)


def open_collection(url: str | os.PathLike, mode: str = "r+", storage_options: dict | None = None) -> Collection:
    """Open an existing collection store (``mode="r"`` read-only, ``"r+"`` read/write).

    Parameters
    ----------
    url : str or path
        Local path or fsspec URL (``s3://bucket/project.zarr``).
    mode : {"r", "r+", "a"}
        ``"a"`` also creates an empty store.
    storage_options : dict, optional
        Passed to fsspec for remote stores.

    Returns
    -------
    Collection
    """
    if mode not in ("r", "r+", "a"):
        raise InputError(f"mode must be 'r', 'r+' or 'a', got {mode!r}")
    if mode != "a":
        fs, root = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
        if not fs.exists(root.rstrip("/") + "/zarr.json"):
            raise InputError(f"{url} is not a milotile store (no zarr.json); create it with `milotile ingest`")
    return Collection(url, mode="r" if mode == "r" else "a", storage_options=storage_options)


def as_collection(col: Any, mode: str = "r+", storage_options: dict | None = None) -> Collection:
    """The one way to turn a collection, a store path or an fsspec URL into a :class:`Collection`."""
    if isinstance(col, Collection):
        return col
    if isinstance(col, (str, os.PathLike)):
        return open_collection(col, mode=mode, storage_options=storage_options)
    raise InputError(f"expected a milotile collection or a store path, got a {type(col).__name__}")
