"""Coordinate import and export.

Inside milotile a position is ``(x, y, z)`` in voxels of the level-0 tomogram (x = last array
axis, voxel centres at integers) plus the same in Å. Legacy orders, Å units, centred coordinates
and per-file layouts exist only here.

Reading: :func:`read_labels` detects the layout of a path and returns a table
``tomogram, x, y, z, class`` (+ ``score`` when the source has one); :func:`validate_labels`
checks it against a collection. Writing: :func:`export`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import (
    DEFAULT_CLASS,
    LABEL_COLUMNS,
    ORDERS,
    TomoInfo,
    as_path,
    collection_info,
    concat_tables,
    headed_columns,
    open_collection,
    rescale,
)
from milotile.formats.copick import read_copick, validate_picks_json, write_copick
from milotile.formats.imod import read_imod, write_imod
from milotile.formats.milopyp import (
    is_coordinate_tsv,
    read_coordinate_folder,
    read_coordinate_tsv,
    read_coordinate_txt,
    write_milopyp,
)
from milotile.formats.ndjson import read_ndjson, write_ndjson
from milotile.formats.star import read_star, write_star
from milotile.formats.tables import read_table, table_to_labels, write_csv
from milotile.formats.validate import validate_labels

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CLASS",
    "EXPORT_FORMATS",
    "LABEL_COLUMNS",
    "ORDERS",
    "detect_format",
    "export",
    "read_labels",
    "table_to_labels",
    "validate_labels",
    "validate_picks_json",
]

#: Formats :func:`export` writes.
EXPORT_FORMATS = ("milopyp", "imod", "star", "copick", "ndjson", "csv")
#: Formats :func:`read_labels` reads (``fmt=`` overrides detection).
READ_FORMATS = ("table", "tsv", "txt", "txt-folder", "imod", "star", "copick", "ndjson")
#: Formats whose coordinates are voxels (``voxel_size`` rescales them to the collection grid).
_VOXEL_FORMATS = {"table", "tsv", "txt", "txt-folder", "imod", "ndjson", "star"}


def _first_words(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip() and not line.startswith("#"):
                    return line.replace(",", " ").replace(";", " ").split()
    except OSError:
        pass
    return []


def detect_format(path: str | os.PathLike) -> str:
    """Name the coordinate layout of ``path`` (one of ``READ_FORMATS``).

    Raises
    ------
    InputError
        When the path does not exist or matches no known layout.
    """
    path = as_path(path)
    if not path.exists():
        raise InputError(f"Label path {path} does not exist.")
    suffix = path.suffix.lower()
    if path.is_dir():
        if suffix in (".parquet", ".pq"):
            return "table"
        if (path / "copick_config.json").exists() or (path / "ExperimentRuns").is_dir():
            return "copick"
        if any(path.glob("*.ndjson")) or any(path.glob("*/*.ndjson")):
            return "ndjson"
        if any(path.glob("*.mod")):
            return "imod"
        if any(path.glob("*.star")):
            return "star"
        if any(path.glob("*.txt")) or any(path.glob("*.coords")):
            return "txt-folder"
        raise InputError(f"Label folder {path} holds no coordinate files (.txt, .mod, .star, .ndjson, copick).")
    if suffix in (".parquet", ".pq") or path.name.endswith(".parquet.gzip"):
        return "table"
    if suffix == ".star":
        return "star"
    if suffix == ".mod":
        return "imod"
    if suffix in (".ndjson", ".jsonl"):
        return "ndjson"
    if suffix == ".json":
        return "copick"
    if suffix == ".csv":
        return "table"
    if is_coordinate_tsv(path):
        return "tsv"
    if headed_columns(_first_words(path))[1] is not None:  # a header naming its coordinate columns
        return "table"
    return "txt"


#: Layouts whose column order is given by ``order`` / ``--order`` (all others name their columns).
ORDER_FORMATS = ("txt", "txt-folder", "imod")


def read_labels(
    path: str | os.PathLike,
    col: Any = None,
    *,
    order: str | None = None,
    tomogram: str | None = None,
    voxel_size: float | None = None,
    class_name: str | None = None,
    fmt: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    object_name: str | None = None,
) -> pd.DataFrame:
    """Read particle labels from any supported coordinate layout.

    Parameters
    ----------
    path : path-like
        One of: a milotile parquet/CSV table (``tomogram, x, y, z`` [``class``/``species``]) or
        MiLoPYP's selection parquet (``name``, ``coord``); a MiLoPYP coordinate TSV
        (``image_name x_coord y_coord z_coord``); a per-tomogram ``.txt`` file or a folder of them
        (``order`` required, file stem = tomogram); an IMOD ``.mod`` (or a folder of them); a RELION
        ``.star``; a copick project / config / picks JSON; a portal ``.ndjson`` (or folder).
    col : Collection or path, optional
        The collection the labels refer to. Needed for RELION-5 centred coordinates; gives the voxel
        size to convert copick Å; restricts a txt folder to files named after its tomograms.
    order : {"xyz", "xzy", "zxy", "yxz"}, optional
        Which coordinate each column holds, for bare txt files (required) and IMOD models
        (default ``"xyz"``; ``"xzy"`` for unrotated IMOD tomograms).
    tomogram : str, optional
        Tomogram name for single-tomogram files (txt, mod, ndjson); default the file stem.
    voxel_size : float, optional
        Voxel size (Å) of the grid the file's coordinates refer to. For voxel-unit files with a
        collection of another voxel size, coordinates are rescaled to the collection's grid; for Å
        files (copick) it converts Å to voxels when the collection does not know the run.
    class_name : str, optional
        Class for every label; default the file's object/species name, else ``"particle"``.
    fmt : str, optional
        Force a layout instead of detecting it (``READ_FORMATS``).
    user_id, session_id, object_name : str, optional
        copick filters.

    Returns
    -------
    pandas.DataFrame
        Columns ``tomogram`` (str), ``x, y, z`` (float voxels, level 0), ``class`` (str), and
        ``score`` when the source has scores.

    Raises
    ------
    InputError
        For a missing path, an unknown layout, or a malformed file (naming file and line).
    """
    path = as_path(path)
    fmt = fmt or detect_format(path)
    if fmt not in READ_FORMATS:
        raise InputError(f"Unknown label format {fmt!r}; expected one of {', '.join(READ_FORMATS)}.")
    info: dict[str, TomoInfo] = collection_info(col)
    names = set(info) if info else None
    if fmt == "table":
        df = read_table(path, class_name=class_name, tomogram=tomogram or (path.stem if path.is_file() else None))
    elif fmt == "tsv":
        df = read_coordinate_tsv(path, class_name)
    elif fmt == "txt":
        df = read_coordinate_txt(path, order, tomogram, class_name)
    elif fmt == "txt-folder":
        df = read_coordinate_folder(path, order, names, class_name)
    elif fmt == "imod":
        if path.is_dir():
            files = sorted(p for p in path.glob("*.mod") if names is None or p.stem in names)
            df = concat_tables([read_imod(p, order=order, class_name=class_name) for p in files])
        else:
            df = read_imod(path, order=order, tomogram=tomogram, class_name=class_name)
    elif fmt == "star":
        files = sorted(path.glob("*.star")) if path.is_dir() else [path]
        df = concat_tables([read_star(p, info, tomogram=tomogram, class_name=class_name) for p in files])
    elif fmt == "copick":
        df = read_copick(
            path, info, voxel_size=voxel_size, user_id=user_id, session_id=session_id, object_name=object_name
        )
        if class_name:
            df["class"] = class_name
    else:  # ndjson
        df = read_ndjson(path, tomogram=tomogram, class_name=class_name)
    centred_star = fmt == "star" and "rlnCenteredCoordinateXAngst" in _star_columns(path)
    if fmt in _VOXEL_FORMATS and voxel_size and info and not centred_star:
        factors = {n: float(voxel_size) / t.voxel_size for n, t in info.items()}
        df = rescale(df, factors)
    log.info("read %d labels (%s) from %s", len(df), fmt, path)
    df = df.reset_index(drop=True)
    df.attrs["order_applies"] = fmt in ORDER_FORMATS  # validate_labels only suggests --order where it is read
    return df


def _star_columns(path: Path) -> set[str]:
    files = sorted(path.glob("*.star")) if path.is_dir() else [path]
    cols: set[str] = set()
    for f in files:
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                cols |= {w.split()[0].lstrip("_") for w in fh if w.startswith("_rln")}
        except OSError:
            pass
    return cols


def export(
    picks: pd.DataFrame,
    fmt: str,
    out: str | os.PathLike,
    *,
    col: Any = None,
    **opts: Any,
) -> list[Path]:
    """Write picks in an external coordinate format.

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks table (``tomogram, x, y, z`` in level-0 voxels; optional ``class``, ``score``).
    fmt : {"milopyp", "imod", "star", "copick", "ndjson", "csv"}
        Output format:

        * ``milopyp`` — folder of headerless ``<tomogram>.txt`` with ``x z y [score]`` (legacy
          order; ``order=`` and ``with_score=`` options);
        * ``imod`` — ``<tomogram>.mod`` per tomogram in a folder (or one ``.mod`` path for one
          tomogram), one scattered-point object per class (``order=`` option);
        * ``star`` — RELION-5 tomography particles STAR (needs ``col``);
        * ``copick`` — a copick project: config, picks JSON in Å under
          ``ExperimentRuns/<run>/Picks/`` and, with ``col``, every tomogram as NGFF 0.4 / Zarr v2
          under ``ExperimentRuns/<run>/VoxelSpacing<s>/<tomo_type>.zarr`` (``user_id=``,
          ``session_id=``, ``object_name=``, ``tomo_type=``, ``overlay_root=``, ``radius=`` (Å);
          voxel size from ``col`` or ``voxel_size=``);
        * ``ndjson`` — portal point annotations in voxels, ``<out>/<tomogram>/<object>.ndjson``;
        * ``csv`` — the table as CSV.
    out : path-like
        Output folder or file.
    col : Collection or path, optional
        The collection (tomogram sizes and voxel sizes).
    **opts
        Format options listed above.

    Returns
    -------
    list of Path
        The files written.
    """
    fmt = str(fmt).lower()
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"Unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}.")
    missing = [c for c in ("tomogram", "x", "y", "z") if c not in picks.columns]
    if missing:
        raise InputError(f"Picks table lacks the column(s) {', '.join(missing)}.")
    info = collection_info(col)
    vs_opt = opts.pop("voxel_size", None)
    voxel_sizes = {n: float(vs_opt) for n in picks["tomogram"].astype(str).unique()} if vs_opt else None
    check_writable(out)
    if fmt == "copick":
        opts["col"] = open_collection(col)  # a copick project also gets the collection's tomograms
    try:
        return _export(picks, fmt, out, info, voxel_sizes, opts)
    except OSError as exc:
        raise InputError(f"cannot write the {fmt} export to {out}: {exc.strerror or exc}") from None


def check_writable(out: str | os.PathLike) -> None:
    """Refuse an output path that cannot be created (a file in the way, a read-only folder) before writing."""
    p = Path(out).expanduser().absolute()
    a = p
    while not a.exists() and a != a.parent:
        a = a.parent
    if a != p and not a.is_dir():
        raise InputError(f"cannot write to {out}: {a} is a file, not a folder")
    folder = a if a.is_dir() else a.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {out}: folder {folder} is not writable")


def _export(picks: pd.DataFrame, fmt: str, out: str | os.PathLike, info: dict, voxel_sizes: dict | None,
            opts: dict) -> list[Path]:
    """Dispatch to the writer of ``fmt``."""
    if fmt == "milopyp":
        return write_milopyp(picks, out, **opts)
    if fmt == "imod":
        return write_imod(
            picks,
            out,
            shapes={n: t.shape for n, t in info.items()},
            voxel_sizes=voxel_sizes or {n: t.voxel_size for n, t in info.items()},
            **opts,
        )
    if fmt == "star":
        return write_star(picks, out, info, voxel_sizes=voxel_sizes, **opts)
    if fmt == "copick":
        return write_copick(picks, out, info, voxel_sizes=voxel_sizes, **opts)
    if fmt == "ndjson":
        return write_ndjson(picks, out, **opts)
    return write_csv(picks, out)
