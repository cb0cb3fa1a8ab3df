"""``segments ingest``: copy an EM volume and its instance labels into the store and index the objects.

One distributed pass: every task reads one region of the sources (whole chunks; for slice folders
and TIFF stacks, which cannot be read by tile cheaply, a slab of whole slices), writes the EM,
label (and class) chunks, and returns the region's small object table (:func:`block_index`).
With ``connected_components=True`` the label input is a semantic mask: a first pass labels
every block and a second pass maps block-local ids to global ones merged across seams
(:mod:`milotile.segments.components`), then indexes.

Input checks happen before anything is written: a shape mismatch between EM and labels, float
labels or an unreadable file raise :class:`~milotile.errors.InputError`; labels without any
object raise it after the pass, and the staging copy (and a store this call created) is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from milotile.errors import InputError
from milotile.segments.components import block_faces, label_block, seam_lookup
from milotile.segments.index import block_index, reduce_index
from milotile.segments.io import SliceFolderReader, TiffStackReader, VolumeReader, open_volume
from milotile.segments.volume import (
    SEGMENTS,
    SegmentVolume,
    as_collection,
    open_segments,
    write_rows,
)
from milotile.store.arrays import (
    AXES_ZYX,
    DEFAULT_CHUNKS,
    clip_chunks,
    create_array,
    multiscale_metadata,
)
from milotile.store.labels import create_labels
from milotile.store.stage_output import file_token

log = logging.getLogger(__name__)

__all__ = ["ingest_segments", "index_objects", "read_class_table"]

_EM_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.float32)


def _check_inputs(em: VolumeReader, labels: VolumeReader, classes: VolumeReader | None, cc: bool) -> None:
    if labels.shape != em.shape:
        raise InputError(f"labels {labels.path} have shape {labels.shape} but the EM volume {em.path} has {em.shape}.")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise InputError(
            f"labels {labels.path} are {labels.dtype}; instance labels must be integer ids (uint32/uint64), "
            "not floating point."
        )
    if classes is not None:
        if classes.shape != em.shape:
            raise InputError(f"class volume {classes.path} has shape {classes.shape} but the EM volume has {em.shape}.")
        if not np.issubdtype(classes.dtype, np.integer):
            raise InputError(f"class volume {classes.path} is {classes.dtype}; class codes must be integers.")
    if labels.dtype == bool and not cc:
        raise InputError(f"labels {labels.path} are a boolean mask; pass --connected-components to split it into objects.")


def _regions(shape: Sequence[int], chunks: Sequence[int], slab: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Task regions: whole chunks, or slabs of whole slices (one chunk thick) when ``slab``."""
    import itertools

    steps = [chunks[0], shape[1], shape[2]] if slab else list(chunks)
    ranges = [range(0, s, c) for s, c in zip(shape, steps, strict=True)]
    out = []
    for lo in itertools.product(*ranges):
        hi = tuple(min(a + c, s) for a, c, s in zip(lo, steps, shape, strict=True))
        out.append((tuple(lo), hi))
    return out


def _open(url: str, so: dict | None, path: str) -> zarr.Array:
    return zarr.open_array(url, path=path, mode="r+", storage_options=so or None)


def _copy_region(
    url: str, so: dict | None, paths: dict[str, str], em: VolumeReader, labels: VolumeReader,
    classes: VolumeReader | None, lo: tuple[int, ...], hi: tuple[int, ...], em_dtype: str, cc: bool,
) -> Any:
    """One ingest task: copy a region; return its object table (or, with ``cc``, its components)."""
    key = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    e = em[key]
    if np.dtype(em_dtype) == np.float32 and e.dtype != np.float32:
        e = e.astype(np.float32)
    _open(url, so, paths["em"])[key] = e
    del e
    lab = labels[key]
    if np.issubdtype(lab.dtype, np.signedinteger) and lab.size and lab.min() < 0:
        raise InputError(f"labels {labels.path} hold negative ids (e.g. {int(lab.min())}) near voxel {lo}.")
    cls = None
    if classes is not None:
        cls = classes[key]
        _open(url, so, paths["classes"])[key] = cls
    if cc:
        local, n = label_block(lab)
        _open(url, so, paths["objects"])[key] = local
        return n, block_faces(local, lab)
    _open(url, so, paths["objects"])[key] = lab
    return block_index(lab, lo, cls)


