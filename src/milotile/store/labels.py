"""OME-NGFF 0.5 label images under an image group: ``<image>/labels/<name>/0`` with ``image-label``.

The labels group lists its label images (``{"ome": {"labels": [...]}}``); each label image is a
one-level multiscale integer array with the image's scale, an ``image-label`` block with a colour
table (``colors``: ``label-value`` → ``rgba``), optional per-value ``properties`` and
``source.image`` pointing back at the image. Readers: ``ome_zarr.reader`` and napari-ome-zarr.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import zarr

from milotile.store.arrays import AXES_ZYX, NGFF_VERSION, create_array, write_dask

log = logging.getLogger(__name__)

__all__ = ["create_labels", "write_labels", "label_attrs", "label_colors", "LABELS"]

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
    lab.attrs["ome"] = label_attrs(name, scale, colors=colors, properties=properties, unit=unit)
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
