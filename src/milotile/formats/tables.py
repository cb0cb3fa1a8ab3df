"""milotile tables (parquet / CSV) and MiLoPYP's interactive-selection parquet."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import DEFAULT_CLASS, as_path, concat_tables, make_table

log = logging.getLogger(__name__)

#: Columns tried, in order, for the class of a row.
CLASS_COLUMNS = ("class", "species", "object_name", "label")


def _class_values(df: pd.DataFrame, class_name: str | None) -> list[str] | str:
    if class_name:
        return class_name
    for c in CLASS_COLUMNS:
        if c in df.columns:
            return df[c].astype(str).tolist()
    return DEFAULT_CLASS


def table_to_labels(df: pd.DataFrame, source: str, *, class_name: str | None = None) -> pd.DataFrame:
    """Turn a milotile / MiLoPYP table into a label table.

    Accepted layouts: ``tomogram, x, y, z`` (milotile picks, candidates, selections),
    ``image_name, x_coord, y_coord, z_coord`` (MiLoPYP TSV as CSV) and MiLoPYP's Phoenix parquet
    (``name`` and ``coord`` = ``[x, y, z]`` as strings).
    """
    score = df["score"] if "score" in df.columns else None
    if {"tomogram", "x", "y", "z"} <= set(df.columns):
        names, xyz = df["tomogram"].astype(str), df[["x", "y", "z"]]
    elif {"image_name", "x_coord", "y_coord", "z_coord"} <= set(df.columns):
        names, xyz = df["image_name"].astype(str), df[["x_coord", "y_coord", "z_coord"]]
    elif {"name", "coord"} <= set(df.columns):
        names = df["name"].astype(str)
        try:
            xyz = np.array([[float(v) for v in c] for c in df["coord"]], dtype=np.float64).reshape(-1, 3)
        except (TypeError, ValueError) as exc:
            raise InputError(f"Selection table {source} has a 'coord' entry that is not three numbers.") from exc
    else:
        raise InputError(
            f"Table {source} has none of the column sets (tomogram, x, y, z), "
            "(image_name, x_coord, y_coord, z_coord) or (name, coord)."
        )
    xyz = pd.DataFrame(np.asarray(xyz)).apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(xyz).any(axis=1))
    if len(bad):
        raise InputError(f"Table {source} row {bad[0]} has a missing or non-numeric coordinate.")
    return concat_tables([make_table(names, xyz, _class_values(df, class_name), score)])


def read_table(path: str | os.PathLike, *, class_name: str | None = None) -> pd.DataFrame:
    """Read a parquet or CSV table of positions (see :func:`table_to_labels`)."""
    path = as_path(path)
    try:
        if path.suffix.lower() in (".parquet", ".pq", ".gzip") or path.is_dir():
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep=None, engine="python")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Table {path} could not be read ({exc}).") from exc
    return table_to_labels(df, str(path), class_name=class_name)


def write_csv(picks: pd.DataFrame, out: str | os.PathLike) -> list[Path]:
    """Write the picks table as CSV (all columns, header row)."""
    out = as_path(out)
    if out.suffix.lower() != ".csv":
        out = out / "picks.csv" if out.is_dir() else out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    picks.to_csv(out, index=False)
    log.info("wrote %d rows to %s", len(picks), out)
    return [out]
