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
  the centred Å coordinates and, for convenience of older tools, ``rlnCoordinateX/Y/Z`` in voxels,
  plus a RELION-5 ``tomograms.star`` (``data_global``) beside it: per tomogram ``rlnTomoSizeX/Y/Z``
  (voxels), ``rlnTomoTiltSeriesPixelSize`` = voxel size (Å), ``rlnTomoTomogramBinning`` 1 and the
  optics defaults (300 kV, Cs 2.7 mm, amplitude contrast 0.1, hand -1; options to change them).
  With binning 1 RELION's centre ``rlnTomoSizeX / 2 * rlnTomoTiltSeriesPixelSize`` Å is the same
  point as milotile's ``X / 2`` voxels, so the particles map back to the same voxels.
* Reading centred coordinates without a collection uses a ``tomograms.star`` beside the particles
  (sizes and pixel size): ``x = (x_centred_A + SizeX / 2 * ts_pixel) / (ts_pixel * binning)``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import (
    DEFAULT_CLASS,
    TomoInfo,
    as_path,
    concat_tables,
    make_table,
    output_file,
)

log = logging.getLogger(__name__)

_CENTRED = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
_PLAIN = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
#: Name of the RELION-5 tomogram set written beside exported particles.
TOMOGRAMS_STAR = "tomograms.star"
_OPTICS_DEFAULTS = {"voltage": 300.0, "cs": 2.7, "amplitude_contrast": 0.1, "hand": -1.0}


def tomograms_star_info(path: str | os.PathLike) -> dict[str, TomoInfo]:
    """Tomogram sizes and voxel sizes from a RELION-5 ``tomograms.star`` (``data_global``).

    Returns
    -------
    dict
        ``{rlnTomoName: TomoInfo(shape=(Z, Y, X) voxels, voxel_size=Å)}``; sizes are divided by
        ``rlnTomoTomogramBinning`` (RELION stores unbinned sizes).
    """
    import starfile

    path = as_path(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:
        raise InputError(f"tomograms STAR file {path} could not be read ({exc}).") from exc
    df = blocks.get("global")
    if not isinstance(df, pd.DataFrame):
        df = next((b for b in blocks.values() if isinstance(b, pd.DataFrame) and "rlnTomoSizeX" in b), None)
    need = ("rlnTomoName", "rlnTomoSizeX", "rlnTomoSizeY", "rlnTomoSizeZ", "rlnTomoTiltSeriesPixelSize")
    if df is None or any(c not in df.columns for c in need):
        raise InputError(f"tomograms STAR file {path} lacks one of {', '.join(need)}.")
    out = {}
    for _, r in df.iterrows():
        binning = float(r["rlnTomoTomogramBinning"]) if "rlnTomoTomogramBinning" in df.columns else 1.0
        px = float(r["rlnTomoTiltSeriesPixelSize"])
        shape = tuple(float(r[f"rlnTomoSize{a}"]) / binning for a in "ZYX")
        name = str(r["rlnTomoName"])
        out[name] = TomoInfo(name=name, shape=shape, voxel_size=px * binning)  # type: ignore[arg-type]
    return out


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
        beside = path.parent / TOMOGRAMS_STAR
        if beside.exists() and beside != path:
            info = {**tomograms_star_info(beside), **(info or {})}
        if not info:
            raise InputError(
                f"STAR file {path} holds RELION-5 centred coordinates; give the collection (--store) or a "
                f"{TOMOGRAMS_STAR} beside it so the tomogram size and voxel size are known."
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
    tomograms_star: bool = True,
    **optics: float,
) -> list[Path]:
    """Write a RELION-5 tomography particle STAR file (and ``tomograms.star`` beside it).

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks with ``tomogram, x, y, z`` (voxels).
    out : path-like
        Output ``.star`` file.
    info : dict
        Collection geometry for every tomogram in ``picks`` (size and voxel size).
    voxel_sizes : dict, optional
        Voxel size per tomogram (Å) when it differs from ``info``.
    tomograms_star : bool
        Also write ``tomograms.star`` (RELION-5 tomogram set) in the same folder.
    **optics : float
        ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast``, ``hand`` for ``tomograms.star``.

    Returns
    -------
    list of Path
        The files written (particles first).
    """
    import starfile

    out = output_file(out, ".star", "particles.star")
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
    written = [out]
    if tomograms_star:
        written.append(_write_tomograms_star(out.parent / TOMOGRAMS_STAR, sorted(set(names)), info, voxel_sizes, optics))
    return written


def _write_tomograms_star(path: Path, names: list[str], info: dict[str, TomoInfo],
                          voxel_sizes: dict[str, float] | None, optics: dict[str, float]) -> Path:
    """RELION-5 ``data_global`` tomogram table: sizes in voxels at binning 1, pixel size in Å."""
    import starfile

    unknown = sorted(set(optics) - set(_OPTICS_DEFAULTS))
    if unknown:
        raise InputError(f"unknown STAR export option(s) {', '.join(unknown)}; known: {', '.join(_OPTICS_DEFAULTS)}.")
    o = {**_OPTICS_DEFAULTS, **{k: float(v) for k, v in optics.items()}}
    rows = []
    for name in names:
        t = info[name]
        vs = float((voxel_sizes or {}).get(name, t.voxel_size))
        z, y, x = (int(v) for v in t.shape)
        rows.append({
            "rlnTomoName": name, "rlnVoltage": o["voltage"], "rlnSphericalAberration": o["cs"],
            "rlnAmplitudeContrast": o["amplitude_contrast"], "rlnMicrographOriginalPixelSize": vs,
            "rlnTomoHand": o["hand"], "rlnTomoTiltSeriesPixelSize": vs, "rlnTomoTomogramBinning": 1.0,
            "rlnTomoSizeX": x, "rlnTomoSizeY": y, "rlnTomoSizeZ": z,
        })
    starfile.write({"global": pd.DataFrame(rows)}, path, overwrite=True)
    log.info("wrote %d tomograms to %s", len(rows), path)
    return path
