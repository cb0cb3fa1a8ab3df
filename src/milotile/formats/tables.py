"""milotile tables (parquet / CSV) and MiLoPYP's interactive-selection parquet."""

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
    concat_tables,
    headed_columns,
    make_table,
    output_file,
)

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


def table_to_labels(df: pd.DataFrame, source: str, *, class_name: str | None = None,
                    tomogram: str | None = None) -> pd.DataFrame:
    """Turn a headed table (milotile, MiLoPYP, RELION columns, ...) into a label table.

    Columns are found by name (:func:`milotile.formats._common.headed_columns`): the tomogram in
    ``tomogram`` / ``image_name`` / ``tomo`` / ``name`` / ``rlnTomoName``, the coordinates in ``x, y, z``,
    ``x_coord, y_coord, z_coord``, ``rlnCoordinateX/Y/Z`` or one ``coord`` column holding ``[x, y, z]``
    (MiLoPYP's Phoenix parquet). Without a tomogram column every row belongs to ``tomogram``.
    """
    score = df["score"] if "score" in df.columns else None
    name_col, xyz_cols = headed_columns(df.columns)
    if xyz_cols is None or (name_col is None and tomogram is None):
        what = "coordinate columns" if xyz_cols is None else "tomogram column"
        raise InputError(f"Table {source} has no {what} (header: {', '.join(map(str, df.columns[:8]))}); "
                         f"expected {HEADED_FORMS}.")
    names = df[name_col].astype(str) if name_col is not None else tomogram
    if isinstance(xyz_cols, str):
        try:
            xyz = np.array([[float(v) for v in _coord(c)] for c in df[xyz_cols]], dtype=np.float64).reshape(-1, 3)
        except (TypeError, ValueError) as exc:
            raise InputError(f"Table {source} has a '{xyz_cols}' entry that is not three numbers.") from exc
    else:
        xyz = df[list(xyz_cols)]
    xyz = pd.DataFrame(np.asarray(xyz)).apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(np.isnan(xyz).any(axis=1))
    if len(bad):
        raise InputError(f"Table {source} row {bad[0]} has a missing or non-numeric coordinate.")
    return concat_tables([make_table(names, xyz, _class_values(df, class_name), score)])


def _coord(value: object) -> list:
    """One ``coord`` entry: a sequence of three numbers, or a string ``"[x, y, z]"`` / ``"x y z"``."""
    if isinstance(value, str):
        return value.strip("[]() ").replace(",", " ").split()
    return list(value)  # type: ignore[call-overload]


def _separator(path: Path) -> str:
    """The column separator of a headed text table: tab, comma, semicolon, else runs of spaces."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip() and not line.startswith("#"):
                for sep in ("\t", ",", ";"):
                    if sep in line:
                        return sep
                break
    return r"\s+"


def read_table(path: str | os.PathLike, *, class_name: str | None = None, tomogram: str | None = None) -> pd.DataFrame:
    """Read a parquet, CSV or TSV table of positions with a header row (see :func:`table_to_labels`)."""
    path = as_path(path)
    try:
        if path.suffix.lower() in (".parquet", ".pq", ".gzip") or path.is_dir():
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep=_separator(path), engine="python", comment="#")
            df.columns = [str(c).strip() for c in df.columns]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"Table {path} could not be read ({exc}).") from exc
    return table_to_labels(df, str(path), class_name=class_name, tomogram=tomogram)


def write_csv(picks: pd.DataFrame, out: str | os.PathLike) -> list[Path]:
    """Write the picks table as CSV (all columns, header row); ``out`` follows :func:`output_file`."""
    out = output_file(out, ".csv", "picks.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    picks.to_csv(out, index=False)
    log.info("wrote %d rows to %s", len(picks), out)
    return [out]
