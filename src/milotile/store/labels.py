"""OME-NGFF 0.5 label images under an image group: ``<image>/labels/<name>/0`` with ``image-label``.

The labels group lists its label images (``{"ome": {"labels": [...]}}``); each label image is a
one-level multiscale integer array with the image's scale, an ``image-label`` block with a colour
table (``colors``: ``label-value`` → ``rgba``), optional per-value ``properties`` and
``source.image`` pointing back at the image. Readers: ``ome_zarr.reader`` and napari-ome-zarr.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

from milotile.errors import InputError
from milotile.store.arrays import (
    AXES_ZYX,
    NGFF_VERSION,
    create_array,
    multiscale_metadata,
    write_dask,
)

log = logging.getLogger(__name__)

__all__ = ["create_labels", "write_labels", "write_tomogram_labels", "label_attrs", "label_colors", "LABELS"]

LABELS = "labels"


def label_colors(values: Sequence[int], seed: int = 0, cmap: str = "tab20") -> list[dict[str, Any]]:
    """A colour table entry per label value (``tab20`` colours for up to 20 values, then random)."""
    from matplotlib import colormaps

    cm = colormaps[cmap]
    rng = np.random.default_rng(seed)
    out = []
    for i, v in enumerate(values):
        rgb = cm(i % cm.N)[:3] if i < cm.N else tuple(rng.uniform(0.15, 1.0, size=3))
        out.append({"label-value": int(v), "rgba": [int(round(255 * c)) for c in rgb] + [255]})
    return out


def label_attrs(
    name: str,
    scale: Sequence[float],
    *,
    colors: Sequence[dict[str, Any]] | None = None,
    properties: Sequence[dict[str, Any]] | None = None,
    unit: str = "angstrom",
) -> dict[str, Any]:
    """The ``ome`` attribute of a one-level label image (NGFF 0.5)."""
    ms = {
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": unit} for a in AXES_ZYX],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [float(s) for s in scale]}]}],
    }
    il: dict[str, Any] = {"source": {"image": "../../"}}
    if colors:
        il["colors"] = list(colors)
    if properties:
        il["properties"] = list(properties)
    return {"version": NGFF_VERSION, "multiscales": [ms], "image-label": il}


def _image_name(image: zarr.Group, default: str) -> str:
    """The multiscales name of the image a label image belongs to (its tomogram / volume name)."""
    ms = dict(image.attrs.get("ome", {})).get("multiscales") or [{}]
    return str(ms[0].get("name") or default)


def _label_channel(name: str) -> dict:
    """An ``omero`` channel named after the colour map: napari-ome-zarr then calls the layer
    ``"<image>: <name>"`` instead of ``labels/labels/<name>`` (its colours still come from ``image-label``).
    No ``window``: napari would pass it on as ``contrast_limits``, which a Labels layer refuses."""
    from milotile.store.ngff import grey_channel

    block = grey_channel(name, (0.0, 1.0), active=False)
    del block["channels"][0]["window"]
    return block


def _register(image: zarr.Group, name: str) -> zarr.Group:
    grp = image.require_group(LABELS)
    ome = dict(grp.attrs.get("ome", {}))
    names = [n for n in ome.get("labels", []) if n != name] + [name]
    grp.attrs["ome"] = {"version": NGFF_VERSION, "labels": names}
    return grp


def _label_group(image: zarr.Group, name: str, scale: Sequence[float], colors: Any, properties: Any, unit: str,
                 attributes: dict[str, Any] | None) -> zarr.Group:
    """The (re-created) group ``<image>/labels/<name>`` with its NGFF attributes, registered in ``labels``."""
    grp = _register(image, name)
    if name in grp:
        del grp[name]
    lab = grp.create_group(name)
    ome = label_attrs(_image_name(image, name), scale, colors=colors, properties=properties, unit=unit)
    ome["omero"] = _label_channel(name)
    lab.attrs["ome"] = ome
    if attributes:
        lab.attrs.update(attributes)
    return lab


def create_labels(
    image: zarr.Group,
    name: str,
    shape: Sequence[int],
    *,
    chunks: Sequence[int],
    dtype: Any = np.uint32,
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    colors: Sequence[dict[str, Any]] | None = None,
    properties: Sequence[dict[str, Any]] | None = None,
    unit: str = "angstrom",
    attributes: dict[str, Any] | None = None,
) -> zarr.Array:
    """Create (replacing) the empty label image ``<image>/labels/<name>`` and return its array ``0``.

    Parameters
    ----------
    image : zarr.Group
        The OME-NGFF image group the labels belong to.
    name : str
        Label image name (``objects``, ``clusters``, ...).
    shape, chunks, dtype
        Of the level-0 array (chunks like the image's).
    scale : (z, y, x)
        Physical size of a voxel (the image's level-0 scale).
    colors, properties : list of dict, optional
        ``image-label`` colour table and per-value properties.
    unit : str
        Axis unit.
    attributes : dict, optional
        Extra group attributes (e.g. ``{"milotile": {...}}``).

    Returns
    -------
    zarr.Array
    """
    lab = _label_group(image, name, scale, colors, properties, unit, attributes)
    return create_array(lab, "0", shape, chunks=chunks, dtype=dtype, dimension_names=AXES_ZYX)


def write_labels(
    image: zarr.Group,
    name: str,
    labels: da.Array,
    *,
    chunks: Sequence[int],
    scale: Sequence[float] = (1.0, 1.0, 1.0),
    colors: Sequence[dict[str, Any]] | None = None,
    properties: Sequence[dict[str, Any]] | None = None,
    unit: str = "angstrom",
    attributes: dict[str, Any] | None = None,
    compute: bool = True,
) -> zarr.Array | da.Array:
    """Write a dask integer array as the label image ``<image>/labels/<name>`` (chunk-aligned).

    Parameters are those of :func:`create_labels`; ``compute=False`` returns the lazy write.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"label images must be integer, got {labels.dtype}")
    lab = _label_group(image, name, scale, colors, properties, unit, attributes)
    return write_dask(labels, lab, "0", chunks=chunks, dimension_names=AXES_ZYX, compute=compute)


def write_tomogram_labels(
    col: Any,
    image: str,
    name: str,
    data: da.Array,
    *,
    colors: Mapping[int, Sequence[int]] | None = None,
    properties: Sequence[Mapping[str, Any]] | None = None,
    params: Mapping[str, Any] | None = None,
    sources: Mapping[str, str | None] | None = None,
) -> str:
    """Write an integer volume as a multiscale labels image of tomogram ``image`` (a stage output).

    The labels follow the tomogram's pyramid (nearest-neighbour subsamples per level, the image's
    chunks), so napari overlays every level; the write goes through ``col.stage_output`` (complete
    flag, parameters, source tokens, writer lock).

    Parameters
    ----------
    col : Collection
        The store.
    image : str
        Tomogram name; the labels must have its level-0 shape.
    name : str
        Label image name (``tomograms/<image>/labels/<name>``).
    data : dask.array.Array
        ``(z, y, x)`` unsigned integers, 0 = background.
    colors : mapping, optional
        ``{label value: (r, g, b, a)}`` 0-255, the ``image-label`` colour table.
    properties : sequence of mapping, optional
        ``image-label`` properties (each with ``"label-value"``).
    params : mapping, optional
        The parameters that made the labels.
    sources : mapping, optional
        Inputs besides the tomogram (``{store path: token}``), see :mod:`milotile.store.stage_output`.

    Returns
    -------
    str
        The path of the label group inside the store.
    """
    if image not in col.names:
        raise InputError(f"store {col.url} has no tomogram {image!r}.")
    if "/" in name or not name:
        raise InputError(f"invalid label name {name!r}.")
    tomo = col[image]
    if tuple(data.shape) != tuple(tomo.shape):
        raise InputError(f"labels of shape {tuple(data.shape)} do not match tomogram {image!r} {tuple(tomo.shape)}.")
    if not np.issubdtype(data.dtype, np.integer):
        raise InputError(f"label data must be integers, got {data.dtype}.")
    path = f"tomograms/{image}/{LABELS}/{name}"
    srcs = {f"tomograms/{image}": col.source_token(f"tomograms/{image}"), **dict(sources or {})}
    levels = tomo.levels
    with col.stage_output(path, dict(params or {}), srcs) as out:
        grp = out.begin()
        for level in levels:
            f = 2**level
            target = tomo.data(level)
            sub = data[::f, ::f, ::f][: target.shape[0], : target.shape[1], : target.shape[2]]
            write_dask(sub, grp, str(level), chunks=tuple(c[0] for c in target.chunks), dimension_names=AXES_ZYX)
        ome = multiscale_metadata(image, tomo.voxel_size, len(levels))
        ome["omero"] = _label_channel(name)  # napari: layer "<tomogram>: <colour map>"
        table = [{"label-value": int(v), "rgba": [int(c) for c in rgba]} for v, rgba in sorted((colors or {}).items())]
        ome["image-label"] = label_attrs(name, (1.0, 1.0, 1.0), colors=table or None,
                                         properties=[dict(p) for p in properties or []] or None)["image-label"]
        grp.attrs["ome"] = ome
        _register(col.zarr_group["tomograms"][image], name)
        out.finish(levels=len(levels))
    log.info("labels %s of %s written (%d levels)", name, image, len(levels))
    return path
