"""OME-NGFF 0.5 *labels* images under a tomogram (``tomograms/<name>/labels/<label>``).

One writer for every label image milotile makes (the atlas's 3D colour map, segmentations...):
the labels group lists its members (``"labels": [...]``), each label image is a multiscale with
the tomogram's axes, scales and chunks, and carries the ``image-label`` metadata (colour table,
``source.image = "../../"``), so napari and ome-zarr readers overlay it on the tomogram.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np

from milotile.errors import InputError
from milotile.store.arrays import AXES_ZYX, NGFF_VERSION, multiscale_metadata, write_dask

log = logging.getLogger(__name__)

__all__ = ["write_labels", "label_names"]

LABELS = "labels"


def label_names(col: Any, image: str) -> list[str]:
    """Label images listed under tomogram ``image``."""
    g = col.zarr_group["tomograms"][image]
    if LABELS not in g:
        return []
    return list(dict(g[LABELS].attrs.get("ome", {})).get("labels", []))


def write_labels(
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
    """Write an integer label volume as an NGFF labels image of tomogram ``image``.

    Parameters
    ----------
    col : Collection
        The store.
    image : str
        Tomogram name; the labels must have its level-0 shape.
    name : str
        Label image name (``tomograms/<image>/labels/<name>``).
    data : dask.array.Array
        ``(z, y, x)`` unsigned integers, 0 = background. Written chunk by chunk with the
        tomogram's chunking; lower levels are nearest-neighbour subsamples matching the image pyramid.
    colors : mapping, optional
        ``{label value: (r, g, b, a)}`` 0–255, written as the ``image-label`` colour table.
    properties : sequence of mapping, optional
        ``image-label`` properties (each with ``"label-value"``).
    params : mapping, optional
        The parameters that made the labels (``attrs["milotile"]["params"]``).
    sources : mapping, optional
        Inputs besides the tomogram (``{store path: token}``, e.g. the atlas table), see
        :mod:`milotile.store.stage_output`; the output is written through ``col.stage_output``.

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
    lg = col.zarr_group["tomograms"][image].require_group(LABELS)
    names = [n for n in dict(lg.attrs.get("ome", {})).get("labels", []) if n != name]
    levels = tomo.levels
    with col.stage_output(path, dict(params or {}), srcs) as out:
        grp = out.begin()
        for level in levels:
            f = 2**level
            target = tomo.data(level)
            sub = data[::f, ::f, ::f][: target.shape[0], : target.shape[1], : target.shape[2]]
            write_dask(sub, grp, str(level), chunks=tuple(c[0] for c in target.chunks), dimension_names=AXES_ZYX)
        ome = multiscale_metadata(name, tomo.voxel_size, len(levels))
        label_meta: dict[str, Any] = {"version": NGFF_VERSION, "source": {"image": "../../"}}
        if colors:
            label_meta["colors"] = [
                {"label-value": int(v), "rgba": [int(c) for c in rgba]} for v, rgba in sorted(colors.items())
            ]
        if properties:
            label_meta["properties"] = [dict(p) for p in properties]
        ome["image-label"] = label_meta
        grp.attrs["ome"] = ome
        lg.attrs["ome"] = {"version": NGFF_VERSION, "labels": names + [name]}
        out.finish(levels=len(levels))
    log.info("labels %s of %s written (%d levels)", name, image, len(levels))
    return path
