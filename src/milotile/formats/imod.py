"""IMOD ``.mod`` models (read and written with :mod:`imodmodel`).

Coordinate assumption
---------------------
An IMOD model point is ``(x, y, z)`` in the index coordinates of the image file the model was
drawn on (x = fastest axis, z = section). milotile takes these as voxel positions with voxel
centres at integer values, exactly like MiLoPYP (which writes integer voxel indices and converts
them with ``point2model``). When the model belongs to the file as ingested (``zxy``/"rotated"
tomograms, most non-IMOD software) the default ``order="xyz"`` is right. For an *unrotated* IMOD
tomogram (``xzy``: the file's y axis is the thickness and its sections run along the specimen y),
pass ``order="xzy"``: the model's second coordinate is then milotile's z and its third milotile's y.
Exports use the same rule, so the file overlays the tomogram it was written for in 3dmod.
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


def read_imod(
    path: str | os.PathLike,
    *,
    order: str | None = None,
    tomogram: str | None = None,
    class_name: str | None = None,
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