def _relabel_region(
    url: str, so: dict | None, paths: dict[str, str], lo: tuple[int, ...], hi: tuple[int, ...],
    offset: int, lookup: np.ndarray, with_classes: bool,
) -> Any:
    """Second pass of connected components: block-local -> global ids, then index the block."""
    key = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    arr = _open(url, so, paths["objects"])
    local = arr[key]
    glob = np.where(local > 0, lookup[local.astype(np.int64) + offset], 0).astype(arr.dtype)
    arr[key] = glob
    cls = _open(url, so, paths["classes"])[key] if with_classes else None
    return block_index(glob, lo, cls)


def _compute(tasks: list, desc: str) -> list:
    from milotile.runtime import compute_with_progress

    return compute_with_progress(tasks, desc=desc)


def read_class_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A per-object class table (parquet/csv/tsv) with columns ``id`` and ``class`` (and ``class_name``)."""
    p = Path(path)
    try:
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, sep="\t" if p.suffix in (".tsv", ".txt") else ",")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the class table {p}: {exc}.") from exc
    if "id" not in df or "class" not in df:
        raise InputError(f"class table {p} needs the columns 'id' and 'class'; it has {', '.join(map(str, df.columns))}.")
    if not pd.api.types.is_integer_dtype(df["class"]):
        codes, names = pd.factorize(df["class"].astype(str), sort=True)
        df = df.assign(class_name=df["class"].astype(str), **{"class": codes})
        del names
    keep = ["id", "class"] + (["class_name"] if "class_name" in df else [])
    return df[keep].astype({"id": np.uint64, "class": np.int64})


def ingest_segments(
    em: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    store: Any,
    *,
    name: str = "volume",
    classes: str | os.PathLike[str] | None = None,
    voxel_size: Sequence[float] | float | None = None,
    dataset: str | None = None,
    labels_dataset: str | None = None,
    connected_components: bool = False,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    overwrite: bool = False,
) -> SegmentVolume:
    """Ingest an EM volume with instance labels into ``segments/<name>`` and index its objects.

    Parameters
    ----------
    em, labels : path
        Volumes (MRC, multi-page TIFF, slice folder, HDF5, Zarr/OME-Zarr); same shape.
    store : Collection or path
        The collection store (created if missing).
    name : str
        Volume name inside the store.
    classes : path, optional
        Class volume (same shape, integer codes) or per-object table (``id, class``), for evaluation.
    voxel_size : float or (z, y, x), optional
        Å per voxel; default: from the EM file (MRC header, OME scale), else unknown (voxel units).
    dataset, labels_dataset : str, optional
        HDF5 dataset / Zarr array path of the EM and label inputs.
    connected_components : bool
        Treat ``labels`` as a semantic mask and split it into 6-connected objects across seams.
    chunks : (z, y, x)
        Zarr chunks of the EM and label arrays.
    overwrite : bool
        Replace an existing volume of that name.

    Returns
    -------
    SegmentVolume
    """
    em_r = open_volume(em, dataset)
    lab_r = open_volume(labels, labels_dataset if labels_dataset is not None else dataset)
    cls_r, cls_table = None, None
    if classes is not None:
        cp = Path(classes)
        if cp.suffix in (".parquet", ".csv", ".tsv", ".txt"):
            cls_table = read_class_table(cp)
        else:
            cls_r = open_volume(cp)
    _check_inputs(em_r, lab_r, cls_r, connected_components)
    vs = _voxel_size(voxel_size, em_r, lab_r)
    chunks = clip_chunks(em_r.shape, chunks)
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"invalid volume name {name!r}.")

    created = not Path(str(store)).exists() if not hasattr(store, "zarr_group") else False
    col = as_collection(store, mode="a")
    seg = col.group(SEGMENTS, create=True)
    params = {"connected_components": connected_components, "chunks": list(chunks),
              "voxel_size": None if vs is None else list(vs), "dataset": dataset, "labels_dataset": labels_dataset}
    sources = {f"file:{os.path.abspath(r.path)}": file_token(r.path) for r in (em_r, lab_r, cls_r) if r is not None}
    if classes is not None and cls_r is None:
        sources[f"file:{os.path.abspath(classes)}"] = file_token(classes)
    out = col.stage_output(f"{SEGMENTS}/{name}", params, sources)
    if out.reusable and not overwrite:
        log.info("segment volume %r is up to date (same inputs and parameters); --overwrite re-ingests it", name)
        return open_segments(col, name)
    if name in seg and not overwrite:
        raise InputError(f"{col.url} already holds segment volume {name!r} made from other inputs; pass --overwrite to replace it.")
    staging = f".staging-{name}-{uuid.uuid4().hex[:8]}"
    try:
        with out:
            grp = out.begin(seg.create_group(staging))
            objects, meta = _ingest(col, grp, staging, name, em_r, lab_r, cls_r, cls_table, vs, chunks,
                                    connected_components)
            out.finish(**meta)
            from milotile.store.ingest import _replace

            _replace(col, f"{SEGMENTS}/{staging}", f"{SEGMENTS}/{name}")
    except BaseException:
        if staging in seg:
            del seg[staging]
        if created and not col.names and not open_or_none(col):
            shutil.rmtree(col.path, ignore_errors=True)
        raise
    write_rows(col, "objects", name, objects, params={"stage": "segments-ingest", **meta})
    log.info("ingested segment volume %r: %s voxels, %d objects%s", name, "x".join(map(str, em_r.shape)),
             len(objects), f", voxel {vs} Å" if vs else " (voxel size unknown)")
    return open_segments(col, name)


def open_or_none(col: Any) -> bool:
    """Whether ``col`` holds any complete segment volume."""
    try:
        open_segments(col)
        return True
    except InputError:
        return False


def _voxel_size(arg: Sequence[float] | float | None, *readers: VolumeReader) -> tuple[float, ...] | None:
    if arg is not None:
        vals = (float(arg),) * 3 if np.isscalar(arg) else tuple(float(v) for v in arg)  # type: ignore[arg-type]
        if len(vals) != 3 or min(vals) <= 0:
            raise InputError(f"voxel size must be one or three positive numbers (z, y, x in Å), got {arg!r}.")
        return vals
    for r in readers:
        if r.voxel_size is not None:
            return tuple(float(v) for v in r.voxel_size)
    return None


def _ingest(col: Any, grp: zarr.Group, staging: str, name: str, em_r: VolumeReader, lab_r: VolumeReader,
            cls_r: VolumeReader | None, cls_table: pd.DataFrame | None, vs: tuple[float, ...] | None,
            chunks: tuple[int, ...], cc: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Copy and index into the staging group ``grp``; returns the object table and the volume's metadata."""
    import dask

    scale = vs or (1.0, 1.0, 1.0)
    unit = "angstrom" if vs else "voxel"
    em_dtype = next((np.dtype(d) for d in _EM_DTYPES if np.dtype(d) == em_r.dtype), np.dtype(np.float32))
    create_array(grp, "0", em_r.shape, chunks=chunks, dtype=em_dtype, dimension_names=AXES_ZYX)
    wide = lab_r.dtype.itemsize > 4 and not cc
    lab_dtype = np.uint64 if wide else np.uint32
    create_labels(grp, "objects", em_r.shape, chunks=chunks, dtype=lab_dtype, scale=scale, unit=unit)
    paths = {"em": f"{SEGMENTS}/{staging}/0", "objects": f"{SEGMENTS}/{staging}/labels/objects/0"}
    if cls_r is not None:
        create_labels(grp, "classes", em_r.shape, chunks=chunks, dtype=np.int32, scale=scale, unit=unit)
        paths["classes"] = f"{SEGMENTS}/{staging}/labels/classes/0"
    slab = isinstance(em_r, (SliceFolderReader, TiffStackReader)) or isinstance(lab_r, (SliceFolderReader, TiffStackReader))
    regions = _regions(em_r.shape, chunks, slab)
    so = dict(col.storage_options or {}) or None
    copy = dask.delayed(_copy_region, pure=False)
    res = _compute([copy(col.url, so, paths, em_r, lab_r, cls_r, lo, hi, em_dtype.str, cc) for lo, hi in regions],
                   desc="segments ingest")
    if cc:
        res = _merge_components(col.url, so, paths, regions, res, cls_r is not None)
    objects = reduce_index([r[0] for r in res], [r[1] for r in res], scale)
    if not len(objects):
        raise InputError(f"labels {lab_r.path} hold no object (every voxel is 0).")
    if cls_table is not None:
        objects = objects.merge(cls_table, on="id", how="left")
        objects["class"] = objects["class"].fillna(-1).astype(np.int64)
    grp.attrs["ome"] = multiscale_metadata(name, 1.0, 1, axis_scale=scale)
    if unit == "voxel":
        grp.attrs["ome"] = _with_unit(grp.attrs["ome"], "voxel")
    meta = {
        "kind": "segments", "source_em": em_r.path, "source_labels": lab_r.path,
        "source_classes": None if cls_r is None else cls_r.path, "voxel_size": list(scale),
        "voxel_size_known": vs is not None, "shape": list(em_r.shape), "chunks": list(chunks),
        "connected_components": cc, "n_objects": len(objects),
    }
    return objects, meta


