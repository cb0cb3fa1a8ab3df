"""RELION STAR particle files (read and written with :mod:`starfile`).

Conventions
-----------
* ``rlnCoordinateX/Y/Z`` are read as voxel positions in the tomogram (voxel centres at integers,
  RELION 3/4 style; pass ``voxel_size`` if they refer to another pixel size).
* RELION-5 ``rlnCenteredCoordinateX/Y/ZAngst`` are Å from the **tomogram centre**, which RELION
  places at ``size / 2`` voxels on each axis (the C++ ``Tomogram`` centre, not ``(size - 1) / 2``)::

      x_centered_A = (x - X / 2) * voxel_size        x = x_centered_A / voxel_size + X / 2

  Converting needs the tomogram size and voxel size, taken from the collection.
* The tomogram is ``rlnTomoName`` or, failing that, ``rlnMicrographName`` without folder and
  extension.
* Exports write the RELION-5 tomography particle block (``data_particles``) with ``rlnTomoName``,
  the centred Å coordinates and, for convenience of older tools, ``rlnCoordinateX/Y/Z`` in voxels.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import DEFAULT_CLASS, TomoInfo, as_path, concat_tables, make_table

log = logging.getLogger(__name__)

_CENTRED = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
_PLAIN = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")


def _tomo_from_micrograph(value: str) -> str:
    name = Path(str(value).split(":")[0]).name
    return re.sub(r"(\.tomostar|\.mrc|\.rec|\.st|\.mrcs|\.zarr)+$", "", name)


def _particle_block(blocks: dict[str, pd.DataFrame], path: Path) -> pd.DataFrame:
    for key in ("particles", *blocks.keys()):
        df = blocks.get(key)
        if isinstance(df, pd.DataFrame) and (
            all(c in df.columns for c in _CENTRED) or all(c in df.columns for c in _PLAIN)
        ):
            return df
    raise InputError(
        f"STAR file {path} has no block with rlnCoordinateX/Y/Z or rlnCenteredCoordinateX/Y/ZAngst columns."
    )


def read_star(
    path: str | os.PathLike,
    info: dict[str, TomoInfo] | None = None,
    *,
    tomogram: str | None = None,
    class_name: str | None = None,
) -> pd.DataFrame:
    """Read particle positions from a RELION STAR file.

    Parameters
    ----------
    path : path-like
        STAR file.
    info : dict, optional
        Collection geometry (name -> :class:`TomoInfo`); required for RELION-5 centred coordinates.
    tomogram : str, optional
        Tomogram name when the file names none.
    class_name : str, optional
        Class for every row (default ``"particle"``).

    Returns
    -------
    pandas.DataFrame
        Standard label table in voxels.
    """
    import starfile

    path = as_path(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise InputError(f"STAR file {path} could not be read ({exc}).") from exc
    df = _particle_block(blocks, path)
    if "rlnTomoName" in df.columns:
        names = df["rlnTomoName"].astype(str).map(lambda s: re.sub(r"\.tomostar$", "", s))
    elif "rlnMicrographName" in df.columns:
        names = df["rlnMicrographName"].astype(str).map(_tomo_from_micrograph)
    elif tomogram:
        names = pd.Series([tomogram] * len(df))
    else:
        names = pd.Series([path.stem] * len(df))
    names = names.to_numpy()
    cls = class_name or DEFAULT_CLASS
    score = df["rlnAutopickFigureOfMerit"].to_numpy(dtype=np.float64) if "rlnAutopickFigureOfMerit" in df else None
    if all(c in df.columns for c in _CENTRED):
        if not info:
            raise InputError(
                f"STAR file {path} holds RELION-5 centred coordinates; give the collection (--store) so the "
                "tomogram size and voxel size are known."
            )
        xyz_a = df[list(_CENTRED)].to_numpy(dtype=np.float64)
        xyz = np.empty_like(xyz_a)
        for i, name in enumerate(names):
            t = info.get(str(name))
            if t is None:
                raise InputError(f"STAR file {path} names tomogram {name!r}, which is not in the collection.")
            z, y, x = t.shape
            xyz[i] = xyz_a[i] / t.voxel_size + np.array([x, y, z], dtype=np.float64) / 2.0
        return concat_tables([make_table(names, xyz, cls, score)])
    xyz = df[list(_PLAIN)].to_numpy(dtype=np.float64)
    return concat_tables([make_table(names, xyz, cls, score)])


def write_star(
    picks: pd.DataFrame,
    out: str | os.PathLike,
    info: dict[str, TomoInfo],
    *,
    voxel_sizes: dict[str, float] | None = None,
) -> list[Path]:
    """Write a RELION-5 tomography particle STAR file.

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks with ``tomogram, x, y, z`` (voxels).
    out : path-like
        Output ``.star`` file.
    info : dict
        Collection geometry for every tomogram in ``picks`` (size and voxel size).
    voxel_sizes : dict, optional
        Unused override hook (voxel size per tomogram); default from ``info``.

    Returns
    -------
    list of Path
        The file written.
    """
    import starfile

    out = as_path(out)
    if out.suffix.lower() != ".star":
        out = out / "particles.star" if out.is_dir() or not out.suffix else out.with_suffix(".star")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = picks["tomogram"].astype(str).to_numpy()
    missing = sorted(set(names) - set(info))
    if missing:
        raise InputError(
            f"STAR export needs the size and voxel size of tomogram {missing[0]!r}; give the collection (--store)."
        )
    xyz = picks[["x", "y", "z"]].to_numpy(dtype=np.float64)
    centred = np.empty_like(xyz)
    for i, name in enumerate(names):
        t = info[name]
        vs = (voxel_sizes or {}).get(name, t.voxel_size)
        z, y, x = t.shape
        centred[i] = (xyz[i] - np.array([x, y, z], dtype=np.float64) / 2.0) * vs
    particles = pd.DataFrame(
        {
            "rlnTomoName": names,
            "rlnCenteredCoordinateXAngst": centred[:, 0],
            "rlnCenteredCoordinateYAngst": centred[:, 1],
            "rlnCenteredCoordinateZAngst": centred[:, 2],
            "rlnCoordinateX": xyz[:, 0],
            "rlnCoordinateY": xyz[:, 1],
            "rlnCoordinateZ": xyz[:, 2],
        }
    )
    if "score" in picks.columns:
        particles["rlnAutopickFigureOfMerit"] = picks["score"].to_numpy(dtype=np.float64)
    starfile.write({"particles": particles}, out, overwrite=True)
    log.info("wrote %d particles to %s", len(particles), out)
    return [out]
