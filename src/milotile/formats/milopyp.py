"""MiLoPYP coordinate files.

Two layouts exist in MiLoPYP (``cet_pick``):

* the **coordinate TSV** ``image_name x_coord y_coord z_coord [score]`` with a header row (tabs or
  spaces), full-resolution voxels, columns looked up by name;
* **per-tomogram text files** ``<tomogram>.txt`` without a header, one point per line, three
  coordinates in a legacy column order (``xzy`` for ``test.py`` output and ``select_sublabels.py``,
  or ``xyz`` / ``zxy``) and an optional fourth ``score`` column.

MiLoPYP's ``generate_train_file.py`` globbed every ``*.txt`` of the folder, so it also parsed its own
outputs and the image lists. Here a folder is read file by file: when a collection is known only
files whose stem is a tomogram of the collection are read; otherwise files that are not pure
numeric tables (manifests, TSVs with a header, previous outputs) are skipped with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import (
    DEFAULT_CLASS,
    HEADED_FORMS,
    as_path,
    check_order,
    columns_to_xyz,
    concat_tables,
    make_table,
    safe_name,
    xyz_to_columns,
)

log = logging.getLogger(__name__)

TSV_COLUMNS = ("image_name", "x_coord", "y_coord", "z_coord")
#: Order MiLoPYP writes its per-tomogram outputs in (matches IMOD points of xzy-oriented files).
LEGACY_ORDER = "xzy"


def is_coordinate_tsv(path: str | os.PathLike) -> bool:
    """True when the first non-empty line of ``path`` is a MiLoPYP coordinate TSV header."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.strip():
                    words = line.split()
                    return "image_name" in words and "x_coord" in words
    except OSError:
        return False
    return False


def read_coordinate_tsv(path: str | os.PathLike, class_name: str | None = None) -> pd.DataFrame:
    """Read a MiLoPYP coordinate TSV (``image_name x_coord y_coord z_coord [score]``).

    Parameters
    ----------
    path : path-like
        The TSV file; tab or space separated, with a header row.
    class_name : str, optional
        Class written into the ``class`` column (default ``"particle"``).

    Returns
    -------
    pandas.DataFrame
        Columns ``tomogram, x, y, z, class`` (+ ``score`` when the file has one).
    """
    path = as_path(path)
    df = pd.read_csv(path, sep=r"\s+", engine="python", dtype={"image_name": str})
    missing = [c for c in TSV_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"Coordinate file {path} lacks the column(s) {', '.join(missing)}.")
    xyz = np.empty((len(df), 3))
    for i, c in enumerate(("x_coord", "y_coord", "z_coord")):
        vals = pd.to_numeric(df[c], errors="coerce")
        bad = np.flatnonzero(vals.isna().to_numpy())
        if len(bad):
            raise InputError(
                f"Coordinate file {path} line {bad[0] + 2}: {c} value {df[c].iloc[bad[0]]!r} is not a number."
            )
        xyz[:, i] = vals.to_numpy(dtype=np.float64)
    score = pd.to_numeric(df["score"], errors="coerce") if "score" in df.columns else None
    return make_table(df["image_name"].astype(str), xyz, class_name or DEFAULT_CLASS, score)