def _with_unit(ome: dict, unit: str) -> dict:
    ome = dict(ome)
    for ms in ome.get("multiscales", []):
        for ax in ms["axes"]:
            ax["unit"] = unit
    return ome


def _merge_components(url: str, so: dict | None, paths: dict[str, str], regions: list, res: list,
                      with_classes: bool) -> list:
    import dask

    starts = [sorted({lo[a] for lo, _ in regions}) for a in range(3)]
    index = {lo: tuple(starts[a].index(lo[a]) for a in range(3)) for lo, _ in regions}
    grid = tuple(len(s) for s in starts)
    counts = {index[lo]: r[0] for (lo, _), r in zip(regions, res, strict=True)}
    faces = {index[lo]: r[1] for (lo, _), r in zip(regions, res, strict=True)}
    offsets, lookup, k = seam_lookup(grid, counts, faces)
    if k >= 2**32:
        raise InputError(f"connected components found {k} objects, more than uint32 label ids hold.")
    relabel = dask.delayed(_relabel_region, pure=False)
    look = dask.delayed(lookup)
    return _compute([relabel(url, so, paths, lo, hi, offsets[index[lo]], look, with_classes) for lo, hi in regions],
                    desc="segments relabel")


def index_objects(store: Any, name: str | None = None) -> pd.DataFrame:
    """Recompute ``tables/objects`` of a stored volume in one distributed pass over its labels.

    Returns
    -------
    pandas.DataFrame
        The object index (see :func:`~milotile.segments.index.reduce_index`).
    """
    import dask

    vol = open_segments(store, name)
    col = vol.collection
    arr = vol.label_array("objects")
    with_cls = vol.has_labels("classes")
    so = dict(col.storage_options or {}) or None
    regions = _regions(vol.shape, vol.chunks, False)
    task = dask.delayed(_index_region, pure=False)
    res = _compute([task(col.url, so, vol.path("labels", "objects", "0"),
                         vol.path("labels", "classes", "0") if with_cls else None, lo, hi) for lo, hi in regions],
                   desc="segments index")
    objects = reduce_index([r[0] for r in res], [r[1] for r in res], vol.voxel_size)
    old = vol.objects() if col.has_table("objects") else pd.DataFrame()
    if not with_cls and "class" in old:  # classes from a per-object table
        keep = [c for c in ("id", "class", "class_name") if c in old]
        objects = objects.merge(old[keep], on="id", how="left")
    write_rows(col, "objects", vol.name, objects, params={"stage": "segments-index", **vol.meta})
    del arr
    return objects


def _index_region(url: str, so: dict | None, lab_path: str, cls_path: str | None, lo: tuple[int, ...],
                  hi: tuple[int, ...]) -> Any:
    key = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    lab = zarr.open_array(url, path=lab_path, mode="r", storage_options=so or None)[key]
    cls = None if cls_path is None else zarr.open_array(url, path=cls_path, mode="r", storage_options=so or None)[key]
    return block_index(lab, lo, cls)
