"""IMOD ``.mod`` models (read and written with :mod:`imodmodel`).

Pixel convention (IMOD's, applied symmetrically on import and export)
----------------------------------------------------------------------
IMOD model coordinates are continuous image coordinates in which pixel ``i`` of X and Y covers
``[i, i + 1)``: the centre of the first pixel is at ``(0.5, 0.5)``. Z is the section number and a
section is centred on its integer value (``remapmodel``'s man page: Z values are converted "to the
nearest integer" section, so section 5 holds Z from 4.5 to 5.5). The MIB documentation states the
same mapping: the voxel with 1-based indices ``(1, 1, 1)`` is the model point ``(0.5, 0.5, 0.0)``.
milotile puts voxel centres at integers on every axis, so::

    model_x = x + 0.5      model_y = y + 0.5      model_z = z        (export)
    x = model_x - 0.5      y = model_y - 0.5      z = model_z        (import)

where ``x, y, z`` are the model's own (image-file) axes. A pick at voxel ``(10, 20, 5)`` is written
as ``(10.5, 20.5, 5)`` and 3dmod draws it in the middle of that voxel; reading the file gives back
``(10, 20, 5)`` exactly. (MiLoPYP wrote plain voxel indices, which 3dmod shows half a pixel up and
left of the voxel centre; pass ``pixel_centre=False`` to read or write that legacy form.)

Axis order: when the model belongs to the file as ingested (``zxy``/"rotated" tomograms, most
non-IMOD software) the default ``order="xyz"`` is right. For an *unrotated* IMOD tomogram
(``xzy``: the file's y axis is the thickness and its sections run along the specimen y), pass
``order="xzy"``: the model's second coordinate is then milotile's z and its third milotile's y.
The half-pixel shift always applies to the model's first two (image) axes.

Point size: each object stores the particle radius (pixels) as its scattered-point size
(``pdrawsize``), so 3dmod draws every pick as a sphere of the particle's size.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import (
    DEFAULT_CLASS,
    as_path,
    check_order,
    columns_to_xyz,
    concat_tables,
    make_table,
    safe_name,
    xyz_to_columns,
)

log = logging.getLogger(__name__)

#: Added to the model's image X and Y coordinates on export (subtracted on import).
PIXEL_CENTRE = np.array([0.5, 0.5, 0.0])


def read_imod(
    path: str | os.PathLike,
    *,
    order: str | None = None,
    tomogram: str | None = None,
    class_name: str | None = None,
    pixel_centre: bool = True,
) -> pd.DataFrame:
    """Read the points of an IMOD model.

    Parameters
    ----------
    path : path-like
        ``.mod`` file.
    order : str, optional
        Meaning of the model's (x, y, z) point coordinates; ``"xyz"`` (default) or ``"xzy"`` for
        unrotated IMOD tomograms (see the module notes).
    tomogram : str, optional
        Tomogram name; default the file stem.
    class_name : str, optional
        Class for every point. By default each object's name, or ``"particle"`` for a single
        unnamed object and ``"object<N>"`` (1-based like IMOD) when there are several.
    pixel_centre : bool
        Apply IMOD's pixel convention (subtract 0.5 from the model's X and Y; see the module
        notes). ``False`` reads legacy files that hold plain voxel indices.

    Returns
    -------
    pandas.DataFrame
        Standard label table.
    """
    from imodmodel.models import ImodModel

    path = as_path(path)
    order = check_order(order or "xyz", f"IMOD model {path}")
    try:
        model = ImodModel.from_file(path)
    except Exception as exc:  # imodmodel raises assorted parse errors
        raise InputError(f"IMOD model {path} could not be read ({exc}).") from exc
    tables = []
    n_obj = len(model.objects)
    for i, obj in enumerate(model.objects):
        name = (obj.header.name or "").strip()
        if class_name:
            cls = class_name
        elif name:
            cls = name
        else:
            cls = DEFAULT_CLASS if n_obj == 1 else f"object{i + 1}"
        for contour in obj.contours:
            pts = np.asarray(contour.points, dtype=np.float64).reshape(-1, 3)
            if pixel_centre:
                pts = pts - PIXEL_CENTRE
            if len(pts):
                tables.append(make_table(tomogram or path.stem, columns_to_xyz(pts, order), cls))
    return concat_tables(tables)


def write_imod(
    picks: pd.DataFrame,
    out: str | os.PathLike,
    *,
    order: str = "xyz",
    per_tomogram: bool | None = None,
    shapes: dict[str, tuple[int, int, int]] | None = None,
    voxel_sizes: dict[str, float] | None = None,
    radius: float | dict[str, float] | None = None,
    pixel_centre: bool = True,
) -> list[Path]:
    """Write picks as IMOD scattered-point models, one object per class.

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks with ``tomogram, x, y, z`` and optional ``class``.
    out : path-like
        A folder (one ``<tomogram>.mod`` per tomogram) or, for a single tomogram, a ``.mod`` path.
    order : str
        Column order of the model points (``"xyz"`` or ``"xzy"``; see the module notes).
    per_tomogram : bool, optional
        Force the folder layout; default: folder unless ``out`` ends in ``.mod``.
    shapes, voxel_sizes : dict, optional
        Per-tomogram ``(Z, Y, X)`` shape and voxel size written into the model header.
    radius : float or dict, optional
        Particle radius in voxels (one number, or per class), written as each object's point size
        so 3dmod draws spheres of the particle's size; default the ``radius`` column when the
        picks have one, else 3 voxels.
    pixel_centre : bool
        Apply IMOD's pixel convention (add 0.5 to the model's X and Y; see the module notes).

    Returns
    -------
    list of Path
        The files written.
    """
    from imodmodel.models import ContourType, ImodModel

    order = check_order(order, "IMOD export")
    out = as_path(out)
    names = sorted(picks["tomogram"].astype(str).unique())
    if per_tomogram is None:
        per_tomogram = out.suffix.lower() != ".mod"
    if not per_tomogram and len(names) > 1:
        raise InputError(
            f"IMOD output {out} is a single .mod file but the picks cover {len(names)} tomograms; "
            "give a folder instead."
        )
    if per_tomogram:
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    classes = sorted(picks["class"].astype(str).unique()) if "class" in picks.columns else [DEFAULT_CLASS]
    written = []
    for name in names:
        g = picks[picks["tomogram"].astype(str) == name]
        frames = []
        for oid, cls in enumerate(classes):
            sel = g if "class" not in g.columns else g[g["class"].astype(str) == cls]
            if not len(sel):
                continue
            pts = xyz_to_columns(sel[["x", "y", "z"]].to_numpy(dtype=np.float64), order)
            if pixel_centre:
                pts = pts + PIXEL_CENTRE
            frames.append(
                pd.DataFrame({"object_id": oid, "contour_id": 0, "x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2]})
            )
        df = pd.concat(frames, ignore_index=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydantic deprecation warnings inside imodmodel
            model = ImodModel.from_dataframe(df, type=ContourType.SCATTERED)
            present = [c for c in classes if (g["class"].astype(str) == c).any()] if "class" in g.columns else classes
            for obj, cls in zip(model.objects, present, strict=True):
                obj.header.name = cls[:63]
                obj.header.pdrawsize = max(1, int(round(_radius_for(cls, g, radius))))
            if shapes and name in shapes:
                z, y, x = (int(v) for v in shapes[name])
                dims = xyz_to_columns(np.array([[x, y, z]], dtype=np.float64), order)[0]
                model.header.xmax, model.header.ymax, model.header.zmax = (int(v) for v in dims)
            if voxel_sizes and name in voxel_sizes:
                model.header.pixelsize = float(voxel_sizes[name])
                model.header.units = -10  # IMOD unit code for Angstrom
            path = out / f"{safe_name(name)}.mod" if per_tomogram else out
            model.to_file(path)
        written.append(path)
    log.info("wrote %d IMOD model(s) to %s", len(written), out)
    return written


def _radius_for(cls: str, picks: pd.DataFrame, radius: float | dict[str, float] | None) -> float:
    """Point size (voxels) of class ``cls``: the given radius, the ``radius`` column, or 3."""
    if isinstance(radius, dict):
        if cls in radius:
            return float(radius[cls])
    elif radius is not None:
        return float(radius)
    if "radius" in picks.columns:
        sel = picks[picks["class"].astype(str) == cls] if "class" in picks.columns else picks
        vals = sel["radius"].to_numpy(dtype=np.float64)
        if len(vals) and np.isfinite(vals).any():
            return float(np.nanmedian(vals))
    return 3.0
