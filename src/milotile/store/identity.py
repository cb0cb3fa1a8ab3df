"""Store identity: absolute store URLs and a per-store token that every Dask worker checks.

A relative store path (``--store C4.zarr``) means a different folder to a Dask worker started in
another directory, and a path on a non-shared disk means a different (or no) store on another
machine. Either way the worker would read fill values (zeros) and write its chunks somewhere the
user never looks, and the stage would still report success. Two things prevent that:

* :func:`absolute_url` turns a local path into an absolute one (remote URLs keep their protocol),
  before any zarr object that could be sent to a worker exists;
* :class:`IdentityCheckedStore` wraps the zarr store of a collection. When it arrives in another
  process (it is unpickled there), its first read or write first reads the store's root
  ``zarr.json`` and compares the ``store_id`` recorded at creation (a UUID in the root attributes)
  with the one the client saw. A mismatch raises :class:`~milotile.errors.InputError` on the worker
  before anything is read or written; Dask passes it to the client, where the CLI prints it.

The check costs one small read per deserialised store (about once per task), nothing in the client.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any

import fsspec
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from milotile.errors import InputError

__all__ = ["IdentityCheckedStore", "absolute_url", "is_local_url", "new_store_id", "open_store"]


def is_local_url(url: str | os.PathLike) -> bool:
    """True for plain paths and ``file://`` URLs."""
    text = os.fspath(url)
    return "://" not in text or text.startswith("file://")


def absolute_url(url: str | os.PathLike, storage_options: dict | None = None) -> str:
    """``url`` with a local path made absolute (``~`` expanded); remote URLs are fully qualified.

    Parameters
    ----------
    url : str or path
        Local path, ``file://`` URL or fsspec URL (``s3://bucket/x.zarr``).
    storage_options : dict, optional
        fsspec options (only used to qualify remote URLs).

    Returns
    -------
    str
    """
    text = os.fspath(url)
    if is_local_url(text):
        if text.startswith("file://"):
            text = text[len("file://"):]
        return os.path.abspath(os.path.expanduser(text))
    fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
    return fs.unstrip_protocol(root.rstrip("/"))


def new_store_id() -> str:
    """A fresh identity token for a new store."""
    return uuid.uuid4().hex


def _base_store(url: str, storage_options: dict | None, read_only: bool) -> Store:
    if is_local_url(url):
        return LocalStore(url, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options or None, read_only=read_only)


def open_store(url: str, storage_options: dict | None, *, read_only: bool, store_id: str | None) -> IdentityCheckedStore:
    """The zarr store of the collection at (absolute) ``url``, checked for ``store_id`` on workers."""
    return IdentityCheckedStore(_base_store(url, storage_options, read_only), url=url, store_id=store_id)


class IdentityCheckedStore(WrapperStore[Store]):
    """A zarr store that, once unpickled in another process, checks it still sees the same collection.

    Parameters
    ----------
    store : zarr.abc.store.Store
        The real store.
    url : str
        Absolute URL of the collection (for messages).
    store_id : str or None
        The token in the root attributes; ``None`` for stores opened read-only that predate tokens
        (then the root must at least be a milotile collection).
    """

    def __init__(self, store: Store, *, url: str = "", store_id: str | None = None) -> None:
        super().__init__(store)
        self.url = url
        self.store_id = store_id
        self._verified = True  # the process that opened the store has just read its root

    def _with_store(self, store: Store) -> IdentityCheckedStore:
        new = type(self)(store, url=self.url, store_id=self.store_id)
        new._verified = self._verified
        return new

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_verified"] = False  # whoever unpickles this must look at the store first
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    async def _verify(self) -> None:
        if self._verified:
            return
        buf = await self._store.get("zarr.json", default_buffer_prototype())
        found: str | None = None
        kind = None
        if buf is not None:
            try:
                meta = json.loads(buf.to_bytes()).get("attributes", {}).get("milotile", {})
                found, kind = meta.get("store_id"), meta.get("kind")
            except (ValueError, AttributeError):
                pass
        ok = kind == "collection" and (self.store_id is None or found == self.store_id)
        if not ok:
            seen = "no milotile store" if kind != "collection" else f"a different store (id {found})"
            raise InputError(
                f"a Dask worker on host {socket.gethostname()} (pid {os.getpid()}) sees {seen} at {self.url} "
                f"instead of store {self.store_id or '(any)'}; workers must reach the same store (a shared "
                "file system path or an object-store URL), nothing was written by that worker"
            )
        self._verified = True

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        await self._verify()
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        await self._verify()
        return await self._store.get_partial_values(prototype, key_ranges)

    async def set(self, key: str, value: Any) -> None:
        await self._verify()
        await self._store.set(key, value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        await self._verify()
        return await self._store.set_if_not_exists(key, value)

    async def delete(self, key: str) -> None:
        await self._verify()
        await self._store.delete(key)

    async def _get_many(self, requests: Any) -> Any:
        await self._verify()
        async for item in self._store._get_many(requests):
            yield item

    def __eq__(self, value: object) -> bool:
        return isinstance(value, IdentityCheckedStore) and self._store == value._store

    def __repr__(self) -> str:
        return f"IdentityCheckedStore({self.url!r}, store_id={self.store_id!r})"