def _parse_numeric(path: Path) -> np.ndarray | None:
    """Parse a headerless whitespace table; ``None`` when it is not one (header, manifest...)."""
    rows: list[list[float]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            words = s.replace(",", " ").split()
            try:
                vals = [float(w) for w in words]
            except ValueError:
                if not rows:
                    return None  # a header or a text manifest: not a coordinate file
                raise InputError(f"Coordinate file {path} line {lineno}: {s!r} is not numeric.") from None
            if len(vals) not in (3, 4):
                raise InputError(
                    f"Coordinate file {path} line {lineno} has {len(vals)} columns; expected 3 coordinates "
                    "and an optional score."
                )
            if rows and len(vals) != len(rows[0]):
                raise InputError(
                    f"Coordinate file {path} line {lineno} has {len(vals)} columns while earlier lines have "
                    f"{len(rows[0])}."
                )
            rows.append(vals)
    if not rows:
        return np.zeros((0, 3))
    return np.asarray(rows, dtype=np.float64)


def read_coordinate_txt(
    path: str | os.PathLike,
    order: str | None,
    tomogram: str | None = None,
    class_name: str | None = None,
) -> pd.DataFrame:
    """Read one headerless per-tomogram coordinate file.

    Parameters
    ----------
    path : path-like
        Text file with 3 coordinate columns in ``order`` and an optional score column.
    order : {"xyz", "xzy", "zxy", "yxz"}
        Which coordinate each column holds (MiLoPYP outputs are ``"xzy"``).
    tomogram : str, optional
        Tomogram name; default the file stem.
    class_name : str, optional
        Class written into the ``class`` column.

    Returns
    -------
    pandas.DataFrame
        Standard label table.
    """
    path = as_path(path)
    arr = _parse_numeric(path)
    if arr is None:
        raise InputError(
            f"Coordinate file {path} starts with a header naming no known columns; expected {HEADED_FORMS}, "
            "or headerless numeric columns x y z [score] with --order."
        )
    order = check_order(order, f"Coordinate file {path}")
    xyz = columns_to_xyz(arr[:, :3], order) if len(arr) else np.zeros((0, 3))
    score = arr[:, 3] if arr.shape[1] == 4 else None
    return make_table(tomogram or path.stem, xyz, class_name or DEFAULT_CLASS, score)


def read_coordinate_folder(
    folder: str | os.PathLike,
    order: str | None,
    names: set[str] | None = None,
    class_name: str | None = None,
) -> pd.DataFrame:
    """Read a folder of per-tomogram ``<tomogram>.txt`` coordinate files.

    Parameters
    ----------
    folder : path-like
        Folder holding ``<tomogram>.txt`` files (``.coords`` also accepted).
    order : str
        Column order of the files.
    names : set of str, optional
        Tomogram names of the collection; when given only files with one of these stems are read.
    class_name : str, optional
        Class written into the ``class`` column.

    Returns
    -------
    pandas.DataFrame
        Standard label table, one row per point of every file read.
    """
    folder = as_path(folder)
    order = check_order(order, f"Coordinate folder {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".coords"))
    tables = []
    for p in files:
        if names is not None and p.stem not in names:
            log.info("skipping %s: %r is not a tomogram of the collection", p, p.stem)
            continue
        arr = _parse_numeric(p)
        if arr is None:
            log.warning("skipping %s: not a headerless coordinate table (manifest or TSV?)", p)
            continue
        xyz = columns_to_xyz(arr[:, :3], order) if len(arr) else np.zeros((0, 3))
        tables.append(make_table(p.stem, xyz, class_name or DEFAULT_CLASS, arr[:, 3] if arr.shape[1] == 4 else None))
    if not tables:
        raise InputError(f"Coordinate folder {folder} holds no per-tomogram coordinate files to read.")
    return concat_tables(tables)


def write_milopyp(
    picks: pd.DataFrame,
    out: str | os.PathLike,
    *,
    order: str = LEGACY_ORDER,
    with_score: bool = True,
    decimals: int | None = None,
) -> list[Path]:
    """Write one headerless ``<tomogram>.txt`` per tomogram, tab separated, MiLoPYP's layout.

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks with ``tomogram, x, y, z`` (voxels) and optional ``score``.
    out : path-like
        Output folder (created).
    order : str
        Column order; MiLoPYP's legacy ``"xzy"`` by default (``x z y [score]``).
    with_score : bool
        Append the score column when the table has one.
    decimals : int, optional
        Round coordinates to this many decimals (``0`` gives integers like MiLoPYP).

    Returns
    -------
    list of Path
        The files written.
    """
    order = check_order(order, "MiLoPYP export")
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, g in picks.groupby("tomogram", sort=True):
        xyz = g[["x", "y", "z"]].to_numpy(dtype=np.float64)
        if decimals is not None:
            xyz = np.round(xyz, decimals)
        cols = xyz_to_columns(xyz, order)
        fmt = ["%d" if decimals == 0 else "%.3f"] * 3
        if with_score and "score" in g.columns:
            cols = np.column_stack([cols, g["score"].to_numpy(dtype=np.float64)])
            fmt.append("%.6f")
        path = out / f"{safe_name(str(name))}.txt"
        np.savetxt(path, cols, fmt=fmt, delimiter="\t")
        written.append(path)
    log.info("wrote %d MiLoPYP coordinate files to %s", len(written), out)
    return written


def write_coordinate_tsv(labels: pd.DataFrame, out: str | os.PathLike, *, decimals: int = 0) -> Path:
    """Write MiLoPYP's coordinate TSV ``image_name x_coord y_coord z_coord`` (header, tab separated).

    Parameters
    ----------
    labels : pandas.DataFrame
        ``tomogram, x, y, z`` in full-resolution voxels.
    out : path-like
        The ``.tsv``/``.txt`` file to write (its folder is created).
    decimals : int
        Decimals of the coordinates (``0``: integers, as MiLoPYP's refinement reads them).

    Returns
    -------
    Path
        The file written.
    """
    out = as_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    xyz = np.round(labels[["x", "y", "z"]].to_numpy(dtype=np.float64), decimals)
    df = pd.DataFrame({"image_name": labels["tomogram"].astype(str).to_numpy()})
    for i, c in enumerate(("x_coord", "y_coord", "z_coord")):
        df[c] = xyz[:, i].astype(np.int64) if decimals == 0 else xyz[:, i]
    df.to_csv(out, sep="\t", index=False)
    log.info("wrote %d coordinates to %s", len(df), out)
    return out
